"""python -m benchmarks.first_pass [--quick] [--cases PATTERNS] [--repeats N] [--out DIR]

What a legacy script sees: each script in ``benchmarks/scripts`` builds its model, then
runs its loop, timed as its author would time it (the first call inside the loop). Each
case runs as a fresh process, plainly (``python script.py``) and under the runner
(``python -m keras_fastpredict script.py``), alternating, ``--repeats`` times each. Every
process runs the loop three times: the first pass is the one a script runs, the third is
the steady state our other benchmarks report. Reported per case: the loop's time plain and
patched, the first-pass and steady ratios (median, with the lowest and highest of the
repeats as the noise band), and the whole process's wall time (imports, model build, loop,
exit). Every patched first pass's outputs are checked against the plain one's (the
docs/same-result.md's tolerance). Writes first_pass.md and first_pass.json into --out; exit status 1
on a mismatch or a failed run.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from .plain_env import byte_compile_package, plain_environ

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, 'scripts')
PASSES = 3

# name, script, arguments after the loop length, loop length (full, quick)
CASES = [
    ('no loop (import Keras, build a model)', 'no_loop.py', [], (0, 0)),
    ('sliding-window tf.keras LSTM', 'sliding_window_forecast.py', [], (500, 40)),
    ('char-RNN generation', 'char_rnn_generate.py', [], (1600, 40)),
    ('per-image sess.run detector', 'detector_sess_run.py', [], (300, 30)),
    ('per-file conv classifier', 'file_classifier.py', [], (300, 30)),
    ('fresh rows: predict', 'fresh_rows.py', ['predict'], (2000, 100)),
    ('fresh rows: predict, 100 calls', 'fresh_rows.py', ['predict'], (100, 100)),
    ('fresh rows: sess.run', 'fresh_rows.py', ['sess.run'], (2000, 100)),
    ('fresh rows: K.function', 'fresh_rows.py', ['K.function'], (2000, 100)),
    ('fresh rows: tf.keras', 'fresh_rows.py', ['tf.keras'], (2000, 100)),
    ('array rows: predict', 'array_rows.py', [], (2000, 100)),
    ('array rows: predict, 100 calls', 'array_rows.py', [], (100, 100)),
    ('array rows: LSTM', 'array_rows.py', ['lstm'], (1000, 50)),
    # A fresh server process's first burst of concurrent calls (issue 22): TF's multi-row
    # kernels are not made yet when the first merge would be tried.
    ('16 threads: Dense(2048)x2', 'threaded_rows.py', [], (1000, 64)),
    # Under --auto-batch (the runner's flags are the fifth item); the table also gives the
    # loop's time against the hand-batched predict(X) of its rows, plain Keras (issue 25).
    ('collect rows: --auto-batch', 'collect_rows.py', [], (3000, 200), ['--auto-batch']),
    # A short loop: its batches must not wait for TF's multi-row kernels (engine/warmup.py),
    # which a 100-call loop's plain time barely exceeds.
    ('collect rows: --auto-batch, 100 calls', 'collect_rows.py', [], (100, 100),
     ['--auto-batch']),
    ('collect rows: runner alone', 'collect_rows.py', [], (3000, 200)),
    # The same rows hand-batched, as the loop of a script of its own: what the collect
    # loop's rewrite costs a script that runs it once (plain's first pass is the target's).
    ('collect rows: hand-batched predict(X)', 'collect_rows.py', ['hand'], (3000, 200)),
]


def _run(command, out_file):
    # Nothing of the runner inherited: plain processes plain, patched ones with the case's
    # flags alone.
    env = plain_environ(KFP_BENCH_OUT=out_file, KFP_BENCH_PASSES=str(PASSES))
    env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    env.setdefault('PYTHONWARNINGS', 'ignore')
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=SCRIPTS, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU time, user and system, all its threads: far less moved by other load than wall
    # time (whole-process wall times of one case vary by +-200 ms on this machine).
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode:
        raise RuntimeError('%s exited %d:\n%s' % (' '.join(command), proc.returncode,
                                                  proc.stderr[-3000:]))
    with np.load(out_file) as saved:
        outputs = [saved['out%d' % i] for i in range(sum(f.startswith('out')
                                                          for f in saved.files))]
        extra = {f[len('extra_'):]: float(saved[f]) for f in saved.files
                 if f.startswith('extra_')}
        return list(saved['times']), wall, cpu, outputs, extra


def _same(patched, plain):
    from keras_fastpredict.engine.verification import within_tolerance
    return len(patched) == len(plain) and all(
        within_tolerance(a, e) for a, e in zip(patched, plain))


def run_case(name, script, args, calls, repeats, say, flags=()):
    plain_cmd = [sys.executable, script, str(calls)] + args
    patched_cmd = [sys.executable, '-m', 'keras_fastpredict'] + list(flags) + [
        script, str(calls)] + args
    runs = {'plain': [], 'patched': []}
    hand_ratios = []
    mismatches = 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            order = ['plain', 'patched'] if r % 2 == 0 else ['patched', 'plain']
            got = {}
            for kind in order:
                cmd = plain_cmd if kind == 'plain' else patched_cmd
                got[kind] = _run(cmd, os.path.join(tmp, '%s%d.npz' % (kind, r)))
                runs[kind].append(got[kind][:3])
            hand = got['plain'][4].get('hand_s')
            if hand:        # the patched first pass against plain Keras' hand-batched
                hand_ratios.append(got['patched'][0][0] / hand)
            if not _same(got['patched'][3], got['plain'][3]):
                mismatches += 1
    first = [p[0][0] / max(q[0][0], 1e-9) for p, q in zip(runs['plain'], runs['patched'])]
    steady = [p[0][-1] / max(q[0][-1], 1e-9) for p, q in zip(runs['plain'], runs['patched'])]
    wall = [p[1] / q[1] for p, q in zip(runs['plain'], runs['patched'])]
    cpu = [p[2] / q[2] for p, q in zip(runs['plain'], runs['patched'])]
    result = dict(
        name=name, script=script, args=args, calls=calls, repeats=repeats,
        plain_first_s=float(np.median([p[0][0] for p in runs['plain']])),
        patched_first_s=float(np.median([q[0][0] for q in runs['patched']])),
        plain_steady_s=float(np.median([p[0][-1] for p in runs['plain']])),
        patched_steady_s=float(np.median([q[0][-1] for q in runs['patched']])),
        plain_wall_s=float(np.median([p[1] for p in runs['plain']])),
        patched_wall_s=float(np.median([q[1] for q in runs['patched']])),
        plain_cpu_s=float(np.median([p[2] for p in runs['plain']])),
        patched_cpu_s=float(np.median([q[2] for q in runs['patched']])),
        first=_band(first), steady=_band(steady), wall=_band(wall), cpu=_band(cpu),
        mismatches=mismatches, runs=runs, flags=list(flags),
        over_hand=_band(hand_ratios) if hand_ratios else None)
    say('%-34s first %s  steady %s  process %s  CPU %s%s%s' % (
        name, _fmt(result['first']), _fmt(result['steady']), _fmt(result['wall']),
        _fmt(result['cpu']),
        '  first pass / plain hand-batched predict(X) %s' % _fmt(result['over_hand'])
        if hand_ratios else '', '  MISMATCH' if mismatches else ''))
    return result


def _band(ratios):
    return dict(median=float(np.median(ratios)), low=float(min(ratios)),
                high=float(max(ratios)))


def _ms(seconds):
    return '%.0f ms' % (1e3 * seconds)


def _fmt(band):
    return '%.2fx (%.2f-%.2f)' % (band['median'], band['low'], band['high'])


def write(results, out, command, seconds):
    os.makedirs(out, exist_ok=True)
    machine = '%s, %d cores, Python %s' % (platform.machine(), os.cpu_count(),
                                           platform.python_version())
    lines = ['# First pass: each loop run once in a fresh process, as a script runs it', '',
             '`%s`, %s, %s, %.0f s. Ratios are plain time over patched time (above 1: '
             'faster), median of the repeats with the lowest and highest in brackets; '
             '"steady" is the third pass of the loop in the same process. "One-time" is a '
             "loop's first pass less its steady pass, plain / patched: what the first pass "
             "paid once (plain Keras' own session start and predict function included). "
             '"Process" is the whole process\'s wall time, plain / patched; "process CPU" '
             'its CPU time (user and system, every thread), which other load moves far '
             'less than wall time. The package is byte-compiled first, as pip installs it.'
             % (command, time.strftime('%Y-%m-%d %H:%M'), machine, seconds), '',
             '| case | calls | first pass, plain / patched | first pass | steady '
             '| one-time, plain / patched | process, plain / patched | whole process '
             '| process CPU, plain / patched | process CPU |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for r in results:
        lines.append('| %s | %d | %s / %s | %s | %s | %s / %s | %.2f / %.2f s | %s '
                     '| %.2f / %.2f s | %s%s |' % (
            r['name'], r['calls'], _ms(r['plain_first_s']), _ms(r['patched_first_s']),
            _fmt(r['first']) if r['calls'] else '-', _fmt(r['steady']) if r['calls'] else '-',
            _ms(r['plain_first_s'] - r['plain_steady_s']),
            _ms(r['patched_first_s'] - r['patched_steady_s']),
            r['plain_wall_s'], r['patched_wall_s'], _fmt(r['wall']),
            r['plain_cpu_s'], r['patched_cpu_s'], _fmt(r['cpu']),
            ' (outputs differ)' if r['mismatches'] else ''))
    hand = [r for r in results if r.get('over_hand')]
    if hand:
        lines += ['', 'The patched first pass against plain Keras\' hand-batched `predict(X)` '
                  'of the same rows (timed warm in the plain process; below 1: faster):', '']
        lines += ['- %s: %s' % (r['name'], _fmt(r['over_hand'])) for r in hand]
    by_name = {r['name']: r for r in results}
    auto, rewrite = (by_name.get('collect rows: --auto-batch'),
                     by_name.get('collect rows: hand-batched predict(X)'))
    if auto and rewrite:
        lines += ['', 'The collect loop\'s first pass under `--auto-batch` against the first '
                  'pass of its hand-batched rewrite run plainly, each in fresh processes '
                  '(medians): %s / %s = %.2fx (below 1: faster).' % (
                      _ms(auto['patched_first_s']), _ms(rewrite['plain_first_s']),
                      auto['patched_first_s'] / rewrite['plain_first_s'])]
    text = '\n'.join(lines) + '\n'
    with open(os.path.join(out, 'first_pass.md'), 'w') as f:
        f.write(text)
    with open(os.path.join(out, 'first_pass.json'), 'w') as f:
        json.dump(dict(command=command, machine=machine, seconds=seconds,
                       results=results), f, indent=1)
    return text


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog='python -m benchmarks.first_pass', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='short loops (for a test)')
    parser.add_argument('--cases', default='',
                        help='comma-separated substrings of case names, e.g. "sess.run,LSTM"')
    parser.add_argument('--repeats', type=int, default=None,
                        help='processes per variant and case (default 3, 1 with --quick)')
    parser.add_argument('--out', default=os.path.join(HERE, 'results'))
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    byte_compile_package()       # as installed: see plain_env
    wanted = [p.strip() for p in args.cases.split(',') if p.strip()]
    cases = [c for c in CASES if not wanted or any(w in c[0] for w in wanted)]
    if not cases:
        print('no case matches %r' % args.cases)
        return 1
    started = time.time()
    results = []
    failed = False
    for name, script, extra, (full, quick), *flags in cases:
        try:
            results.append(run_case(name, script, extra, quick if args.quick else full,
                                    repeats, print, flags[0] if flags else ()))
        except RuntimeError as exc:
            print('%s: FAILED\n%s' % (name, exc), file=sys.stderr)
            failed = True
    command = ('python -m benchmarks.first_pass ' + ' '.join(argv)).strip()
    print(write(results, args.out, command, time.time() - started))
    if any(r['mismatches'] for r in results):
        print('FAILED: patched outputs differ from plain Keras', file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
