"""python -m benchmarks.threads_ab [--model mlp64] [--threads 8] [--blocks 21] [--calls 4000]
                                 [--options K=V,..] [--against K=V,..] [--control] [--cold]
                                 [--no-bypass] [--count] [--json FILE]

The concurrent batcher against ``concurrent=False`` in one process: one patch, the two
variants alternated block by block (which goes first swapped each block), ``--blocks``
blocks of ``--calls`` one-row calls from ``--threads`` threads, after a warm-up block. A
shared machine's load changes over seconds; blocks of a fraction of a second each, taken
in turn, meet about the same load, so the per-block ratio is paired. Per variant: wall
time a call, process CPU time a call (all threads, TensorFlow's included) and thread
switches a call (getrusage of the process), medians with ranges; and the share of the
batcher's calls that queued. ``--control`` runs ``concurrent=False`` both ways (A/A: how
far apart the same code measures); ``--options``/``--against`` set either variant's
options (Python literals, e.g. ``--against merge=False``); ``--cold`` patches afresh
before each block (the policy and calibrations start from nothing, as benchmarks.threads
does by default); ``--no-bypass`` keeps the batcher's bookkeeping on for every call;
``--count`` counts per batcher call the bypassed ones and the calls of Batcher.submit (all
slots busy), _queued, _lead, _wake_leader and _review (the counting adds a little time to
the batcher's calls: time without it). Every output is checked against plain Keras'.
"""
import argparse
import ast
import json
import os
import resource
import sys
import threading
import time

import numpy as np

DIRECT, BATCHER = 'concurrent=False', 'batcher'


def _block(predict, requests, threads):
    """Each thread calls ``predict`` on its share of ``requests``; (outputs, wall s, CPU s,
    context switches)."""
    n = len(requests)
    results = [None] * n
    errors = []
    barrier = threading.Barrier(threads + 1)

    def work(k):
        barrier.wait()
        try:
            for i in range(k, n, threads):
                results[i] = predict(requests[i])
        except Exception as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu, wall = time.process_time(), time.perf_counter()
    for w in workers:
        w.join()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_SELF)
    if errors:
        raise errors[0]
    switches = (after.ru_nvcsw - usage.ru_nvcsw) + (after.ru_nivcsw - usage.ru_nivcsw)
    return results, wall, cpu, switches


class Counts(object):
    """Which way the batcher's calls went: wraps its methods (only with --count)."""

    def __init__(self):
        from keras_fastpredict.engine import concurrent_batcher as cb
        self.counts = {'entered': 0}
        for name in ('submit', '_queued', '_lead', '_review', '_wake_leader'):
            self._wrap(cb.Batcher, name)
        original, counts = cb.submit, self.counts

        def submit(*args):
            # (engine.route calls the module's submit unless the call bypasses the batcher)
            counts['entered'] += 1
            return original(*args)
        cb.submit = submit

    def _wrap(self, cls, name):
        original = getattr(cls, name)
        counts = self.counts
        counts[name] = 0

        def counted(*args, **kwargs):
            counts[name] += 1       # (not atomic: a close count, enough here)
            return original(*args, **kwargs)
        setattr(cls, name, counted)

    def take(self):
        out = dict(self.counts)
        for name in self.counts:
            self.counts[name] = 0
        return out


def _calls_so_far(batcher):
    return int(repr(batcher.calls)[6:-1])      # itertools.count(N): N, without taking one


def _options(text):
    options = {}
    for item in filter(None, text.split(',')):
        name, value = item.split('=')
        options[name] = ast.literal_eval(value)
    return options


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m benchmarks.threads_ab', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='mlp64')
    parser.add_argument('--threads', type=int, default=8)
    parser.add_argument('--blocks', type=int, default=21)
    parser.add_argument('--calls', type=int, default=4000)
    parser.add_argument('--count', action='store_true')
    parser.add_argument('--control', action='store_true',
                        help='A/A: both variants concurrent=False (how far apart the same '
                             'code measures)')
    parser.add_argument('--options', default='',
                        help="the batcher variant's options, e.g. merge=False (Python literals)")
    parser.add_argument('--against', default='concurrent=False',
                        help="the other variant's options (default concurrent=False)")
    parser.add_argument('--cold', action='store_true',
                        help='patch afresh before each block (as benchmarks.threads does by '
                             'default): the policy and the calibrations start from nothing')
    parser.add_argument('--no-bypass', action='store_true',
                        help="the batcher's bookkeeping on every call (its bypass off): "
                             'what the counted path costs')
    parser.add_argument('--json')
    args = parser.parse_args(argv)
    options, against = _options(args.options), _options(args.against)
    from .__main__ import _quiet
    _quiet()
    from . import models

    counts = Counts() if args.count else None
    if args.no_bypass:
        from keras_fastpredict.engine import concurrent_batcher
        concurrent_batcher.Batcher._review = lambda self, i: None
    load = [os.getloadavg()]
    print('%s, %s, %d threads, %d blocks of %d calls, load average %.2f %.2f %.2f; '
          "'batcher': %s, 'concurrent=False': %s"
          % (time.strftime('%Y-%m-%d %H:%M:%S'), args.model, args.threads, args.blocks,
             args.calls, *load[0], 'as the other' if args.control else options or 'defaults',
             against), flush=True)
    got = compare(args.model, args.threads, args.blocks, args.calls, options, against,
                  control=args.control, cold=args.cold, counts=counts)
    per, ways, policy, ratio = got['per_call'], got['ways'], got['policy'], got['ratio']
    load.append(os.getloadavg())

    def fmt(values, scale=1.0, digits=2):
        values = [scale * x for x in values]
        return '%.*f (%.*f-%.*f)' % (digits, float(np.median(values)), digits, min(values),
                                     digits, max(values))

    cpu_ratio = [d / b for d, b in zip(per[DIRECT]['cpu'], per[BATCHER]['cpu'])]
    print('batcher speed / concurrent=False (wall, paired per block): %s' % fmt(ratio))
    print('CPU per call, concurrent=False / batcher (paired):          %s' % fmt(cpu_ratio))
    for v in (DIRECT, BATCHER):
        print('  %-16s wall %s us/call, CPU %s us/call, switches %s /call'
              % (v, fmt(per[v]['wall'], 1e6, 1), fmt(per[v]['cpu'], 1e6, 1),
                 fmt(per[v]['switches'])))
    keys = sorted({k for row in ways for k in row})
    print('  batcher calls, per call (median, range over blocks): '
          + ', '.join('%s %s' % (k, fmt([row.get(k, 0) for row in ways], digits=3))
                      for k in keys))
    print('  policy: %s' % policy)
    print('load average at the end %.2f %.2f %.2f' % load[-1])
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'args': vars(args), 'load': load, 'per_call': per, 'ways': ways,
                       'ratio': ratio}, f, indent=1)
    from .__main__ import _release
    _release([])     # (session callables freed while TensorFlow is loaded)
    return 0


def compare(model_name, threads, blocks, calls, options=None, against=None, control=False,
            cold=False, counts=None):
    """The batcher (``options``) against ``against`` (default concurrent=False) on
    ``model_name``: ``blocks`` paired blocks of ``calls`` one-row calls from ``threads``
    threads, after an untimed one; every output checked against plain Keras'. Leaves the
    package unpatched. A dict: 'ratio' (per block, the other's wall time over the
    batcher's: above 1 the batcher was faster), 'per_call' (per variant and block: wall,
    CPU, switches per call), 'ways' (per block: the share of the batcher's calls that
    queued, and ``counts``'), 'policy'."""
    import tensorflow as tf
    import keras_fastpredict as kfp
    from keras_fastpredict.adapters import keras as keras_adapter
    from keras_fastpredict.engine.concurrent_batcher import describe
    from . import models
    from .report import check

    options = options or {}
    against = {'concurrent': False} if against is None else against
    model = models.get(model_name)
    model._make_predict_function()
    X = models.data(model, calls)
    requests = [np.array(X[i:i + 1]) for i in range(calls)]     # copies: no read-ahead
    graph = tf.compat.v1.get_default_graph()

    def plain(x):
        with graph.as_default():
            return model.predict(x)

    kfp.unpatch()
    reference = [plain(x) for x in requests]
    kfp.patch()
    model.predict(requests[0])
    per = {v: {'wall': [], 'cpu': [], 'switches': []} for v in (DIRECT, BATCHER)}
    ways = []
    for b in range(blocks + 1):                # block 0: warm-up, not counted
        order = (DIRECT, BATCHER) if b % 2 else (BATCHER, DIRECT)
        for v in order:
            if cold:
                kfp.unpatch()
            if v == BATCHER and not control:
                kfp.patch(**dict(kfp.DEFAULTS, **options))
            else:
                kfp.patch(**dict(kfp.DEFAULTS, **against))
            if cold:
                model.predict(requests[0])      # the callable is made outside the timing
            entry = keras_adapter.lookup(model)
            batcher = entry.batcher
            batcher = batcher if v == BATCHER else None
            before = _calls_so_far(batcher) if batcher is not None else 0
            queued = entry.stats.queued
            if counts:
                counts.take()
            out, wall, cpu, switches = _block(model.predict, requests, threads)
            why = check(reference, out)
            if why is not None:
                raise AssertionError('%s: outputs differ from plain Keras: %s' % (v, why))
            if not b:
                continue
            n = len(requests)
            per[v]['wall'].append(wall / n)
            per[v]['cpu'].append(cpu / n)
            per[v]['switches'].append(switches / n)
            if v == BATCHER and entry.batcher is not None:
                batcher = entry.batcher
                calls = _calls_so_far(batcher) - before
                row = {'queued': (entry.stats.queued - queued) / max(calls, 1)}
                if counts:
                    taken = counts.take()
                    taken['bypassed'] = calls - taken.pop('entered')
                    row.update({k: c / max(calls, 1) for k, c in taken.items()})
                ways.append(row)
    policy = describe(keras_adapter.lookup(model))
    kfp.unpatch()
    ratio = [d / b for d, b in zip(per[DIRECT]['wall'], per[BATCHER]['wall'])]
    return {'ratio': ratio, 'per_call': per, 'ways': ways, 'policy': policy}


# The grid for "the batcher is never slower than concurrent=False": models, thread
# counts, and calls per block (blocks of 0.1-0.5 s: long against the batcher's first
# review, 512 calls, short against the load's swings).
NEVER_SLOWER = {'mlp64': 4000, 'mlp2048': 400, 'cnn': 1500}
NEVER_SLOWER_THREADS = (1, 2, 4, 8, 16)
LABELS = {'mlp64': 'Dense(64)x2', 'mlp2048': 'Dense(2048)x2', 'cnn': 'small conv net'}


def never_slower(models=NEVER_SLOWER, threads=NEVER_SLOWER_THREADS, blocks=15, alpha=0.05,
                 say=print):
    """[(passed, line)] per model: the batcher against concurrent=False at each thread
    count, ``blocks`` paired blocks each (``compare``). A count fails when the batcher was
    slower beyond chance: a one-sided Wilcoxon signed-rank test on the blocks' log ratios,
    at ``alpha`` over all the counts and models together (Bonferroni), in two runs: a
    count found slower is measured again, and fails only if found slower again (a shared
    machine's load is not the test's independent noise: make bench at 17:45 flagged
    Dense(2048)x2 at 2 threads, p=0.0013, where both run the same code, and three runs
    after it read 0.99x-1.06x, its A/A 1.01x). A median alone, of a few unpaired runs,
    read 0.79x on code that bypasses the batcher."""
    from scipy.stats import wilcoxon
    checks = len(models) * len(threads)

    def measured(name, k, calls):
        ratio = compare(name, k, blocks, calls)['ratio']
        logs = np.log(ratio)
        p = wilcoxon(logs, alternative='less').pvalue if np.any(logs) else 1.0
        return ratio, p, p < alpha / checks

    out = []
    for name, calls in models.items():
        parts, ok = [], True
        for k in threads:
            ratio, p, slower = measured(name, k, calls)
            note = ''
            if slower:
                again, p2, slower = measured(name, k, calls)
                note = (' SLOWER p=%.2g, again %.2fx p=%.2g' if slower else
                        ' (p=%.2g, not so again: %.2fx p=%.2g)') % (
                            p, float(np.median(again)), p2)
            ok = ok and not slower
            parts.append('%d thr %.2fx (%.2f-%.2f)%s' % (k, float(np.median(ratio)),
                                                           min(ratio), max(ratio), note))
            say('  paired %s, %d threads: %s' % (name, k, parts[-1]))
        out.append((ok, '%s  %s, concurrent batcher vs fast path alone (concurrent=False), '
                    'paired, %d blocks each: %s (target: not slower at any count; one-sided '
                    'Wilcoxon, alpha %g over %d checks, a slower count measured again)'
                    % ('PASS' if ok else 'FAIL', LABELS.get(name, name), blocks,
                       ', '.join(parts), alpha, checks)))
    return out

if __name__ == '__main__':
    sys.exit(main())
