"""The adapter for Keras 2.2.5 models: where the entry points are, how a model's session,
feeds and fetches are found, and how Keras validates input.

Each patched call either takes the fast path (a ``CompiledModel`` from the engine, which
routes it through read-ahead, deferral or concurrent batching where the model's rows are
independent) or goes to the original Keras method untouched. Everything the fast path
does not handle exactly is left to Keras: unusual arguments, inputs Keras' own validation
rejects (so the same exception is raised), batch sizes Keras refuses.

``KerasAdapter`` is written once for both Keras flavours: a subclass names where another
flavour (``tf.keras``) keeps its classes and backend.
"""
import importlib
import threading

import numpy as np

from .. import counters as _stats
from ..engine import compiled, hooks, pending, route

_ndarray = np.ndarray


def _bind_predict(x, batch_size=None, verbose=0, steps=None, callbacks=None,
                  max_queue_size=10, workers=1, use_multiprocessing=False):
    return x, batch_size, verbose, steps, callbacks


def _plain_array(x):
    """A deferred result resolved, a memory-mapped array (a dataset too big to load, as
    Keras treats it) viewed as a plain ndarray."""
    if type(x) is np.memmap:
        return x.view(_ndarray)
    return pending.resolve(x)


class KerasAdapter(object):
    """Keras 2.2.5 (``keras``). Wrappers have wrapt's shape,
    ``wrapper(wrapped, instance, args, kwargs)``."""

    name = 'keras'
    training = 'keras.engine.training'
    sequential = 'keras.engine.sequential'
    backend = 'keras.backend.tensorflow_backend'
    network = 'keras.engine.network'
    training_utils = 'keras.engine.training_utils'

    def __init__(self):
        self._local = threading.local()   # .keras_default: batch_size=32 came from Keras
        self.tfb = None

    # -- the flavour: where its backend and classes are -----------------------------------

    def bind(self):
        """Binds the flavour's backend and classes (on first use: importing this imports
        no Keras)."""
        from keras import backend as K
        from keras.backend import tensorflow_backend as tfb
        self.K = K
        self.tfb = tfb
        self._bind_tf()

    def _bind_tf(self):
        from tensorflow.python.framework import errors, ops
        self._default_session = ops.get_default_session
        self._session_stack = ops._default_session_stack   # (read by serving_check)
        self.default_graph = ops.get_default_graph
        self.OpError = errors.OpError

    def current_session(self):
        """The session Keras would use now, or None where it would make one."""
        if self.tfb is None:
            self.bind()
        return self._default_session() or self.tfb._SESSION

    def serving_check(self):
        """``serves(model, entry)``: whether ``lookup(model)`` would return ``entry`` now,
        for an entry found by the model's id (auto-batch asks on every call: a closure
        with ``current_session`` and ``_cached`` inlined, the default session read from
        TensorFlow's stack as ``get_default_session`` reads it)."""
        if self.tfb is None:
            self.bind()
        stack_of, tfb = self._session_stack, self.tfb

        def serves(model, entry):
            stack = stack_of.stack
            session = stack[-1] if stack else tfb._SESSION
            return (session is entry.session
                    and entry.function is model.__dict__.get('predict_function')
                    and not session._closed)
        try:        # the same in C, where it is built (serves takes what it cannot read)
            from ..engine._deferral import Serves
        except ImportError:
            return serves
        return Serves(serves, stack_of, tfb)

    def keras_session(self):
        """The session Keras' own predict would use now, made and initialised as Keras
        does, in the caller's graph context (never in the model's: that would bind
        Keras' global session to another graph)."""
        return self.K.get_session()

    def learning_phases(self):
        """Keras' learning phase per graph (read without creating one)."""
        return self.tfb._GRAPH_LEARNING_PHASES

    def learning_phase_module(self):
        """The module whose ``_GRAPH_LEARNING_PHASES`` Keras' learning_phase() reads."""
        return self.tfb

    def static_batch_size(self, model):
        """The batch size Keras' predict imposes: its first layer's, if fixed
        (``_validate_or_infer_batch_size``, the same in Keras 2.2.5 and tf.keras)."""
        layers = importlib.import_module(self.network).Network.layers.fget(model)
        get_static_batch_size = importlib.import_module(self.training_utils).get_static_batch_size
        return get_static_batch_size(layers[0]) if layers else None

    def layer_classes(self):
        """(Layer, RNN): for the inference graph."""
        from keras.engine.base_layer import Layer
        from keras.layers import RNN
        return Layer, RNN

    def standardize(self, model, x):
        """Keras' own input validation: raises what Keras raises."""
        model._standardize_user_data(x)

    # -- the entry points -----------------------------------------------------------------

    def entry_points(self):
        """(module, class.attribute, wrapper) for every method this adapter wraps."""
        return (
            (self.training, 'Model.predict', self.predict),
            (self.training, 'Model.predict_on_batch', self.predict_on_batch),
            (self.sequential, 'Sequential.predict_proba', self.keras_default_batch_size),
            (self.sequential, 'Sequential.predict_classes', self.keras_default_batch_size),
            # Before anything else runs or changes the graph, pending work is settled.
            (self.training, 'Model.compile', self.recompiled),
            (self.training, 'Model.fit', self.fit),
            (self.training, 'Model.fit_generator', self.fit),
            # Function.__call__ (K.function): adapters.keras_function.
        )

    def predict(self, wrapped, instance, args, kwargs):
        """Wrapper of ``Model.predict``."""
        if len(args) == 1 and not kwargs and instance is not None:
            return self._predict(wrapped, instance, args, kwargs, args[0], None)
        if instance is None:
            # Called through the class's __dict__ (``Model.__dict__['predict'](model,
            # x)``): no instance bound, the original runs as unpatched.
            return wrapped(*args, **kwargs)
        try:
            x, batch_size, verbose, steps, callbacks = _bind_predict(*args, **kwargs)
        except TypeError:
            return wrapped(*args, **kwargs)
        if verbose or steps is not None or callbacks is not None:
            return self._fallback(wrapped, instance, args, kwargs,
                                  'verbose, steps or callbacks')
        if batch_size is not None:
            if type(batch_size) is not int or batch_size < 1:
                return self._fallback(wrapped, instance, args, kwargs, 'batch_size')
            if batch_size == 32 and getattr(self._local, 'keras_default', False):
                batch_size = None
        return self._predict(wrapped, instance, args, kwargs, x, batch_size)

    def predict_on_batch(self, wrapped, instance, args, kwargs):
        """Wrapper of ``Model.predict_on_batch``: the whole input in one run, as Keras."""
        if len(args) != 1 or kwargs or instance is None:    # (None: see predict)
            return wrapped(*args, **kwargs)
        return self._predict(wrapped, instance, args, kwargs, args[0], 0)

    def keras_default_batch_size(self, wrapped, instance, args, kwargs):
        """Wrapper of ``Sequential.predict_proba`` and ``predict_classes``: they pass their
        own default ``batch_size=32`` to predict; when the caller gave none, predict may
        choose."""
        if len(args) > 1 or 'batch_size' in kwargs:
            return wrapped(*args, **kwargs)
        self._local.keras_default = True
        try:
            return wrapped(*args, **kwargs)
        finally:
            self._local.keras_default = False

    def fit(self, wrapped, instance, args, kwargs):
        """``Model.fit`` and ``fit_generator``: settle pending work first; afterwards close
        the scope of any FastPredict callback, which Keras does not tell when fit raises."""
        hooks.graph_event()
        try:
            return wrapped(*args, **kwargs)
        finally:
            for value in list(args) + list(kwargs.values()):
                if isinstance(value, (list, tuple)):
                    for callback in value:
                        close = getattr(callback, '_kfp_close', None)
                        if close is not None:
                            close()

    def backend_function(self, wrapped, instance, args, kwargs):
        """Keras backend functions (train, test, predict, K.function): a predict function
        that updates nothing changes no weights, so a fallback model leaves read-ahead
        alone. Decided once per function: this runs on every call Keras serves itself."""
        try:
            quiet = instance.__dict__.get('_kfp_quiet')
        except AttributeError:      # (no instance bound: see predict)
            return wrapped(*args, **kwargs)
        if quiet is None:
            quiet = instance._kfp_quiet = (getattr(instance, 'name', None) == 'predict_function'
                                           and not has_updates(instance))
        if not quiet:
            hooks.graph_event()
        return wrapped(*args, **kwargs)

    def recompiled(self, wrapped, instance, args, kwargs):
        """``Model.compile``: the cached callable is rebuilt on the next predict."""
        hooks.graph_event()
        try:
            return wrapped(*args, **kwargs)
        finally:
            compiled.invalidate(instance)

    # -- one call ---------------------------------------------------------------------------

    def _predict(self, wrapped, model, args, kwargs, x, batch_size):
        """``batch_size``: None lets the fast path choose, 0 means ``predict_on_batch``."""
        entry = self.lookup(model)
        if entry.refused:
            return self._fallback(wrapped, model, args, kwargs, entry.reason)
        if type(x) is not _ndarray:
            x = pending.map_nested(x, _plain_array)
        arrays = entry.prepare(x)
        if arrays is None:
            return self._fallback(wrapped, model, args, kwargs, 'input Keras handles itself')
        rows = arrays[0].shape[0]
        if rows == 0:
            return self._fallback(wrapped, model, args, kwargs, 'empty input')
        if entry.static_batch is not None or entry.stateful:
            batch_size = self._keras_batch_size(entry, rows, batch_size)
            if batch_size is None:
                return self._fallback(wrapped, model, args, kwargs,
                                      'Keras raises for this batch size')
        outs = route.serve(entry, x, arrays, rows, batch_size)
        if outs is route.RERUN:
            return self._fallback(wrapped, model, args, kwargs, 'the run failed: Keras raises')
        return outs[0] if entry.n_outputs == 1 else outs

    def _keras_batch_size(self, entry, rows, batch_size):
        """The batch size Keras' predict runs a fixed-batch or stateful model in (0 for
        predict_on_batch: all rows), or None where Keras raises instead (Keras 2.2.5
        ``_validate_or_infer_batch_size`` and ``predict``)."""
        if batch_size == 0:
            return 0
        if batch_size is None and getattr(self._local, 'keras_default', False):
            batch_size = 32              # predict_classes/predict_proba pass it to Keras
        static = entry.static_batch
        if static is not None:
            if batch_size is not None and batch_size != static:
                return None
            batch_size = static
        batch_size = batch_size or 32
        if entry.stateful and rows > batch_size and rows % batch_size:
            return None
        return batch_size

    def _fallback(self, wrapped, model, args, kwargs, reason):
        _stats.for_model(model).fallback(reason)
        outputs = getattr(model, 'outputs', None)
        if not outputs:
            return wrapped(*args, **kwargs)
        # Any thread can predict: Keras builds its predict function in the thread's
        # default graph, which in a new thread may be another (keras#2397), and not
        # thread-safely (keras#6124); so it is built once under a lock and Keras runs on
        # the model's graph. Only where Keras' session is on the model's graph: elsewhere
        # plain Keras fails, and so must this call, in the same way.
        graph = outputs[0].graph
        session = self.current_session()
        if session is None or session.graph is not graph:
            return wrapped(*args, **kwargs)
        if getattr(model, 'built', False):
            ensure_predict_function(model, graph)
        if self.default_graph() is graph:
            return wrapped(*args, **kwargs)
        with graph.as_default():
            return wrapped(*args, **kwargs)

    # -- the model's entry ------------------------------------------------------------------

    def lookup(self, model):
        """The ``CompiledModel`` for ``model`` on the session Keras would use now, or a
        ``Refusal``. Cheap when nothing changed since the last call."""
        return self._cached(model, self.current_session()) or self._build(model)

    @staticmethod
    def _cached(model, session):
        """The model's cached entry if it still holds: same session (open), same predict
        function, same model."""
        entry = compiled.get(model)
        if (entry is not None and entry.session is session and session is not None
                and entry.function is model.__dict__.get('predict_function')
                and not session._closed and entry.model_ref() is model):
            return entry
        return None

    def unsupported_reason(self, model):
        """Why the fast path must leave this model to Keras, or None."""
        if not getattr(model, 'built', False) or not getattr(model, '_is_graph_network',
                                                               False):
            return 'not a built graph network'
        if not model.inputs or not model.outputs:
            return 'no inputs or outputs'
        if getattr(model, '_function_kwargs', None):
            return 'compiled with session options'
        if len(model._feed_inputs) != len(model.inputs):
            return 'inputs fed from tensors'
        if any(self.K.is_sparse(t) for t in model._feed_inputs):
            return 'sparse input'
        return None

    # Keras 2.2.5's session is global, but TF's default graph is per thread: a new
    # thread's first call finds a fresh, empty graph, makes the session there and fails
    # (keras#2397). Only in that case is the session made on the model's graph instead.
    # (tf.keras keeps a session per thread, and is left as it is.)
    rescue_new_threads = True

    def _build(self, model):
        with compiled.build_lock:
            # As Keras' predict does first: the session, made in the caller's graph
            # context if there is none yet, with new variables initialised.
            graph = getattr(model, 'outputs', None) and model.outputs[0].graph
            if (self.rescue_new_threads and graph is not None
                    and self.current_session() is None
                    and threading.current_thread() is not threading.main_thread()
                    and self.default_graph() is not graph
                    and not self.default_graph().get_operations()):
                with graph.as_default():
                    session = self.keras_session()
            else:
                session = self.keras_session()
            return self.build_on(model, session)

    def build_on(self, model, session):
        """The model's entry (cached) on ``session``, the one Keras uses: a
        ``CompiledModel`` fed and fetched as Keras' predict function, or a ``Refusal``."""
        with compiled.build_lock:
            # Built meanwhile by another thread's first call (a server's first burst:
            # 16 threads built 16 callables of one model): theirs is this one's.
            entry = self._cached(model, session)
            if entry is not None:
                return entry
            if self.tfb is None:
                self.bind()
            reason = self.unsupported_reason(model)
            if reason is None and (session.graph is not model.outputs[0].graph
                                   or session._closed):
                reason = 'model not on the session Keras uses'
            if reason is not None:
                return compiled.store(model, compiled.Refusal(model, session, reason))
            try:
                function = ensure_predict_function(model, session.graph)
            except Exception as exc:    # e.g. a finalized graph: refused once, not per call
                return compiled.store(model, compiled.Refusal(
                    model, session, 'no predict function: %s' % str(exc).split('\n')[0]))
            phase = self.learning_phases().get(session.graph)
            feeds = [t for t in function.inputs if t is not phase]
            if len(feeds) != len(model._feed_inputs):
                return compiled.store(model, compiled.Refusal(
                    model, session, 'predict function with other inputs'))
            try:
                entry = compiled.CompiledModel(
                    model, session, self, feeds, list(function.outputs),
                    function.updates_op if has_updates(function) else None,
                    function.updates_op)
            except Exception as exc:  # e.g. an output that is also an input
                return compiled.store(model, compiled.Refusal(
                    model, session, 'no callable: %s' % str(exc).split('\n')[0]))
            return compiled.store(model, entry)


def ensure_predict_function(model, graph):
    """Build Keras' predict function as Keras' first predict would, once, under a lock
    (Keras' lazy build is not thread-safe, keras#6124), on the model's graph (a first call
    from a thread whose default graph is another fails in Keras, keras#2397)."""
    if model.__dict__.get('predict_function') is None:
        with compiled.build_lock, graph.as_default():
            model._make_predict_function()
    return model.predict_function


def has_updates(function):
    """Whether a Keras backend function runs update ops (its ``updates_op`` is a group
    made under ``control_dependencies(outputs)``: the outputs alone are no updates)."""
    outputs = {t.op for t in function.outputs}
    return any(op not in outputs for op in function.updates_op.control_inputs)


adapter = KerasAdapter()
lookup = adapter.lookup
current_session = adapter.current_session
