"""Loop shapes, and the cases: one loop on one model, run in several variants.

A variant is the same loop with another way of predicting: plain Keras (the baseline and
the reference for the correctness check), peers a user could write by hand, the limit
(the raw session callable on the whole array at once), and keras_fastpredict patched.
The loops call ``predict(x)``, a stand-in bound to ``model.predict`` at call time, so the
patched variants go through the patched method exactly as a legacy script does.
"""
import contextlib
import io
import threading
import time
from collections import namedtuple

import numpy as np

import keras_fastpredict

from . import models

# role: 'unpatched' (baseline and reference), 'peer', 'limit', 'patched'.
# patch: None runs with keras_fastpredict unpatched; a dict runs under patch(**options).
# model: the model a variant runs, where not the case's own (its stats and warm-up call).
Variant = namedtuple('Variant', 'name role run patch model', defaults=(None,))
Timed = namedtuple('Timed', 'outputs elapsed latencies')   # loops that time themselves

THREADS = (1, 4, 16)
# (One name at every thread count: the threads plot follows a variant across them.)
MERGE_BOUND = 'raw callable, a row of each thread a run (a perfect merge)'

# Rows per loop, per model. A model runs only the loops listed for it.
FULL = {
    'mlp64': dict(collect=2000, immediate=2000, autoregressive=1000, large=50000, threads=2000),
    'mlp1024': dict(collect=1000, immediate=2000, large=20000),
    'mlp2048': dict(collect=300, threads=1000),
    'cnn': dict(collect=500, immediate=500, large=5000),
    'mobilenet': dict(collect=48, immediate=48, large=128),
    'lstm': dict(collect=1000, immediate=1000, autoregressive=500, large=10000),
    'two_io': dict(collect=1000, immediate=1000, large=20000),
    # Issue 10: recurrent loops, stateful models, and what Keras serves (fallbacks).
    'char_rnn': dict(autoregressive=300),
    'seq2seq': dict(autoregressive=300),
    'stateful_lstm': dict(stateful=1000),
    'subclassed': dict(fallback=1000),
    'mlp64_verbose': dict(fallback=500),
    # Issue 12: tf.keras (TensorFlow 1.15's own Keras, graph mode).
    'tfk_dense64': dict(collect=2000, immediate=2000, autoregressive=1000, threads=2000),
}
QUICK_ROWS = dict(collect=48, immediate=48, autoregressive=32, large=2000, threads=64,
                  stateful=32, fallback=32)
QUICK_MOBILENET = dict(collect=4, immediate=4, large=8)


# -- helpers over single- and multi-input data ------------------------------------------------

def rows(X, i, j):
    return X[i:j] if isinstance(X, np.ndarray) else [a[i:j] for a in X]


def row(X, i):
    return X[i][None] if isinstance(X, np.ndarray) else [a[i][None] for a in X]


def as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def unwrap(outputs):
    return outputs[0] if len(outputs) == 1 else list(outputs)


def join(results):
    """Per-call results -> one array per model output."""
    if isinstance(results[0], list):
        return [np.concatenate(column) for column in zip(*results)]
    return [np.concatenate(results)]


# -- the loop shapes ----------------------------------------------------------------------

def collect(predict, X, n):
    """Collect then use: every result is kept and looked at after the loop."""
    preds = []
    for i in range(n):
        preds.append(predict(row(X, i)))
    return join(preds)


def collect_batching(predict, X, n):
    """The same loop inside ``keras_fastpredict.batching()``: results are deferred."""
    preds = []
    with keras_fastpredict.batching():
        for i in range(n):
            preds.append(predict(row(X, i)))
    return join(preds)


def use_immediately(predict, X, n):
    """Each result is used at once (argmax); walks the rows of one array in order."""
    labels = np.empty(n, dtype=np.int64)
    kept = []                   # kept only for the correctness check
    for i in range(n):
        y = predict(rows(X, i, i + 1))
        labels[i] = np.argmax(as_list(y)[0])
        kept.append(y)
    return join(kept)


def autoregressive(predict, x, n, step):
    """The next input is built from the last output: nothing can be batched."""
    outs = []
    for _ in range(n):
        y = predict(x)
        outs.append(y)
        x = step(x, y)
    return join(outs)


def hand_batched(predict, X, n, batch_size=32):
    """The rewrite the seed document advises: ``model.predict`` on slices of 32 rows."""
    return join([predict(rows(X, i, i + batch_size)) for i in range(0, n, batch_size)])


def whole(predict, X, n):
    """One call on all rows."""
    return as_list(predict(rows(X, 0, n)))


def threaded(predict, requests, threads):
    """``threads`` threads share the requests (one row each, as a server receives them)
    and call ``predict`` once per request. Times the calls, not the thread start-up."""
    n = len(requests)
    results = [None] * n
    latencies = [[] for _ in range(threads)]
    errors = []
    barrier = threading.Barrier(threads + 1)

    def work(k):
        barrier.wait()
        try:
            for i in range(k, n, threads):
                start = time.perf_counter()
                results[i] = predict(requests[i])
                latencies[k].append(time.perf_counter() - start)
        except Exception as exc:          # reported by the caller
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.perf_counter()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return Timed(join(results), elapsed, [t for lat in latencies for t in lat])


# -- peers ----------------------------------------------------------------------------------

def _backend(model):
    """The model's own Keras backend (its session): Keras 2.2.5's or tf.keras'."""
    if models.is_tf_keras(model):
        from tensorflow.python.keras import backend
    else:
        from keras import backend
    return backend


def keras_function(model, warm):
    """``K.function([model.input], [model.output])``, as forums advise."""
    K = _backend(model)
    f = K.function(model.inputs, model.outputs)
    f(as_list(warm))                  # its session callable is made on the first call
    return lambda x: unwrap(f(as_list(x)))


def raw_callable(model, warm, inline=False):
    """The session callable on the model's feeds and fetches, with no Keras around it;
    ``inline`` runs it in the caller's thread (faster for one row, see the design notes)."""
    from tensorflow.core.protobuf import config_pb2
    K = _backend(model)
    options = config_pb2.CallableOptions()
    options.feed.extend(t.name for t in model.inputs)
    options.fetch.extend(t.name for t in model.outputs)
    if inline:
        options.run_options.inter_op_thread_pool = -1
    fn = K.get_session()._make_callable_from_options(options)
    fn(*as_list(warm))
    return lambda x: unwrap(fn(*as_list(x)))


# -- cases ----------------------------------------------------------------------------------

class Case(object):
    def __init__(self, model_name, loop, rows, threads=None):
        self.model_name = model_name
        self.loop = loop
        self.rows = rows
        self.threads = threads
        self.name = '%s/%s' % (model_name, loop if threads is None else 'threads-%d' % threads)
        self.model = None
        self.variants = None

    def setup(self):
        """Build the model, data and variants (keras_fastpredict must be unpatched)."""
        model = self.model = models.get(self.model_name)
        model._make_predict_function()
        X = models.data(model, self.rows)
        self._first = [np.array(a) for a in as_list(row(X, 0))]
        self.variants = getattr(self, '_' + self.loop)(model, X, self.rows)

    def warm(self, model=None):
        """One call outside the timing: the cached callable is built on the first call
        after patch() (unpatch() drops it), once per process in real use. ``model``: the
        variant's own, where it has one (None: the case's)."""
        (model or self.model).predict(unwrap(self._first))

    def _collect(self, model, X, n):
        def predict(x):
            return model.predict(x)

        def on_batch(x):
            return model.predict_on_batch(x)
        kfunc, raw = keras_function(model, row(X, 0)), raw_callable(model, row(X, 0))
        return [
            Variant('unpatched predict', 'unpatched', lambda: collect(predict, X, n), None),
            Variant('predict_on_batch', 'peer', lambda: collect(on_batch, X, n), None),
            Variant('K.function', 'peer', lambda: collect(kfunc, X, n), None),
            Variant('hand-batched predict(X[i:i+32])', 'peer',
                    lambda: hand_batched(predict, X, n), None),
            Variant('raw callable, whole array', 'limit', lambda: whole(raw, X, n), None),
            Variant('patched', 'patched', lambda: collect(predict, X, n), {}),
            Variant('patched + batching()', 'patched',
                    lambda: collect_batching(predict, X, n), {}),
        ]

    def _immediate(self, model, X, n):
        def predict(x):
            return model.predict(x)
        raw = raw_callable(model, row(X, 0))
        return [
            Variant('unpatched predict', 'unpatched', lambda: use_immediately(predict, X, n),
                    None),
            Variant('raw callable, whole array', 'limit', lambda: whole(raw, X, n), None),
            Variant('patched, readahead off (fast path alone)', 'patched',
                    lambda: use_immediately(predict, X, n), {'readahead': False}),
            Variant('patched (read-ahead)', 'patched', lambda: use_immediately(predict, X, n),
                    {}),
        ] + ([self._phase_fixed(model, X, n)]
             if getattr(model, 'uses_learning_phase', False) is True else [])

    def _phase_fixed(self, model, X, n):
        # Layers that read the learning phase (BatchNormalization, Dropout): the inference
        # graph's steady state, as a long loop gets it once it has paid for it (built at
        # the warm-up's first call: inference_graph=True). On a twin of the model (the
        # same weights): a model's inference graph, once checked, serves it under every
        # later patch, so the other variants would time it too.
        import keras
        twin = keras.models.clone_model(model)
        twin.set_weights(model.get_weights())
        twin._make_predict_function()

        def predict(x):
            return twin.predict(x)
        return Variant('patched, readahead off, inference graph', 'patched',
                       lambda: use_immediately(predict, X, n),
                       {'readahead': False, 'inference_graph': True}, twin)

    def _autoregressive(self, model, X, n):
        def predict(x):
            return model.predict(x)

        def on_batch(x):
            return model.predict_on_batch(x)
        kfunc = keras_function(model, row(X, 0))
        raw = raw_callable(model, row(X, 0), inline=True)
        x0 = [np.array(a[:1]) for a in X] if isinstance(X, list) else np.array(X[:1])

        def step(x, y):
            return models.next_input(self.model_name, x, y)
        return [
            Variant('unpatched predict', 'unpatched',
                    lambda: autoregressive(predict, x0, n, step), None),
            Variant('predict_on_batch', 'peer', lambda: autoregressive(on_batch, x0, n, step),
                    None),
            Variant('K.function', 'peer', lambda: autoregressive(kfunc, x0, n, step), None),
            Variant('raw callable (inline), one row per call', 'limit',
                    lambda: autoregressive(raw, x0, n, step), None),
            Variant('patched', 'patched', lambda: autoregressive(predict, x0, n, step), {}),
        ]

    def _stateful(self, model, X, n):
        """One step per call through a sequence; the state starts from zero each run."""
        def steps():
            model.reset_states()
            return [model.predict(X[i:i + 1]) for i in range(n)]
        return [
            Variant('unpatched predict', 'unpatched', lambda: join(steps()), None),
            Variant('patched', 'patched', lambda: join(steps()), {}),
        ]

    def _fallback(self, model, X, n):
        """Calls Keras serves itself: what the patch costs on the way there."""
        verbose = self.model_name.endswith('_verbose')

        def predict(x):
            if not verbose:
                return model.predict(x)
            with contextlib.redirect_stdout(io.StringIO()):     # the progress bar
                return model.predict(x, verbose=1)
        return [
            Variant('unpatched predict', 'unpatched', lambda: use_immediately(predict, X, n),
                    None),
            Variant('patched (left to Keras)', 'patched', lambda: use_immediately(predict, X, n),
                    {}),
        ]

    def _large(self, model, X, n):
        def predict(x):
            return model.predict(x)
        raw = raw_callable(model, row(X, 0))
        return [
            Variant('unpatched predict(X)', 'unpatched', lambda: whole(predict, X, n), None),
            Variant('raw callable, whole array', 'limit', lambda: whole(raw, X, n), None),
            Variant('patched predict(X)', 'patched', lambda: whole(predict, X, n), {}),
        ]

    def _threads(self, model, X, n):
        import tensorflow as tf
        graph = tf.compat.v1.get_default_graph()

        def unpatched(x):
            with graph.as_default():      # the workaround plain Keras needs in threads
                return model.predict(x)

        def predict(x):
            return model.predict(x)
        if models.is_tf_keras(model):
            # tf.keras keeps its session per thread: code that predicts in threads sets
            # the graph and session in each request, patched or not.
            session = _backend(model).get_session()

            def predict(x):             # noqa: F811
                with graph.as_default(), session.as_default():
                    return model.predict(x)
            unpatched = predict
        raw = raw_callable(model, row(X, 0))
        requests = [[np.array(a) for a in as_list(row(X, i))] for i in range(n)]
        requests = [unwrap(r) for r in requests]        # copies: no read-ahead possible
        k = self.threads
        return [
            Variant('unpatched predict (graph.as_default())', 'unpatched',
                    lambda: threaded(unpatched, requests, k), None),
            Variant('raw callable, whole array', 'limit', lambda: whole(raw, X, n), None),
            # What merging can reach here: every run holds one row of each of the k
            # threads (at most k calls are in flight), with no hand-off at all.
            Variant(MERGE_BOUND, 'peer', lambda: hand_batched(raw, X, n, k), None),
            Variant('patched, concurrent=False (fast path alone)', 'patched',
                    lambda: threaded(predict, requests, k), {'concurrent': False}),
            Variant('patched (concurrent batcher)', 'patched',
                    lambda: threaded(predict, requests, k), {}),
        ]


def all_cases(quick=False):
    cases = []
    for model_name, loops in FULL.items():
        for loop, n in loops.items():
            if quick:
                n = (QUICK_MOBILENET if model_name == 'mobilenet' else QUICK_ROWS)[loop]
            if loop == 'threads':
                cases.extend(Case(model_name, loop, n, threads=k) for k in THREADS)
            else:
                cases.append(Case(model_name, loop, n))
    from . import tf1_cases          # Session.run and K.function loops (issue 11)
    return cases + tf1_cases.all_cases(quick)


def select(cases, patterns):
    """Cases whose name matches one of the comma-separated patterns (fnmatch or substring)."""
    if not patterns:
        return cases
    import fnmatch
    wanted = [p.strip() for p in patterns.split(',') if p.strip()]
    return [c for c in cases
            if any(p in c.name or fnmatch.fnmatch(c.name, p) for p in wanted)]
