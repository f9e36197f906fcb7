"""python -m benchmarks.processes [--quick] [--cases spark,pool] [--repeats N] [--out DIR]

Jobs of several processes, plain against the runner alone (``python -m keras_fastpredict``),
each run as a user runs it, in one go so the ratios share the machine's state:

* spark: ``examples/spark_scoring.py`` on ``local[2]`` (40,000 rows, one ``predict`` per
  row in ``mapPartitions``), plain, under the runner, and with ``--fast-predict`` (the
  ``@fast_predict`` line) under the runner. The times are the scoring job's (the table
  already cached): the session's first job (the one a script runs: its Python workers
  start and import Keras inside it) and the best of ``--repeats`` jobs; and the whole
  run's, Spark's start included.
* pool: a 4-process ``multiprocessing.Pool`` (fork), each worker loading the model in its
  initializer, then one ``predict`` per row over 20,000 rows; the time is ``pool.map``'s.

Every patched run's scores are checked against the plain run's (rtol 1e-5). Writes
processes.md and processes.json into --out. Exit status 1 on a mismatch.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EXAMPLE = os.path.join(ROOT, 'examples', 'spark_scoring.py')
RUNNER = [sys.executable, '-m', 'keras_fastpredict']
RTOL, ATOL = 1e-5, 1e-6

POOL = textwrap.dedent('''
    import multiprocessing as mp, sys, time
    import numpy as np
    model = None

    def load(path):
        global model
        from keras.models import load_model
        model = load_model(path, compile=False)

    def score(rows):
        return [float(model.predict(np.expand_dims(r, 0))[0][0]) for r in rows]

    if __name__ == '__main__':
        path, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
        data = np.random.RandomState(1).rand(n, 16).astype('float32')
        chunks = np.array_split(data, 64)
        with mp.get_context('fork').Pool(4, initializer=load, initargs=(path,)) as pool:
            pool.map(abs, range(8))                        # workers started
            start = time.perf_counter()
            scores = pool.map(score, chunks)
            seconds = time.perf_counter() - start
        np.save(out, np.concatenate([np.asarray(s) for s in scores]))
        print('scored %d rows in %.2f s' % (n, seconds))
''')


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith('KERAS_FASTPREDICT_')}
    env.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
    env['PYTHONWARNINGS'] = 'ignore'
    env['PYSPARK_PYTHON'] = sys.executable
    env['PYTHONPATH'] = ROOT
    return env


def _run(cmd):
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=1800)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError('%s failed:\n%s' % (' '.join(cmd), proc.stderr[-4000:]))
    times = [float(t) for t in re.findall(r'scored \d+ rows in ([0-9.]+) s', proc.stdout)]
    return min(times), times[0], wall


def _compare(reference, path):
    got = np.load(path)
    if got.shape != reference.shape:
        return 'shape %s != %s' % (got.shape, reference.shape)
    scale = np.abs(reference).max()
    diff = float(np.abs(got - reference).max())
    return None if diff <= ATOL + RTOL * scale else 'largest difference %.3g' % diff


def spark_case(work, rows, repeats):
    model = os.path.join(work, 'model.h5')
    common = [EXAMPLE, '--rows', str(rows), '--model', model, '--repeat', str(repeats)]
    variants = [('plain', [sys.executable] + common),
                ('runner', RUNNER + common),
                ('runner + @fast_predict', RUNNER + common + ['--fast-predict'])]
    return _variants('spark local[2], %d rows, predict per row in mapPartitions' % rows,
                     work, variants)


def pool_case(work, rows):
    model = os.path.join(work, 'model.h5')
    script = os.path.join(work, 'pool.py')
    with open(script, 'w') as f:
        f.write(POOL)
    variants = [('plain', [sys.executable, script, model, str(rows)]),
                ('runner', RUNNER + [script, model, str(rows)])]
    return _variants('Pool(4) fork, %d rows, predict per row' % rows, work, variants,
                     out_last=True)


def _variants(name, work, variants, out_last=False):
    results, reference = [], None
    for label, cmd in variants:
        out = os.path.join(work, re.sub(r'\W+', '_', name + label) + '.npy')
        cmd = cmd + ([out] if out_last else ['--out', out])
        seconds, first, wall = _run(cmd)
        if reference is None:
            reference, mismatch = np.load(out), None
        else:
            mismatch = _compare(reference, out)
        results.append({'case': name, 'variant': label, 'seconds': seconds, 'first': first,
                        'wall': wall, 'mismatch': mismatch})
        print('  %-55s %-24s %7.2f s, first job %.2f s  (whole run %.1f s)%s' % (
            name[:55], label, seconds, first, wall,
            '  MISMATCH ' + mismatch if mismatch else ''), flush=True)
    base = results[0]
    for r in results:
        r['ratio'] = base['seconds'] / r['seconds']
        r['first_ratio'] = base['first'] / r['first']
        r['wall_ratio'] = base['wall'] / r['wall']
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m benchmarks.processes', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='tiny sizes (for a test)')
    parser.add_argument('--cases', default='spark,pool')
    parser.add_argument('--repeats', type=int, default=None,
                        help='Spark jobs per run, the best counts (default 3, 1 with --quick)')
    parser.add_argument('--out', default=os.path.join(HERE, 'results'))
    args = parser.parse_args(argv)
    cases = set(args.cases.split(','))
    repeats = args.repeats or (1 if args.quick else 3)
    from .plain_env import byte_compile_package
    byte_compile_package()       # as installed: see plain_env
    work = tempfile.mkdtemp(prefix='kfp-processes-')
    subprocess.run([sys.executable, '-c', 'import sys; sys.path.insert(0, "examples"); '
                    'import spark_scoring; spark_scoring.make_model(sys.argv[1])',
                    os.path.join(work, 'model.h5')], cwd=ROOT, env=_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = []
    if 'spark' in cases:
        results += spark_case(work, 2000 if args.quick else 40000, repeats)
    if 'pool' in cases:
        results += pool_case(work, 800 if args.quick else 20000)
    os.makedirs(args.out, exist_ok=True)
    lines = ['The first job is the one a script runs (its Python workers start and import '
             'Keras inside it); "best job" is the best of the repeats in one session; the '
             'whole run is the process\'s wall time, Spark\'s start included.', '',
             '| case | variant | first job, s | speed-up | best job, s | speed-up '
             '| whole run, s | speed-up |', '|---|---|---|---|---|---|---|---|']
    for r in results:
        lines.append('| %s | %s | %.2f | %.2fx | %.2f | %.2fx | %.1f | %.2fx |' % (
            r['case'], r['variant'], r['first'], r['first_ratio'], r['seconds'], r['ratio'],
            r['wall'], r['wall_ratio']))
    bad = [r for r in results if r['mismatch']]
    lines.append('')
    lines.append('Correctness: ' + ('all patched runs agree with the plain run (rtol 1e-5)'
                                    if not bad else '%d MISMATCHES' % len(bad)))
    text = '\n'.join(lines) + '\n'
    with open(os.path.join(args.out, 'processes.md'), 'w') as f:
        f.write(text)
    with open(os.path.join(args.out, 'processes.json'), 'w') as f:
        json.dump(results, f, indent=1)
    print(text)
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
