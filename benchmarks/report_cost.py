"""python -m benchmarks.report_cost [--calls N] [--pairs P]

What the call-site report costs per call (issue 14), in its steady state (after each
site's sample): loops of one-row calls on Dense(64)x2, patched with the report off and
on. Off and on alternate in short blocks of ``--calls`` calls (``--pairs`` pairs, the
order flipped every pair, so that the machine's slow drifts cancel); the figure is the
median over pairs of the difference per call. Loops: ``model.predict`` on fresh arrays
(the fast path alone) and on rows of one array (read-ahead, the default), ``sess.run`` of
the model's output on both, and ``K.function`` on fresh arrays. Then the recorders alone,
around stub entries with no TensorFlow (best of repeated loops), with the usual call in C
and in Python (where the extension is not built): the part of the cost that is the
report's own code. The target: under 1 us per call.
"""
import argparse
import os
import sys
import time
import warnings

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
warnings.simplefilter('ignore')


def _block(call, xs):
    t0 = time.perf_counter()
    for x in xs:
        call(x)
    return (time.perf_counter() - t0) / len(xs)


def _paired(kfp, call, xs, pairs):
    """(off, on) seconds per call in each of ``pairs`` pairs of blocks."""
    kfp.patch(report=True)
    for _ in range(3):              # the entry is built, the site's sample taken
        _block(call, xs)
    out = []
    for p in range(pairs):
        t = {}
        for report in ((False, True) if p % 2 else (True, False)):
            kfp.patch(report=report)
            _block(call, xs[:20])
            t[report] = _block(call, xs)
        out.append((t[False], t[True]))
    kfp.unpatch()
    return out


def _stub_costs(rep, n=50000, repeats=15):
    """The recorders' own cost per call, steady state, around stub entries that bump the
    counters a served call bumps: (predict's recorder, an announcing adapter's)."""
    import numpy as np
    from keras_fastpredict import counters
    out = np.zeros((1, 10), 'float32')
    x = np.zeros((1, 32), 'float32')

    class Model(object):
        pass
    model = Model()
    mstats = counters.for_model(model)

    def predict(wrapped, instance, args, kwargs):
        mstats.calls += 1
        mstats.fast_calls += 1
        return out

    class State(object):
        compiled = None
        stats = counters.ModelStats('stub')

        def is_pure(self, phase):
            return True
    state = State()

    class Adapter(object):
        announce = None

        @rep.announcing
        def run(self, wrapped, session, args, kwargs):
            value = args[1]['x']
            if self.announce is not None:
                self.announce(state, value)
            state.stats.calls += 1
            state.stats.fast_calls += 1
            return out
    adapter = Adapter()
    session = Model()
    feed = {'x': x}
    plain = sys.modules['keras_fastpredict.report.plain']
    plain._cache[(mstats, 1)] = plain._cache[(state.stats, 1)] = (1e-4, 1)   # as if timed

    def best(fn, instance, args):
        def loop():
            t0 = time.perf_counter()
            for _ in range(n):
                fn(None, instance, args, {})
            return (time.perf_counter() - t0) / n
        loop()                                          # past the site's sample
        return min(loop() for _ in range(repeats))

    costs = []
    for path, wrapper, instance, args in (('Model.predict', predict, model, (x,)),
                                          ('Stub.run', adapter.run, session, ('y', feed))):
        recorded = rep.wrap(path, wrapper)
        with_report = best(recorded, instance, args)
        announce, adapter.announce = adapter.announce, None
        bare = best(wrapper, instance, args)
        adapter.announce = announce
        costs.append(1e6 * (with_report - bare))
    rep.stop_announcing()
    return costs


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m benchmarks.report_cost')
    parser.add_argument('--calls', type=int, default=400, help='calls per block')
    parser.add_argument('--pairs', type=int, default=41)
    parser.add_argument('--python', action='store_true',
                        help='the loops with the usual call in Python (as where the C '
                             'extension is not built)')
    args = parser.parse_args(argv)
    import numpy as np
    import keras
    from keras import backend as K, layers
    import keras_fastpredict as kfp
    from keras_fastpredict.report import calls as recording
    built = recording.Recorder
    if args.python:
        recording.Recorder = None

    np.random.seed(0)
    model = keras.models.Sequential([layers.Dense(64, activation='relu', input_shape=(32,)),
                                     layers.Dense(64, activation='relu'), layers.Dense(10)])
    n = args.calls
    fresh = [np.random.rand(1, 32).astype('float32') for _ in range(n)]
    X = np.random.rand(n, 32).astype('float32')
    views = [X[i:i + 1] for i in range(n)]
    sess = K.get_session()
    output, inp = model.output, model.input
    fn = K.function([inp], [output])
    cases = [
        ('model.predict(x), fresh arrays (fast path)', lambda x: model.predict(x), fresh),
        ('model.predict(X[i:i+1]) (read-ahead)', lambda x: model.predict(x), views),
        ('sess.run(output, {input: x}), fresh arrays', lambda x: sess.run(output, {inp: x}),
         fresh),
        ('sess.run(output, {input: X[i:i+1]}) (read-ahead)',
         lambda x: sess.run(output, {inp: x}), views),
        ('K.function([input], [output])([x]), fresh arrays', lambda x: fn([x]), fresh),
    ]
    print('report cost per call, steady state, usual call in %s, Dense(64)x2, one row per '
          'call: median over %d pairs of %d-call blocks, off and on interleaved'
          % ('Python' if recording.Recorder is None else 'C', args.pairs, n))
    print('  %-52s %9s %9s %10s %17s' % ('loop', 'off us', 'on us', 'added us',
                                         'middle half'))
    for title, call, xs in cases:
        pairs = _paired(kfp, call, xs, args.pairs)
        off = 1e6 * np.median([a for a, _ in pairs])
        on = 1e6 * np.median([b for _, b in pairs])
        diffs = 1e6 * np.array([b - a for a, b in pairs])
        q1, q3 = np.percentile(diffs, [25, 75])
        print('  %-52s %9.2f %9.2f %+10.2f %+8.2f..%+.2f' % (title, off, on, np.median(diffs),
                                                          q1, q3))
    recorders = [('C', built), ('Python', None)] if built else [('Python (C not built)', None)]
    rep = sys.modules['keras_fastpredict.report']
    for label, recorder in recorders:
        recording.Recorder = recorder
        predict_us, announced_us = _stub_costs(rep)
        print('the recorders alone, around stub entries (no TensorFlow), usual call in %s: '
              'predict +%.2f us, Session.run / K.function (announcing) +%.2f us per call'
              % (label, predict_us, announced_us))
    recording.Recorder = built
    del cases, fn
    K.clear_session()       # (callables freed at interpreter teardown print errors)


if __name__ == '__main__':
    main()
