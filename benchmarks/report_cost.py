"""python -m benchmarks.report_cost [--calls N] [--repeats R]

What the call-site report costs per call (issue 14): the same loop of one-row
``model.predict`` calls on Dense(64)x2, and of ``sess.run`` calls of its output, patched
with the report off and on, interleaved in one process; the median over repeats of the
difference per call. The report's samples
(the first calls of each site, where results are watched) are measured apart from its
steady state. The target: under 1 us per call in the steady state.
"""
import argparse
import os
import time
import warnings

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
warnings.simplefilter('ignore')


def _loop(call, rows):
    t0 = time.perf_counter()
    for x in rows:
        call(x)
    return time.perf_counter() - t0


def _recorder_alone(rep, n=50000, repeats=15):
    """The recorder's own cost per call, steady state: the best of ``repeats`` loops of a
    stub entry (it bumps the counters a fast-path call bumps) with and without it."""
    import numpy as np
    from keras_fastpredict import counters

    class Model(object):
        pass
    model = Model()
    stats = counters.for_model(model)
    out = np.zeros((1, 10), 'float32')
    x = np.zeros((1, 32), 'float32')

    def stub(wrapped, instance, args, kwargs):
        stats.calls += 1
        stats.fast_calls += 1
        return out
    recorded = rep.wrap('Model.predict', stub)
    rep._plain[(stats, 1)] = (1e-4, 1)          # as if plain Keras had been timed

    def loop(fn):
        t0 = time.perf_counter()
        for _ in range(n):
            fn(None, model, (x,), {})
        return (time.perf_counter() - t0) / n
    loop(recorded)                                 # past the site's samples
    bare = min(loop(stub) for _ in range(repeats))
    wrapped = min(loop(recorded) for _ in range(repeats))
    return 1e6 * (wrapped - bare)


def _measure(kfp, rep, call, rows, repeats):
    """Per-call seconds of ``call`` over ``rows`` with the report off and on (interleaved),
    and on for a site's first (sampled) calls."""
    off, on, first = [], [], []
    for _ in range(repeats):
        for report in (False, True):
            kfp.patch(report=report)
            rep.reset()
            kfp.reset_stats()
            call(rows[0])                               # the entry is built
            call(rows[1])
            if report:
                first.append(_loop(call, rows[:rep.WATCH_CALLS]) / rep.WATCH_CALLS)
            else:
                _loop(call, rows[:rep.WATCH_CALLS])
            (on if report else off).append(_loop(call, rows) / len(rows))
            kfp.unpatch()
    return off, on, first


def _print(np, title, off, on, first, watch):
    off_us, on_us = 1e6 * np.median(off), 1e6 * np.median(on)
    diffs = sorted(1e6 * (b - a) for a, b in zip(off, on))
    print(title)
    print('  report off                    %7.2f us per call' % off_us)
    print('  report on (steady state)      %7.2f us per call   +%.2f us (paired median '
          '%+.2f, range %+.2f..%+.2f)' % (on_us, on_us - off_us, float(np.median(diffs)),
                                         diffs[0], diffs[-1]))
    print('  report on, first %d calls of a site (results watched, frames compared): '
          '%.2f us per call' % (watch, 1e6 * np.median(first)))


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m benchmarks.report_cost')
    parser.add_argument('--calls', type=int, default=3000)
    parser.add_argument('--repeats', type=int, default=7)
    args = parser.parse_args(argv)
    import numpy as np
    import keras
    from keras import backend as K, layers
    import keras_fastpredict as kfp
    import keras_fastpredict.report  # noqa: F401
    rep = __import__('sys').modules['keras_fastpredict.report']

    np.random.seed(0)
    model = keras.models.Sequential([layers.Dense(64, activation='relu', input_shape=(32,)),
                                     layers.Dense(64, activation='relu'), layers.Dense(10)])
    # Fresh one-row arrays: the fast path alone (read-ahead would hide the per-call cost).
    rows = [np.random.rand(1, 32).astype('float32') for _ in range(args.calls)]
    sess = K.get_session()
    output, inp = model.output, model.input
    cases = [
        ('one-row model.predict calls (fast path)', lambda x: model.predict(x)),
        ('one-row sess.run(model.output, {model.input: x}) calls (fast path)',
         lambda x: sess.run(output, {inp: x})),
    ]
    for title, call in cases:
        off, on, first = _measure(kfp, rep, call, rows, args.repeats)
        _print(np, 'report cost, Dense(64)x2, %d %s, median of %d:' % (
            args.calls, title, args.repeats), off, on, first, rep.WATCH_CALLS)
    print('the recorder alone (around a stub wrapper, no TensorFlow): +%.2f us per call'
          % _recorder_alone(rep))


if __name__ == '__main__':
    main()
