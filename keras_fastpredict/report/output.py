"""The report as data, as a table and as a JSON file; a child process's own report."""
import collections
import json
import os
import sys

from ..config import settings
from . import advice, paid_back, plain, sites, watch


def site_dict(site):
    """One site as the report shows it (the JSON schema in docs)."""
    stats = site.stats
    if site.waiting:
        plain.count_waiting(site)
    batches = watch.batches(site)
    calls = site.calls
    measured = calls - site.unmeasured - site.errors
    usual = paid_back.usual(site)
    d = collections.OrderedDict([
        ('site', site.where()), ('file', site.file), ('line', site.line),
        ('function', site.function), ('entry', site.entry),
        ('model', (site.path or stats).name),
        ('calls', calls), ('rows', site.total_rows()),
        ('paths', collections.OrderedDict([
            ('fast', site.fast), ('readahead', site.readahead), ('deferred', site.deferred),
            ('merged', site.merged), ('keras', site.keras)])),
        ('keras_reasons', dict(site.reasons)),
        ('errors', site.errors),
        ('time_s', site.time_s),
        ('plain_estimate_s', (site.plain_total() * calls / measured) if measured else None),
        ('plain_estimate_calls', measured),
        ('plain_estimate', site.plain_note if site.unmeasured else 'measured'),
        ('usual_calls', usual[0]), ('usual_call_s', usual[1]),
        ('results_read', collections.OrderedDict([
            ('watched', site.watched), ('batches', batches[:64]),
            ('batch_it_would_reach', None)])),
    ])
    d['advice'] = advice.advice(site, d)
    d['auto_batch'] = _auto_dict(site)
    if site.plain_note is plain.NOT_SHOWN:
        d['plain_estimate_s'] = None
    return d


def _auto_dict(site):
    """What auto-batch did at the site (None: it was off, or the site still sampling)."""
    auto = site.auto
    if auto is None:
        if site.auto_note is None:
            return None
        return collections.OrderedDict([('deferring', False), ('note', site.auto_note)])
    return collections.OrderedDict([
        ('deferring', auto.on), ('note', auto.stopped),
        ('calls', auto.calls), ('batches', auto.batches),
        ('lone_batches', auto.lone_batches), ('run_after_calls_s', auto.outside_s)])


def report():
    """The call-site report of this process: a dict (``sites`` sorted by time spent), the
    data of the table and the JSON file (schema in docs/report.md)."""
    found = sites.all_sites()
    for site in found:
        site.held = {}                   # frames held for the span check: let them go
        if site.path is not None and site.path.report_owner is site:
            sites.settle(site)
    rows = [site_dict(s) for s in found if s.calls]
    rows.sort(key=lambda d: -d['time_s'])
    return collections.OrderedDict([
        ('version', 1), ('pid', os.getpid()), ('argv', list(sys.argv)),
        ('report', bool(settings.report)), ('plain_estimate_method', plain.PLAIN_METHOD),
        ('sites', rows), ('one_time', paid_back.models([s for s in found if s.calls]))])


def reset():
    """Forget every site and every plain figure."""
    sites.clear()
    plain.clear()


def _ms(seconds):
    return '%10.1f' % (1e3 * seconds) if seconds is not None else '%10s' % '-'


def format_table(data=None):
    data = report() if data is None else data
    if not data['sites']:
        return 'keras_fastpredict: call sites: no predict calls seen with the report on'
    lines = ['keras_fastpredict: call sites (paths: fast / read-ahead / deferred / merged / '
             'left to Keras; plain: estimated, see --stats-json)',
             '  %-44s %-12s %7s %8s %-24s %10s %10s' % (
                 'site', 'model', 'calls', 'rows', 'fast/ra/def/mrg/keras', 'time ms',
                 'plain ms')]
    for d in data['sites']:
        p = d['paths']
        site = d['site']
        if len(site) > 44:
            site = '...' + site[-41:]
        lines.append('  %-44s %-12s %7d %8d %-24s %s %s' % (
            site, (d['model'] or '-')[:12], d['calls'], d['rows'],
            '%d/%d/%d/%d/%d' % (p['fast'], p['readahead'], p['deferred'], p['merged'],
                                p['keras']),
            _ms(d['time_s']), _ms(d['plain_estimate_s'])))
        if d['plain_estimate_s'] is None and d['plain_estimate'] != 'measured':
            lines.append('      plain: %s' % d['plain_estimate'])
        for a in d['advice']:
            lines.append('      advice: %s' % a['text'])
        auto = d.get('auto_batch')
        if auto is not None:
            lines.append('      auto-batch: %s' % _auto_text(d, auto))
    lines.extend(paid_back.text(m) for m in data.get('one_time', ()))
    return '\n'.join(lines)


def _auto_text(d, auto):
    if 'calls' not in auto:
        return 'not deferred: %s' % auto['note']
    text = ('%d calls deferred after the sample, run in %d batches (mean %.1f calls), '
            '%.1f ms of runs after the calls' % (
                auto['calls'], auto['batches'], auto['calls'] / max(1, auto['batches']),
                1e3 * auto['run_after_calls_s']))
    if d['plain_estimate_s'] is not None and d['time_s'] + auto['run_after_calls_s'] > 0:
        text += '; site %.1fx plain Keras with those runs' % (
            d['plain_estimate_s'] / (d['time_s'] + auto['run_after_calls_s']))
    if not auto['deferring']:
        text += '; then back to the fast path: %s' % auto['note']
    return text


def write_json(path, data=None):
    data = report() if data is None else data
    tmp = '%s.tmp%d' % (path, os.getpid())
    with open(tmp, 'w') as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
    return path


JSON_ENV = 'KERAS_FASTPREDICT_STATS_JSON'


def at_exit(show, path):
    """The runner's own process: the table on stderr, the JSON file."""
    data = report()
    if show:
        sys.stderr.write(format_table(data) + '\n')
    if path:
        try:
            write_json(path, data)
        except OSError as exc:
            sys.stderr.write('keras_fastpredict: cannot write %s: %s\n' % (path, exc))


def in_child(pid_prefix, write_stderr):
    """A child process of the runner's job (``processes.report``): its own table (to
    ``write_stderr``, prefixed with its pid) and its JSON file, named by its pid."""
    if not settings.report:
        return None
    data = report()
    if not data['sites']:
        return data
    path = os.environ.get(JSON_ENV)
    if path:
        try:
            write_json(child_path(path), data)
        except OSError:
            pass
    if write_stderr is not None:
        write_stderr(format_table(data).replace('keras_fastpredict:', pid_prefix, 1) + '\n')
    return data


def child_path(path, pid=None):
    """Where a child process writes its report: ``FILE`` named by its pid."""
    root, ext = os.path.splitext(path)
    return '%s.%d%s' % (root, os.getpid() if pid is None else pid, ext or '.json')
