"""python -m benchmarks.servers [--cases ...] [--clients 1,4,16] [--repeats 3]
                              [--duration 5] [--out DIR]

Real servers, plain against the runner alone (``python -m keras_fastpredict`` in front),
under a closed-loop load on this machine (each client sends a request, waits for its
answer, checks it, sends the next):

* gunicorn-sync, gunicorn-gthread: examples/wsgi.py under ``gunicorn -w 2`` (sync
  workers, or gthread with 4 threads each); one row per request (examples/load.py).
* celery-row, celery-rows: examples/celery_tasks.py under a prefork worker (``-c 2``),
  Redis as broker; ``predict_row`` (one row per task) or ``score_rows`` (``--rows-per-task``
  rows per task, one ``predict`` per row) (examples/celery_load.py).

The plain and the patched server of a case run side by side (the idle one waits on its
socket); each client count is measured ``--repeats`` times, plain and patched alternating
which goes first. Figures: throughput (requests or tasks per second), p50/p99 of a round
trip, medians over the repeats with their ranges, and the ratio patched/plain of each
repeat's pair. Every answer is checked against the server's own sequential answer for the
same input; exit status 1 if any request failed or was answered wrong. Writes servers.md
and servers.json into --out.
"""
import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from .plain_env import byte_compile_package, plain_environ

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EXAMPLES = os.path.join(ROOT, 'examples')
sys.path.insert(0, EXAMPLES)

import celery_load  # noqa: E402
import load  # noqa: E402

CASES = ('gunicorn-sync', 'gunicorn-gthread', 'celery-row', 'celery-rows')


def _env():
    # No options inherited, no bootstrap folder (which would patch the plain servers); this
    # checkout's package (for every process it starts). None removes a variable (load.py).
    env = {k: None for k in os.environ if k.startswith('KERAS_FASTPREDICT_')}
    return dict(env, PYTHONPATH=os.pathsep.join(
        p for p in [ROOT, plain_environ().get('PYTHONPATH')] if p),
        TF_CPP_MIN_LOG_LEVEL='3', PYTHONWARNINGS='ignore')


class Case(object):
    """Starts a case's plain and patched servers; ``measure(patched, clients)``."""

    def __init__(self, name, args):
        self.name, self.args = name, args
        self.servers = []
        if name.startswith('gunicorn'):
            kind = name.split('-')[1]
            self.plain, self.fast = [
                load.Gunicorn(unpatched=unpatched, workers=2, worker_class=kind, threads=4,
                              env=_env(), wait=False, startup_timeout=300)
                for unpatched in (True, False)]
            self.servers = [self.plain, self.fast]
        else:
            self.task = 'predict_row' if name == 'celery-row' else 'score_rows'
            redis = [celery_load.Redis(), celery_load.Redis()]
            self.servers = list(redis)
            self.plain, self.fast = [
                celery_load.Worker(r.url, unpatched=unpatched, concurrency=2, env=_env(),
                                   wait=False, startup_timeout=300)
                for r, unpatched in zip(redis, (True, False))]
            self.servers += [self.plain, self.fast]
        for server in self.servers:
            server.wait_ready()

    def measure(self, patched, clients, duration, warmup=0.0):
        server = self.fast if patched else self.plain
        if self.name.startswith('gunicorn'):
            if warmup:
                load.run_load(server.port, clients, 10 ** 9, 8, warmup, 30.0, 99)
            return load.run_load(server.port, clients, 10 ** 9, 8, duration, 30.0, 1234)
        return celery_load.run_load(server.url, self.task, clients, 8,
                                    self.args.rows_per_task, duration, 30.0, 1234, warmup)

    def stop(self):
        for server in reversed(self.servers):
            server.stop()


def _median_range(values):
    return float(np.median(values)), float(np.min(values)), float(np.max(values))


def summarize(rows):
    """Per case and client count: medians and ranges of plain, patched and the ratios."""
    out = []
    keys = sorted({(r['case'], r['clients']) for r in rows},
                  key=lambda k: (CASES.index(k[0]), k[1]))
    for case, clients in keys:
        mine = [r for r in rows if r['case'] == case and r['clients'] == clients]
        by = {p: sorted((r for r in mine if r['patched'] == p), key=lambda r: r['repeat'])
              for p in (False, True)}
        ratios = [f['throughput'] / s['throughput']
                  for s, f in zip(by[False], by[True]) if s['throughput']]
        entry = {'case': case, 'clients': clients, 'repeats': len(ratios),
                 'ratio': _median_range(ratios) if ratios else None}
        for p, name in ((False, 'plain'), (True, 'patched')):
            entry[name] = {k: _median_range([r[k] for r in by[p]])
                           for k in ('throughput', 'p50_ms', 'p99_ms')}
        out.append(entry)
    return out


def markdown(summary, meta):
    lines = ['# Servers: plain against `python -m keras_fastpredict`', '',
             '%s; %s; Python %s; load average before %s, after %s; %d s of load per '
             'measurement, %d repeat(s), plain and patched alternating.' % (
                 meta['date'], meta['machine'], meta['python'], meta['load_before'],
                 meta['load_after'], meta['duration'], meta['repeats']), '',
             '| case | clients | plain req/s | patched req/s | ratio | p50 ms plain / '
             'patched | p99 ms plain / patched |', '|---|---|---|---|---|---|---|']

    def mr(t, fmt='%.0f'):
        return (fmt + ' (' + fmt + '-' + fmt + ')') % t

    for e in summary:
        p, f = e['plain'], e['patched']
        lines.append('| %s | %d | %s | %s | %s | %.1f / %.1f | %.1f / %.1f |' % (
            e['case'], e['clients'], mr(p['throughput']), mr(f['throughput']),
            mr(e['ratio'], '%.2f') if e['ratio'] else '-', p['p50_ms'][0], f['p50_ms'][0],
            p['p99_ms'][0], f['p99_ms'][0]))
    lines += ['', 'Medians over the repeats, (min-max) their range; ratio: patched/plain '
              'throughput of each repeat\'s pair.', '']
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cases', default=','.join(CASES))
    parser.add_argument('--clients', default='1,4,16')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--duration', type=float, default=5.0, help='seconds per measure')
    parser.add_argument('--rows-per-task', type=int, default=32, help='celery-rows')
    parser.add_argument('--out', default=os.path.join(HERE, 'results'))
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(',') if c]
    byte_compile_package()       # as installed: see plain_env
    unknown = set(cases) - set(CASES)
    if unknown:
        parser.error('unknown cases: %s (known: %s)' % (sorted(unknown), ', '.join(CASES)))
    client_counts = [int(c) for c in args.clients.split(',')]

    meta = {'date': time.strftime('%Y-%m-%d %H:%M'), 'python': platform.python_version(),
            'machine': '%d cores' % os.cpu_count(), 'duration': args.duration,
            'repeats': args.repeats, 'rows_per_task': args.rows_per_task,
            'load_before': '%.2f' % os.getloadavg()[0]}
    rows, bad = [], 0
    for name in cases:
        case = Case(name, args)
        try:
            for patched in (False, True):          # first calls, callables built
                case.measure(patched, 4, 1.0)
            for repeat in range(args.repeats):
                for i, clients in enumerate(client_counts):
                    order = (False, True) if (repeat + i) % 2 == 0 else (True, False)
                    for patched in order:
                        r = case.measure(patched, clients, args.duration)
                        r.update(case=name, clients=clients, patched=patched, repeat=repeat)
                        rows.append(r)
                        bad += bool(r['errors'] or r['wrong'] or not r['ok'])
                        print('%-16s %2d clients %-8s %8.1f /s  p50 %7.2f ms  p99 %7.2f ms  '
                              'errors %d wrong %d' % (
                                  name, clients, 'patched' if patched else 'plain',
                                  r['throughput'], r['p50_ms'], r['p99_ms'], r['errors'],
                                  r['wrong']), flush=True)
        finally:
            case.stop()
    meta['load_after'] = '%.2f' % os.getloadavg()[0]
    summary = summarize(rows)
    text = markdown(summary, meta)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'servers.md'), 'w') as f:
        f.write(text)
    with open(os.path.join(args.out, 'servers.json'), 'w') as f:
        json.dump({'meta': meta, 'summary': summary, 'runs': rows}, f, indent=1)
    if bad:
        print('%d measurement(s) had failed or wrong answers' % bad, file=sys.stderr)
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
