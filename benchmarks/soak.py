"""Soak: a million patched predict calls on a small Dense model, checking memory and graph.

The calls are shared between four ways in, run in rounds so that each is exercised all
along: the plain fast path (one fresh row per call), read-ahead (walking the rows of an
array), deferral (a ``batching()`` block per round, every result read), and four threads
calling at once (the concurrent batcher). RSS (``VmRSS`` of /proc/self/status) is read
after a warm-up and at the end, and the model graph's op count at the start and the end.
Exits 1 if RSS grew more than ``--rss-tolerance-mb`` or any op was added, or if a sampled
result differs from plain Keras.

``--mode tf1`` soaks the TensorFlow 1 ways in instead (issue 11): ``sess.run`` of the
model's output on fresh rows and walking an array, ``K.function`` per row, and
``sess.run`` of a hidden layer with the learning phase fed 0 (a plain cached callable).

``--mode decoder`` soaks a recurrent decoder (issue 21): a seq2seq decoder's inference
loop, LSTM(128) one step per call, its token and states fed back, so that its inference
graph is built, checked and used along the way. Its one-time ops are counted after the
warm-up (then no op may be added).

    .venv/bin/python benchmarks/soak.py [--calls 1000000] [--rss-tolerance-mb 50]
        [--mode tf1|decoder]
"""
import argparse
import gc
import os
import sys
import threading
import time
import warnings

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
warnings.filterwarnings('ignore')

import numpy as np  # noqa: E402

MODES = ('fast', 'readahead', 'batching', 'threads')
DECODER_MODES = ('decoder',)
TF1_MODES = ('sess_run', 'sess_run_rows', 'k_function', 'sess_run_layer')
OFF_ENGINE = ('sess_run_layer',)    # served by a cached callable, not the model's engine
THREADS = 4


def rss_mb():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError('no VmRSS in /proc/self/status')


class Soak(object):
    def __init__(self, model, graph, session, x, expected, chunk):
        self.model = model
        self.graph = graph
        self.session = session
        self.x = x
        self.expected = expected
        self.chunk = chunk            # calls per mode per round
        self.calls = {mode: 0 for mode in MODES + TF1_MODES + DECODER_MODES}
        self.modes = MODES
        self.mismatches = 0
        self._pos = 0

    def _check(self, out, row):
        # A sample of results against plain Keras' answer for the same row.
        from keras_fastpredict.engine.verification import within_tolerance
        if not within_tolerance(np.asarray(out), self.expected[row:row + 1]):
            self.mismatches += 1

    def fast(self, n):
        x, predict = self.x, self.model.predict
        rows = len(x)
        for i in range(n):
            row = (self._pos + i) % rows
            out = predict(x[row].reshape(1, -1).copy())      # fresh array: no read-ahead
            if i % 97 == 0:
                self._check(out, row)
        self._pos += n
        self.calls['fast'] += n

    def readahead(self, n):
        x, predict = self.x, self.model.predict
        rows = len(x)
        for i in range(n):
            row = i % rows
            out = predict(x[row:row + 1])
            if i % 97 == 0:
                self._check(out, row)
        self.calls['readahead'] += n

    def batching(self, n):
        import keras_fastpredict as kfp
        x, predict = self.x, self.model.predict
        rows = len(x)
        with kfp.batching():
            outs = [predict(x[(self._pos + i) % rows].reshape(1, -1).copy()) for i in range(n)]
        for i in range(0, n, 97):
            self._check(outs[i], (self._pos + i) % rows)
        total = sum(float(np.asarray(o)[0, 0]) for o in outs)      # every result read
        if not np.isfinite(total):
            self.mismatches += 1
        self._pos += n
        self.calls['batching'] += n

    def threads(self, n):
        per_thread = n // THREADS
        start = threading.Barrier(THREADS)
        errors = []

        def work(k):
            try:
                with self.graph.as_default(), self.session.as_default():
                    x, predict = self.x, self.model.predict
                    rows = len(x)
                    start.wait()
                    for i in range(per_thread):
                        row = (k * per_thread + i) % rows
                        out = predict(x[row].reshape(1, -1).copy())
                        if i % 97 == 0:
                            self._check(out, row)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(exc)
        threads = [threading.Thread(target=work, args=(k,)) for k in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        self.calls['threads'] += per_thread * THREADS

    # -- Session.run and K.function (issue 11) -----------------------------------------------

    def sess_run(self, n):
        x, run, model = self.x, self.session.run, self.model
        rows = len(x)
        for i in range(n):
            row = (self._pos + i) % rows
            out = run(model.output, {model.input: x[row].reshape(1, -1).copy()})
            if i % 97 == 0:
                self._check(out, row)
        self._pos += n
        self.calls['sess_run'] += n

    def sess_run_rows(self, n):
        x, run, model = self.x, self.session.run, self.model
        rows = len(x)
        for i in range(n):
            out = run(model.output, {model.input: x[i % rows][None]})
            if i % 97 == 0:
                self._check(out, i % rows)
        self.calls['sess_run_rows'] += n

    def k_function(self, n):
        from keras import backend as K
        if getattr(self, '_function', None) is None:
            self._function = K.function([self.model.input], [self.model.output])
        x, f = self.x, self._function
        rows = len(x)
        for i in range(n):
            row = (self._pos + i) % rows
            out = f([x[row].reshape(1, -1).copy()])[0]
            if i % 97 == 0:
                self._check(out, row)
        self._pos += n
        self.calls['k_function'] += n

    def sess_run_layer(self, n):
        from keras import backend as K
        x, run, model = self.x, self.session.run, self.model
        hidden, phase = model.layers[1].output, K.learning_phase()
        rows = len(x)
        for i in range(n):
            out = run(hidden, {model.input: x[(self._pos + i) % rows][None], phase: 0})
            if out.shape != (1, 32):
                self.mismatches += 1
        self._pos += n
        self.calls['sess_run_layer'] += n

    def decoder(self, n):
        # One step per call, the sampled token and the states fed back (Keras blog's loop).
        model, state = self.model, self._start      # each round decodes from the start
        for i in range(n):
            token, h, c = state
            odds, h, c = model.predict([token, h, c])
            if i == 0 and self._expected_first is not None and not all(
                    within(a, e) for a, e in zip((odds, h, c), self._expected_first)):
                self.mismatches += 1
            token = np.zeros((1, 1, 40), 'float32')
            token[0, 0, int(odds[0, 0].argmax())] = 1
            state = (token, h, c)
        self.calls['decoder'] += n

    def round(self, n):
        for mode in self.modes:
            getattr(self, mode)(n)


def within(actual, expected):
    from keras_fastpredict.engine.verification import within_tolerance
    return within_tolerance(np.asarray(actual), expected)


def _decoder_soak(graph, session, chunk):
    """The seq2seq decoder of benchmarks/models.py, its plain first step, and its soak."""
    import keras_fastpredict as kfp
    try:
        from . import models as bench_models
    except ImportError:                 # run as a script: benchmarks/ is sys.path[0]
        import models as bench_models
    model = bench_models._seq2seq_decoder()
    token = np.zeros((1, 1, 40), 'float32')
    token[0, 0, 0] = 1
    state = (token, np.zeros((1, 128), 'float32'), np.zeros((1, 128), 'float32'))
    expected = model.predict(list(state))         # plain Keras, before patching
    kfp.patch()
    soak = Soak(model, graph, session, None, None, chunk)
    soak.modes = DECODER_MODES
    soak._start = state
    soak._expected_first = expected
    return model, soak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--calls', type=int, default=1000000,
                        help='patched predict calls in all (default 1000000)')
    parser.add_argument('--warmup', type=int, default=20000,
                        help='calls before the RSS baseline is read (default 20000)')
    parser.add_argument('--rss-tolerance-mb', type=float, default=50.0)
    parser.add_argument('--chunk', type=int, default=2000,
                        help='calls per mode per round (default 2000)')
    parser.add_argument('--features', type=int, default=16)
    parser.add_argument('--report-every', type=float, default=2.0,
                        help='seconds between progress lines (default 2)')
    parser.add_argument('--mode', choices=('predict', 'tf1', 'decoder'), default='predict',
                        help='predict (default): predict\'s ways in; tf1: Session.run and '
                             'K.function')
    args = parser.parse_args(argv)

    import tensorflow as tf
    tf.compat.v1.logging.set_verbosity(tf.compat.v1.logging.ERROR)
    from keras import layers
    from keras.models import Model
    import keras_fastpredict as kfp

    graph = tf.Graph()
    session = tf.compat.v1.Session(graph=graph)
    with graph.as_default(), session.as_default():
        if args.mode == 'decoder':
            model, soak = _decoder_soak(graph, session, args.chunk)
            x = None
        else:
            inp = layers.Input((args.features,))
            hidden = layers.Dense(32, activation='relu')(inp)
            model = Model(inp, layers.Dense(4)(hidden), name='soak_dense')
            x = np.random.RandomState(0).rand(512, args.features).astype('float32')
            expected = model.predict(x)          # plain Keras, before patching
            kfp.patch()
            soak = Soak(model, graph, session, x, expected, args.chunk)
        if args.mode == 'tf1':
            from keras import backend as K
            soak.modes = TF1_MODES
            # The script's own graph additions, made before the op count is read.
            soak._function = K.function([model.input], [model.output])
            K.learning_phase()
        ops_start = len(graph.get_operations())
        rss_start = rss_mb()
        print('soak: %d calls over %s (%d threads), model %s; start: RSS %.1f MB, %d ops'
              % (args.calls, ', '.join(soak.modes), THREADS, model.name, rss_start, ops_start))
        sys.stdout.flush()

        started = time.perf_counter()
        warm = min(args.warmup, args.calls)
        chunk = max(THREADS, min(args.chunk, max(1, warm // len(soak.modes))))
        done = 0
        rss_warm = None
        next_report = started + args.report_every
        while done < args.calls:
            if rss_warm is None and done >= warm:
                gc.collect()
                rss_warm = rss_mb()
                if args.mode == 'decoder':        # its inference graph was built by now
                    from keras_fastpredict.engine import compiled
                    compiled._join_makers()
                    ops_start = len(graph.get_operations())
                print('soak: after warm-up (%d calls): RSS %.1f MB, %d ops'
                      % (done, rss_warm, ops_start))
                chunk = args.chunk
            n = max(THREADS, min(chunk, (args.calls - done) // len(soak.modes)))
            n -= n % THREADS
            before = sum(soak.calls.values())
            soak.round(n)
            done += sum(soak.calls.values()) - before
            now = time.perf_counter()
            if now >= next_report:
                print('soak: %8d calls, %6.0f calls/s, RSS %.1f MB, %d ops'
                      % (done, done / (now - started), rss_mb(), len(graph.get_operations())))
                sys.stdout.flush()
                next_report = now + args.report_every
        elapsed = time.perf_counter() - started
        gc.collect()
        if rss_warm is None:
            rss_warm = rss_start
        rss_end = rss_mb()
        ops_end = len(graph.get_operations())
        stats = kfp.stats(model)

    print('soak: %d calls in %.1f s (%.0f calls/s): %s'
          % (done, elapsed, done / elapsed,
             ', '.join('%s %d' % (m, soak.calls[m]) for m in soak.modes)))
    print('soak: fast calls %d, fallbacks %d, deferred %d, batches %d (mean %.1f calls), '
          'read-ahead hits %d' % (stats['fast_calls'], stats['fallbacks'], stats['deferred'],
                                  stats['batches'], stats['mean_batch_size'],
                                  stats['readahead_hits']))
    print('soak: RSS start %.1f MB, after warm-up %.1f MB, end %.1f MB (%+.1f MB since '
          'warm-up, tolerance %.0f MB)' % (rss_start, rss_warm, rss_end, rss_end - rss_warm,
                                           args.rss_tolerance_mb))
    print('soak: graph ops start %d, end %d (%+d)' % (ops_start, ops_end, ops_end - ops_start))
    failures = []
    if rss_end - rss_warm > args.rss_tolerance_mb:
        failures.append('RSS grew by %.1f MB' % (rss_end - rss_warm))
    if ops_end != ops_start:
        failures.append('graph ops grew by %d' % (ops_end - ops_start))
    if soak.mismatches:
        failures.append('%d sampled results differ from plain Keras' % soak.mismatches)
    # The first call of each Session.run / K.function signature is the original's.
    on_engine = done - sum(soak.calls[m] for m in OFF_ENGINE) - (
        4 if args.mode == 'tf1' else 0)
    if args.mode == 'decoder':
        print('soak: inference graph: %s' % stats.get('inference_graph'))
    if stats['fast_calls'] < on_engine:
        failures.append('only %d of %d calls took the fast path' % (stats['fast_calls'], done))
    soak._function = None       # Keras' callable freed while TensorFlow is whole
    gc.collect()
    kfp.unpatch()
    if failures:
        print('soak: FAIL: ' + '; '.join(failures))
        return 1
    print('soak: OK')
    return 0


if __name__ == '__main__':
    sys.exit(main())
