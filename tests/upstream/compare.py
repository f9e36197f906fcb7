"""Compares the outcomes of Keras' test suite run plainly and under keras_fastpredict.

Usage: python compare.py OUT_DIR KNOWN_DIFFERENCES_FILE MODE...

Each MODE has OUT_DIR/MODE/results.json (written by kfp_plugin) and, for patched modes,
OUT_DIR/MODE/stats-*.json. The first MODE is the reference (``plain``). Every test that
passed in the reference run must pass in each other mode, unless it is listed for that
mode in the known-differences file. Exits 1 when one does not, or when a patched run shows
no fast-path call at all (the patch was not in effect), 2 when a run produced no results.
"""
import glob
import json
import os
import sys

OUTCOMES = ('passed', 'failed', 'error', 'skipped')


def load_known(path):
    """{(mode, test id): reason}; a line is ``MODE TEST_ID REASON...``, MODE may be ``*``."""
    known = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith('#'):
                continue
            parts = line.split(None, 2)
            if len(parts) < 3:
                raise SystemExit('%s:%d: want "MODE TEST_ID REASON", got %r' % (path, number, line))
            known[(parts[0], parts[1])] = parts[2]
    return known


def load_results(out, mode):
    path = os.path.join(out, mode, 'results.json')
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_stats(out, mode):
    totals = {}
    reasons = {}
    for path in sorted(glob.glob(os.path.join(out, mode, 'stats-*.json'))):
        with open(path) as f:
            data = json.load(f)
        for key, value in data.items():
            if key == 'fallback_reasons':
                for reason, n in value.items():
                    reasons[reason] = reasons.get(reason, 0) + n
            elif isinstance(value, int) and not isinstance(value, bool) and key != 'pid':
                totals[key] = totals.get(key, 0) + value
    return totals, reasons


def counts(outcomes):
    found = {name: 0 for name in OUTCOMES}
    for outcome in outcomes.values():
        found[outcome] = found.get(outcome, 0) + 1
    return found


def main(argv):
    out, known_path, modes = argv[1], argv[2], argv[3:]
    known = load_known(known_path)
    reference_mode = modes[0]
    results = {mode: load_results(out, mode) for mode in modes}
    missing = [mode for mode, r in results.items() if r is None]
    if missing:
        print('no results for run(s): %s' % ', '.join(missing))
        return 2
    reference = results[reference_mode]['outcomes']
    status = 0
    print()
    print('%-7s %7s %7s %7s %7s %7s' % ('run', 'total', 'passed', 'failed', 'errors', 'skipped'))
    for mode in modes:
        c = counts(results[mode]['outcomes'])
        print('%-7s %7d %7d %7d %7d %7d' % (mode, len(results[mode]['outcomes']), c['passed'],
                                             c['failed'], c['error'], c['skipped']))
    for mode in modes[1:]:
        outcomes = results[mode]['outcomes']
        print()
        print('== %s vs %s' % (mode, reference_mode))
        totals, reasons = load_stats(out, mode)
        print('keras_fastpredict counters: models with counters %d, predict calls %d, '
              'fast %d, fallbacks %d, deferred %d, batches %d, read-ahead hits %d, verified %d'
              % tuple(totals.get(k, 0) for k in ('models', 'calls', 'fast_calls', 'fallbacks',
                                                  'deferred', 'batches', 'readahead_hits',
                                                  'verified')))
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
            print('  fallback %6d x %s' % (n, reason))
        if not totals.get('fast_calls'):
            print('FAIL: no predict call took the fast path: was the patch in effect?')
            status = 1
        if mode == 'defer' and not totals.get('deferred'):
            print('FAIL: no predict call was deferred under defer=True')
            status = 1
        regressions, excused, stale, gained = [], [], [], []
        for test, outcome in sorted(reference.items()):
            now = outcomes.get(test, 'missing')
            reason = known.get((mode, test)) or known.get(('*', test))
            if outcome == 'passed' and now != 'passed':
                (excused if reason else regressions).append((test, now, reason))
            elif reason and now == 'passed':
                stale.append((test, reason))
        for test, outcome in sorted(outcomes.items()):
            if outcome == 'passed' and reference.get(test) != 'passed':
                gained.append((test, reference.get(test, 'missing')))
        for test, now, reason in excused:
            print('  known difference: %s %s (%s)' % (test, now, reason))
        for test, reason in stale:
            print('  note: listed as a known difference but passed: %s' % test)
        for test, was in gained:
            print('  note: passed here, %s in the %s run: %s' % (was, reference_mode, test))
        for test, now, _ in regressions:
            print('  REGRESSION: %s %s (passed in the %s run)' % (test, now, reference_mode))
        if regressions:
            status = 1
        print('%s: %d regressions, %d known differences' % (mode, len(regressions), len(excused)))
    return status


if __name__ == '__main__':
    sys.exit(main(sys.argv))
