"""python -m benchmarks.plain_estimate [--rounds R] [--calls N] [--model dense|lstm]

How close the call-site report's plain figure is to plain Keras: per loop kind (one-row
``model.predict``, ``sess.run`` of the model's output and ``K.function`` calls on fresh
arrays), rounds alternate an unpatched loop (each call timed; its median) with a loop
under ``patch(report=True)`` whose site's plain estimate per call is read from the report
(the counters and plain figures reset before it; ``--calls`` calls, past the site's
sample, so plain is timed again at its end). The order flips every round. Printed: the
medians over rounds and their ranges, and the estimate / unpatched ratio (1.00: the
estimate is plain Keras' time; it measures the original once per row count, 1 warm-up
and the median of 3 runs, so it scatters more than the loop's median).
"""
import argparse
import os
import time
import warnings

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
warnings.simplefilter('ignore')


def _unpatched(call, xs):
    """Median seconds per call of a loop with nothing patched."""
    import numpy as np
    times = []
    for x in xs:
        t0 = time.perf_counter()
        call(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _estimated(kfp, call, xs):
    """The report's plain estimate per call for the loop's site, and the site's own usual
    call time (None where not known)."""
    kfp.patch(report=True)
    kfp.reset_stats()
    for x in xs:
        call(x)
    sites = [s for s in kfp.report()['sites'] if s['calls'] == len(xs)]
    kfp.unpatch()
    assert len(sites) == 1, [s['site'] for s in kfp.report()['sites']]
    site = sites[0]
    if site['plain_estimate'] != 'measured':
        raise RuntimeError('plain not timed: %s' % site['plain_estimate'])
    return site['plain_estimate_s'] / site['plain_estimate_calls'], site['usual_call_s']


def _model(kind):
    import keras
    from keras import layers
    if kind == 'lstm':
        return keras.models.Sequential([layers.LSTM(32, input_shape=(20, 8)),
                                        layers.Dense(3)]), (20, 8)
    return keras.models.Sequential([layers.Dense(64, activation='relu', input_shape=(32,)),
                                    layers.Dense(64, activation='relu'),
                                    layers.Dense(10)]), (32,)


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m benchmarks.plain_estimate')
    parser.add_argument('--rounds', type=int, default=9)
    parser.add_argument('--calls', type=int, default=300, help='calls per loop')
    parser.add_argument('--model', choices=('dense', 'lstm'), default='dense')
    args = parser.parse_args(argv)
    import numpy as np
    from keras import backend as K
    import keras_fastpredict as kfp

    np.random.seed(0)
    model, shape = _model(args.model)
    xs = [np.random.rand(1, *shape).astype('float32') for _ in range(args.calls)]
    sess = K.get_session()
    output, inp = model.output, model.input
    fn = K.function([inp], [output])
    cases = [('model.predict(x)', lambda x: model.predict(x)),
             ('sess.run(output, {input: x})', lambda x: sess.run(output, {inp: x})),
             ('K.function([input], [output])([x])', lambda x: fn([x]))]
    for _, call in cases:               # Keras' and TF's own first calls
        _unpatched(call, xs[:20])
    print('plain estimate against unpatched Keras, %s model, one-row calls on fresh arrays:'
          ' %d rounds of %d-call loops, unpatched and report alternated; medians over '
          'rounds [min..max]' % (args.model, args.rounds, args.calls))
    print('  %-36s %22s %22s %22s %8s' % ('loop', 'unpatched us/call', 'estimate us/call',
                                          'report usual us/call', 'ratio'))
    for title, call in cases:
        plain, estimate, ours = [], [], []
        for r in range(args.rounds):
            for report in ((True, False) if r % 2 else (False, True)):
                if report:
                    e, u = _estimated(kfp, call, xs)
                    estimate.append(e)
                    if u is not None:
                        ours.append(u)
                else:
                    plain.append(_unpatched(call, xs))
        ratios = np.array(estimate) / np.array(plain)

        def fig(values):
            if not values:
                return '-'
            v = 1e6 * np.array(values)
            return '%.1f [%.1f..%.1f]' % (np.median(v), v.min(), v.max())
        print('  %-36s %22s %22s %22s %8.2f  [%.2f..%.2f]' % (
            title, fig(plain), fig(estimate), fig(ours), np.median(ratios), ratios.min(),
            ratios.max()))
    del cases, fn
    K.clear_session()       # (callables freed at interpreter teardown print errors)


if __name__ == '__main__':
    main()
