"""python -m benchmarks.first_call [--ways W,...] [--calls N] [--repeats R] [--quick]

Where a fresh process's first calls go, plain and under the runner: each way in
(``predict``, ``sess.run``, ``K.function``, and ``collect`` under ``--auto-batch``) runs
``scripts/first_calls.py`` as fresh processes, plainly and under ``python -m
keras_fastpredict``, alternating, ``--repeats`` times each. Printed per way: the first
call's, the second call's and the whole loop's wall time, and the time each timed phase
(TensorFlow's C entry points, Keras' one-time steps, ours) had taken by the end of the
first call, of the second and of the loop (so cumulative, with its count of calls), each
the median of the processes, in ms. Phases nest: Keras' get_session holds the session made and its
variable-initialising runs; our model entry holds its callable and its graph analysis.
Every patched loop's result is checked against the plain one's (a checksum)."""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from .plain_env import byte_compile_package, plain_environ

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, 'scripts')
WAYS = {'predict': [], 'sess.run': [], 'K.function': [], 'collect': ['--auto-batch']}
MARKS = ('call 1', 'call 2', 'loop')


def run_once(way, calls, patched, out_file):
    command = [sys.executable] + (['-m', 'keras_fastpredict'] + WAYS[way] if patched else [])
    command += ['first_calls.py', way, str(calls)]
    env = plain_environ(KFP_BENCH_OUT=out_file)      # nothing of the runner inherited
    env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    env.setdefault('PYTHONWARNINGS', 'ignore')
    proc = subprocess.run(command, cwd=SCRIPTS, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True)
    if proc.returncode:
        raise RuntimeError('%s exited %d:\n%s' % (' '.join(command), proc.returncode,
                                                  proc.stderr[-3000:]))
    with open(out_file) as f:
        return json.load(f)


def measure(way, calls, repeats):
    runs = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for patched in ((False, True) if r % 2 == 0 else (True, False)):
                runs[patched].append(run_once(way, calls, patched,
                                              os.path.join(tmp, '%s%d.json' % (patched, r))))
    plain_sum = np.median([run['checksum'] for run in runs[False]])
    mismatches = sum(not np.isclose(run['checksum'], plain_sum, rtol=1e-4)
                     for run in runs[True])
    return runs, mismatches


def walls(run):
    times = run['times']
    return {'call 1': times[0], 'call 2': times[1], 'loop': sum(times)}


def table(way, calls, runs):
    """Markdown rows: wall times, then each phase (median ms; count in the loop)."""
    def cell(values):
        return '%.1f' % (1e3 * float(np.median(values)))

    header = ['| %s (%d calls) | %s |' % (way, calls, ' | '.join(
        '%s %s' % (kind, mark) for mark in MARKS for kind in ('plain', 'patched'))),
        '|---|' + '---:|' * (2 * len(MARKS))]
    lines = ['| wall | %s |' % ' | '.join(
        cell([walls(run)[mark] for run in runs[patched]])
        for mark in MARKS for patched in (False, True))]
    labels = sorted({label for patched in (False, True) for run in runs[patched]
                     for label in run['after']['loop'][0]})
    for label in labels:
        cells = []
        for mark in MARKS:
            for patched in (False, True):
                values = [run['after'][mark][0].get(label, 0.0) for run in runs[patched]]
                count = int(np.median([run['after'][mark][1].get(label, 0)
                                       for run in runs[patched]]))
                cells.append('%s (%d)' % (cell(values), count) if count else '-')
        lines.append('| %s | %s |' % (label, ' | '.join(cells)))
    return header + lines


def main(argv=None):
    parser = argparse.ArgumentParser(usage=__doc__.split('\n')[0])
    parser.add_argument('--ways', default=','.join(WAYS))
    parser.add_argument('--calls', type=int, default=100)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--quick', action='store_true', help='10 calls, 1 repeat')
    args = parser.parse_args(argv)
    calls, repeats = (10, 1) if args.quick else (args.calls, args.repeats)
    byte_compile_package()       # as installed: see plain_env
    bad = 0
    for way in args.ways.split(','):
        runs, mismatches = measure(way, calls, repeats)
        bad += mismatches
        print('\n'.join(table(way, calls, runs)))
        print('(median of %d processes each%s)\n' % (
            repeats, ', %d patched results MISMATCHED' % mismatches if mismatches else ''))
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
