"""python -m benchmarks.threads [--models mlp64,mlp2048,cnn] [--threads 1,2,4,8,16]
                              [--repeats 7] [--steady] [--always] [--quick] [--json FILE]

Many threads, one row per call, one model: plain Keras (each thread calls ``predict``
under ``graph.as_default()``), patched with ``concurrent=False`` (every call its own run,
in its own thread), and patched with the concurrent batcher (the default). Each repeat
runs every variant of a case once, in an order rotated by one each repeat, so the
variants meet the same machine load; ratios are taken per repeat (paired) and their
median is printed with its range. Every variant's outputs are checked against plain
Keras' (the README's tolerance). The load average is printed with the figures.

``--steady`` patches once per case and switches options between variants (the policy's
measurements and the callables' calibrations carry over from repeat to repeat, as in a
server); plain Keras is then not timed (it needs the patch taken off, which drops what
was measured): the batcher against ``concurrent=False`` only, outputs still checked
against plain Keras'. By default each run patches afresh (as ``python -m benchmarks``
does, so each run starts cold). ``--always`` adds a variant that merges whenever the slots are busy
(``merge=True``), to show what the measurement chooses between.
"""
import argparse
import gc
import json
import os
import sys
import time

import numpy as np

ROWS = {'mlp64': 6000, 'mlp2048': 2000, 'cnn': 1500}    # runs of 0.1-2 s
QUICK_ROWS = 48
LABELS = {'mlp64': 'Dense(64)x2', 'mlp2048': 'Dense(2048)x2', 'cnn': 'small conv net'}
PLAIN, DIRECT, BATCHER, ALWAYS = 'plain', 'concurrent=False', 'batcher', 'merge=True'
OPTIONS = {DIRECT: {'concurrent': False}, BATCHER: {}, ALWAYS: {'merge': True}}


def _variants(always, steady=False):
    # (Steady: plain Keras would run patched; see the module's docstring.)
    return ([] if steady else [PLAIN]) + [DIRECT, BATCHER] + ([ALWAYS] if always else [])


def run_case(name, threads, rows, repeats, steady, always, say):
    import tensorflow as tf
    import keras_fastpredict as kfp
    from keras_fastpredict.adapters import keras as keras_adapter
    from keras_fastpredict.engine.concurrent_batcher import describe
    from . import cases, models
    from .report import check

    model = models.get(name)
    model._make_predict_function()
    X = models.data(model, rows)
    requests = [np.array(X[i:i + 1]) for i in range(rows)]     # copies: no read-ahead
    graph = tf.compat.v1.get_default_graph()

    def plain(x):
        with graph.as_default():
            return model.predict(x)

    def patched(x):
        return model.predict(x)

    kfp.unpatch()
    plain(requests[0])
    reference = cases.threaded(plain, requests, threads).outputs
    variants = _variants(always, steady)
    per_row = {v: [] for v in variants}
    latencies = {v: [] for v in variants}
    policy = None
    if steady:
        kfp.patch(**dict(kfp.DEFAULTS))
        patched(requests[0])
    for r in range(repeats):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            if v != PLAIN:
                options = dict(kfp.DEFAULTS, **OPTIONS[v])
                if not steady:
                    kfp.unpatch()
                kfp.patch(**options)
                patched(requests[0])        # the callable is made outside the timing
            elif not steady:
                kfp.unpatch()
            gc.collect()        # every run starts clean, whatever ran before it
            out = cases.threaded(plain if v == PLAIN else patched, requests, threads)
            why = check(reference, out.outputs)
            if why is not None:
                raise AssertionError('%s, %d threads, %s: outputs differ from plain Keras: %s'
                                     % (name, threads, v, why))
            per_row[v].append(out.elapsed / rows)
            latencies[v].extend(out.latencies)
            if v == BATCHER:
                entry = keras_adapter.lookup(model)
                state = describe(entry) if entry is not None else None
                policy = state if state is not None else policy
            if not steady:
                kfp.unpatch()
    kfp.unpatch()
    return {'model': name, 'threads': threads, 'rows': rows, 'per_row_s': per_row,
            'p50_ms': {v: 1e3 * float(np.percentile(latencies[v], 50)) for v in variants},
            'p99_ms': {v: 1e3 * float(np.percentile(latencies[v], 99)) for v in variants},
            'policy': policy}


def _ratios(result, over, of):
    """Paired per repeat: how many times faster ``of`` ran than ``over``."""
    a, b = result['per_row_s'].get(over, []), result['per_row_s'].get(of, [])
    return [x / y for x, y in zip(a, b)]


def _fmt(ratios):
    if not ratios:
        return '-'
    return '%.2fx (%.2f-%.2f)' % (float(np.median(ratios)), min(ratios), max(ratios))


def table(results, always):
    head = ['model', 'threads', 'plain rows/s', 'direct rows/s', 'batcher rows/s',
            'batcher / direct', 'batcher / plain', 'direct / plain',
            'p50 / p99 ms plain', 'p50 / p99 ms batcher']
    if always:
        head.insert(7, 'merge=True / direct')
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for res in results:
        rate = {v: '%.0f' % (1.0 / float(np.median(t))) for v, t in res['per_row_s'].items()}
        tails = {v: '%.3g / %.3g' % (res['p50_ms'][v], res['p99_ms'][v]) for v in res['p50_ms']}
        row = [LABELS.get(res['model'], res['model']), str(res['threads']),
               rate.get(PLAIN, '-'), rate[DIRECT], rate[BATCHER],
               _fmt(_ratios(res, DIRECT, BATCHER)), _fmt(_ratios(res, PLAIN, BATCHER)),
               _fmt(_ratios(res, PLAIN, DIRECT)), tails.get(PLAIN, '-'), tails[BATCHER]]
        if always:
            row.insert(7, _fmt(_ratios(res, DIRECT, ALWAYS)))
        lines.append('| ' + ' | '.join(row) + ' |')
    return '\n'.join(lines)


def targets(results):
    """The issue's targets: the batcher at least as fast as concurrent=False everywhere
    (5% noise allowed, as python -m benchmarks allows), and 16 threads 5x plain on the
    Dense models."""
    out = []
    for res in results:
        ratio = float(np.median(_ratios(res, DIRECT, BATCHER)))
        out.append(('%-4s %s, %d threads: batcher %.2fx of concurrent=False (target >= 1x)'
                    % ('PASS' if ratio >= 0.95 else 'FAIL', res['model'], res['threads'],
                       ratio)))
        if (res['threads'] == 16 and res['model'] in ('mlp64', 'mlp2048')
                and PLAIN in res['per_row_s']):
            ratio = float(np.median(_ratios(res, PLAIN, BATCHER)))
            out.append('%-4s %s, 16 threads: batcher %.2fx of plain (target >= 5x)'
                       % ('PASS' if ratio >= 5 else 'FAIL', res['model'], ratio))
    return '\n'.join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m benchmarks.threads', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', default='mlp64,mlp2048,cnn')
    parser.add_argument('--threads', default='1,2,4,8,16')
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--steady', action='store_true',
                        help='patch once per case: measurements carry over between repeats')
    parser.add_argument('--always', action='store_true', help='also time merge=True')
    parser.add_argument('--quick', action='store_true', help='tiny sizes (for a test)')
    parser.add_argument('--policy', action='store_true',
                        help="print the merge policy's state after each case")
    parser.add_argument('--json', help='also write the results here')
    args = parser.parse_args(argv)
    from .__main__ import _quiet
    _quiet()
    names = [m for m in args.models.split(',') if m]
    counts = [int(t) for t in args.threads.split(',') if t]
    started = time.time()
    load = [os.getloadavg()]
    print('%s, %d cores, load average %.2f %.2f %.2f; %d repeats, %s'
          % (time.strftime('%Y-%m-%d %H:%M'), len(os.sched_getaffinity(0)), *load[0],
             args.repeats, 'steady (one patch per case)' if args.steady
             else 'cold (a fresh patch per run)'), flush=True)
    results = []
    for name in names:
        for threads in counts:
            rows = QUICK_ROWS if args.quick else ROWS[name]
            res = run_case(name, threads, rows, args.repeats, args.steady, args.always, print)
            res['load'] = os.getloadavg()[0]
            results.append(res)
            print('  %-8s %2d threads: batcher/direct %s, batcher/plain %s, load %.2f'
                  % (name, threads, _fmt(_ratios(res, DIRECT, BATCHER)),
                     _fmt(_ratios(res, PLAIN, BATCHER)), res['load']), flush=True)
            if args.policy and res['policy']:
                for level in res['policy']['levels']:
                    print('      %s' % level)
    load.append(os.getloadavg())
    print()
    print(table(results, args.always))
    print()
    print(targets(results))
    print('\n%.0f s; load average at the end %.2f %.2f %.2f'
          % (time.time() - started, *load[-1]))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'args': vars(args), 'load': load, 'results': results}, f, indent=1)
    _release()
    return 0


def _release():
    """Free session callables while TensorFlow is still loaded (see __main__._release)."""
    from . import models
    models._built.clear()
    gc.collect()


if __name__ == '__main__':
    sys.exit(main())
