"""The adapter for Keras 2.2.5 backend functions (``K.function``), and the way from a
``Session.run`` or ``K.function`` call to a Keras model's engine path.

``Function.__call__`` spends most of a one-row call in ``get_session()`` (twice: a scan of
every global variable) and in its checks, before it runs the session callable it made on
its first call. Here, once a plain call has made that callable (all inputs fed as arrays,
on the session Keras uses), later calls convert their inputs exactly as Keras does
(``np.asarray`` to each input's dtype) and run Keras' own callable directly, so results and
errors are Keras' own. Keras' scan is skipped only while it would do nothing: the graph's
variable collection has not grown since (new variables send the call to Keras, which
initialises them). Functions with ``updates`` (Keras' train function, say) are sped up the
same way and never batched or read ahead; they, and functions whose graph has ops with
side effects, settle pending work first (``hooks.graph_event``), as before.

When a function's inputs are a Keras model's inputs (and, optionally, the learning phase,
fed 0) and its outputs are among the model's outputs, calls go through the model's engine
path (read-ahead, deferral, merging of threads' calls); the first call of each set of input
shapes goes to Keras, except while Keras has made no callable for the function (its first
calls: ``_before_keras``). The same holds for ``Session.run`` (``adapters.session_run``).
"""
import weakref

import numpy as np

from .. import counters
from ..engine import compiled, hooks, route
from ..engine.pending import DeferredArray
from ..report import announcing
from . import model_path, tf1_session
from .keras import adapter as keras_adapter
from .keras import has_updates

_ndarray = np.ndarray
_generic = np.generic
_ATTR = '_kfp_fn'
_KERAS_OWN = ('predict_function', 'train_function', 'test_function')
MAX_SHAPES = 64
RERUN = route.RERUN
compiled_entries = compiled.by_model_id         # id(model) -> its entry (read-only here)
_serve = route.serve
_current_session = keras_adapter.current_session


def _vars_count(graph):
    variables = graph._collections.get('variables')
    return len(variables) if variables else 0


def run_model(entry, feeds, output_index, impure):
    """The values of the model outputs ``output_index`` for ``feeds`` (the model's input
    arrays, already converted and validated), through the engine; None where the model
    path does not apply to them, RERUN where the run failed with no side effects (the
    caller's original then raises its own error)."""
    first = feeds[0]
    if first.ndim == 0:
        return None
    rows = first.shape[0]
    if rows == 0:
        return None
    for a in feeds:
        if a.ndim == 0 or a.shape[0] != rows:
            return None
    if impure:
        hooks.graph_event()
    outs = route.serve(entry, first if len(feeds) == 1 else feeds, feeds, rows, 0)
    if outs is RERUN:
        return RERUN
    if len(output_index) == 1:
        return [outs[output_index[0]]]
    return [outs[j] for j in output_index]


# -- K.function ---------------------------------------------------------------------------------

class _State(object):
    """What one backend function's fast path needs (made on its first patched call)."""
    __slots__ = ('refused', 'n', 'n_outputs', 'dtypes', 'dtype_objs', 'graph', 'vars_len',
                 'callable', 'phase_index', 'updates', 'pure', 'name', 'shapes',
                 'model_ref', 'model_feeds', 'model_outputs', 'model_checked', 'inputs',
                 'outputs', 'fetches', 'targets', 'runner', 'compiled', 'model_id',
                 'model_pure', 'stats', 'own_session', 'own_vars_len', '__weakref__')

    def __init__(self, fn):
        import tensorflow as tf
        self.refused = None
        self.pure = {}
        self.callable = None
        self.vars_len = -1
        self.own_session = None     # (weakly) the session our own first calls initialised
        self.own_vars_len = -1      # and its graph's variable count then
        self.shapes = set()
        self.model_ref = self.compiled = None
        self.model_checked = False
        self.name = getattr(fn, 'name', None)
        self.inputs = list(fn.inputs)
        self.outputs = list(fn.outputs)
        self.fetches = self.outputs + list(fn.fetches)     # what Keras' callable fetches
        self.targets = [fn.updates_op]
        self.runner = None
        self.n = len(self.inputs)
        self.n_outputs = len(self.outputs)
        self.graph = fn.updates_op.graph
        self.updates = bool(fn.fetches) or has_updates(fn)
        if fn.feed_dict or getattr(fn, 'run_options', None) or getattr(fn, 'run_metadata',
                                                                        None):
            self.refused = 'feed_dict, options or run_metadata'
        elif any(keras_adapter.K.is_sparse(t) for t in self.inputs):
            self.refused = 'sparse inputs'
        self.dtypes = [tf.as_dtype(t.dtype).as_numpy_dtype for t in self.inputs]
        self.dtype_objs = [np.dtype(d) for d in self.dtypes]
        phase = tf1_session.keras_phase(self.graph)
        self.phase_index = next((i for i, t in enumerate(self.inputs) if t is phase), None)
        names = self.name or ', '.join(t.name for t in self.outputs)
        self.stats = counters.named('K.function', names)

    def is_pure(self, phase_fed_true):
        """No updates, and no op with side effects among what runs (the learning phase fed
        0 read as unfed: the same branches run)."""
        pure = self.pure.get(phase_fed_true)
        if pure is None:
            feeds = self.inputs
            if self.phase_index is not None and not phase_fed_true:
                feeds = [t for i, t in enumerate(feeds) if i != self.phase_index]
            pure = self.pure[phase_fed_true] = (not self.updates and tf1_session.side_effect_free(
                self.graph, feeds, self.outputs))
        return pure

    def convert(self, inputs):
        """Input arrays as Keras makes them, or None where Keras must see the values
        (None entries, tensors, anything unusual)."""
        arrays = []
        for v, dtype, dto in zip(inputs, self.dtypes, self.dtype_objs):
            kind = type(v)
            if kind is _ndarray:
                arrays.append(v if v.dtype is dto else np.asarray(v, dtype))
            elif (kind is float or kind is int or kind is bool or kind is list or kind is tuple
                  or kind is DeferredArray or isinstance(v, _generic)):
                arrays.append(np.asarray(v, dtype))
            else:
                return None
        return arrays

    def phase_of(self, arrays):
        """Whether the learning phase is fed something true (None: not a scalar)."""
        if self.phase_index is None:
            return False
        value = arrays[self.phase_index]
        return bool(value) if value.ndim == 0 else None


class KerasFunctionAdapter(object):
    """``keras.backend.tensorflow_backend.Function.__call__``."""

    backend = 'keras.backend.tensorflow_backend'
    # The call-site report's hook while it is on: ``announce(state, inputs)`` before a
    # call of a function with a state is served (report.announcing).
    announce = None

    def entry_points(self):
        return ((self.backend, 'Function.__call__', self.call),
                ('keras.engine.network', 'Network._init_graph_network',
                 model_path.note_model))

    @announcing
    def call(self, wrapped, fn, args, kwargs):
        try:
            st = fn.__dict__.get(_ATTR)
        except AttributeError:
            # Called through the class's __dict__ (``Function.__dict__['__call__'](f,
            # inputs)``): no instance bound, the original runs as unpatched.
            return wrapped(*args, **kwargs)
        if st is None:
            st = self._state(fn)
            if st is None:
                hooks.graph_event()
                return wrapped(*args, **kwargs)
        if self.announce is not None:
            x = args[0] if len(args) == 1 and not kwargs else None
            if (type(x) is list or type(x) is tuple) and len(x) == 1:
                x = x[0]            # (the report reads rows from one input's array)
            self.announce(st, x)
        if st.refused is not None or len(args) != 1 or kwargs:
            return self._original(st, wrapped, fn, args, kwargs, None, True,
                                  st.refused or _ARGUMENTS)
        inputs = args[0]
        kind = type(inputs)
        if (kind is not list and kind is not tuple) or len(inputs) != st.n:
            return self._original(st, wrapped, fn, args, kwargs, None, True, _ARGUMENTS)
        if st.n == 1 and type(inputs[0]) is _ndarray and inputs[0].dtype is st.dtype_objs[0]:
            arrays = [inputs[0]]
            phase = False if st.phase_index is None else st.phase_of(arrays)
        else:
            try:
                arrays = st.convert(inputs)
            except Exception:       # Keras raises it, after its get_session() initialises
                arrays = None
            if arrays is None:
                return self._original(st, wrapped, fn, args, kwargs, None, True, _ARGUMENTS)
            phase = st.phase_of(arrays)
        if phase is None:
            return self._original(st, wrapped, fn, args, kwargs, None, True, _ARGUMENTS)
        cfn = fn._callable_fn
        session = _current_session()
        if (cfn is None or cfn is not st.callable or session is not fn._session
                or session._closed or _vars_count(st.graph) != st.vars_len):
            if cfn is None and not phase and (st.model_ref is not None or not st.model_checked):
                values = self._before_keras(st, session, arrays)
                if values is RERUN:
                    return self._original(st, wrapped, fn, args, kwargs, None, phase, _FAILED)
                if values is not None:
                    st.stats.calls += 1
                    st.stats.fast_calls += 1
                    return values
            return self._original(st, wrapped, fn, args, kwargs, arrays, phase, _KERAS_RUNS)
        if not phase and (st.model_ref is not None or not st.model_checked):
            shapes = (arrays[0].shape,) if st.n == 1 else tuple([a.shape for a in arrays])
            if shapes not in st.shapes:
                return self._original(st, wrapped, fn, args, kwargs, arrays, phase,
                                      _KERAS_RUNS)
            ce = st.compiled
            if ce is None or compiled_entries.get(st.model_id) is not ce or \
                    ce.session is not session:
                ce = self._model_entry(st, session)
            if ce is not None:
                values = self._model(st, ce, arrays)
                if values is not None:
                    if values is RERUN:
                        return self._original(st, wrapped, fn, args, kwargs, None, phase,
                                              _FAILED)
                    st.stats.calls += 1
                    st.stats.fast_calls += 1
                    return values
        st.stats.calls += 1
        st.stats.fast_calls += 1
        if not st.is_pure(phase):
            hooks.graph_event()
        # What Keras' callable runs, in a callable of ours that may run in the caller's
        # thread (Keras' runs on TF's inter-op pool: a thread hand-off per call).
        runner = st.runner
        if runner is None or runner.session_ref() is not session:
            runner = st.runner = tf1_session.Runner(session, st.inputs, st.fetches, st.targets)
        return runner.run(session, arrays)[:st.n_outputs]

    def _state(self, fn):
        try:
            if keras_adapter.tfb is None:
                keras_adapter.bind()
            st = _State(fn)
        except Exception:
            return None
        fn.__dict__[_ATTR] = st
        return st

    def _original(self, st, wrapped, fn, args, kwargs, arrays, phase, reason):
        """Keras' own call (after settling pending work unless the function is pure);
        afterwards, if Keras made its callable for all inputs fed as arrays, later calls
        may use it. Counted, with why (the report's reasons)."""
        st.stats.fallback(reason)
        if st.refused is not None or not st.is_pure(phase):
            hooks.graph_event()
        result = wrapped(*args, **kwargs)
        if arrays is not None:
            fed = fn._feed_arrays
            if (not fn._feed_symbols and fed is not None and len(fed) == st.n
                    and all(a is b for a, b in zip(fed, st.inputs))):
                st.callable = fn._callable_fn
                st.vars_len = _vars_count(st.graph)
                if len(st.shapes) >= MAX_SHAPES:
                    st.shapes = set()
                st.shapes.add(tuple([a.shape for a in arrays]))
        return result

    def _before_keras(self, st, session, arrays):
        """The call of a model's function for which Keras has made no callable yet (its
        first call): through the model's engine path, as ``_model``, where the inputs' shapes
        are compatible with the function's placeholders; the variables initialised first
        as Keras' call initialises them (``get_session()``), unless it would do nothing (no
        new variable since, on the same session). Keras' own first call would make a
        callable of its own (an executor: 5-10 ms), besides the one of the model's entry.
        None where this does not apply (Keras' own call then answers)."""
        own = st.own_session
        if (session is None or own is None or own() is not session or session._closed
                or _vars_count(st.graph) != st.own_vars_len):
            count = _vars_count(st.graph)       # (before: a variable made meanwhile, by
            session = keras_adapter.keras_session()     # another thread, is seen later)
            st.own_vars_len = count
            st.own_session = weakref.ref(session)
        shapes = (arrays[0].shape,) if st.n == 1 else tuple([a.shape for a in arrays])
        if shapes not in st.shapes:
            for t, a in zip(st.inputs, arrays):
                if not t.get_shape().is_compatible_with(a.shape):
                    return None
        ce = st.compiled
        if ce is None or compiled_entries.get(st.model_id) is not ce or ce.session is not session:
            ce = self._model_entry(st, session)
            if ce is None:
                return None
        values = self._model(st, ce, arrays)
        if values is not None and values is not RERUN and shapes not in st.shapes:
            if len(st.shapes) >= MAX_SHAPES:
                st.shapes = set()
            st.shapes.add(shapes)
        return values

    @staticmethod
    def _model(st, ce, arrays):
        """The function's outputs through the model's engine path (as ``run_model``)."""
        if len(st.model_feeds) == 1:
            x = arrays[st.model_feeds[0]]
            if x.ndim == 0 or not x.shape[0]:
                return None
            feeds = [x]
        else:
            x = feeds = [arrays[i] for i in st.model_feeds]
            return run_model(ce, feeds, st.model_outputs, not st.model_pure)
        if not st.model_pure:
            hooks.graph_event()
        outs = _serve(ce, x, feeds, x.shape[0], 0)
        if outs is RERUN:
            return RERUN
        index = st.model_outputs
        if len(index) == 1:
            return [outs[index[0]]]
        return [outs[j] for j in index]

    @staticmethod
    def _model_entry(st, session):
        if not st.model_checked:
            KerasFunctionAdapter._find_model(st)
        model = None if st.model_ref is None else st.model_ref()
        if model is None:
            st.model_ref = None
            return None
        ce = model_path.model_entry(model, session)
        if ce is None:
            st.compiled = None
            return None
        # Bound last: another thread takes the model path once compiled matches, and reads
        # the rest without a lock.
        st.model_pure = st.is_pure(False)
        st.model_id = id(model)
        st.compiled = ce
        return ce

    @staticmethod
    def _find_model(st):
        # Marked checked last, with model_ref the last field bound: other threads read them
        # without a lock (one that sees the state unchecked looks for the model itself).
        found = None
        if not (st.name in _KERAS_OWN or st.updates or st.refused is not None):
            found = model_path.model_of(st.inputs, st.outputs, st.phase_index)
        if found is not None:
            model, st.model_feeds, st.model_outputs = found
            st.model_ref = weakref.ref(model)
        st.model_checked = True


# Why a call went to Keras' own Function.__call__ (the report's reasons).
_ARGUMENTS = 'inputs Keras converts itself (or rejects)'
_KERAS_RUNS = 'a first call, new input shapes or new variables: Keras runs it'
_FAILED = 'the fast run failed: Keras raises its own error'

adapter = KerasFunctionAdapter()
