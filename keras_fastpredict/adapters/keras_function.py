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
shapes goes to Keras. The same holds for ``Session.run`` (``adapters.session_run``).
"""
import gc
import sys
import threading
import weakref

import numpy as np

from .. import counters
from ..engine import compiled, hooks, route
from ..engine.deferred import DeferredArray
from ..report import announcing
from . import session_run
from .keras import adapter as keras_adapter
from .keras import has_updates

_ndarray = np.ndarray
_generic = np.generic
_ATTR = '_kfp_fn'
_KERAS_OWN = ('predict_function', 'train_function', 'test_function')
MAX_SHAPES = 64
RERUN = route.RERUN
compiled_entries = compiled._entries            # id(model) -> its entry (read-only here)
_serve = route.serve
_current_session = keras_adapter.current_session
_scan_lock = threading.Lock()
_known = weakref.WeakSet()                      # Keras models found so far
_scanned = weakref.WeakKeyDictionary()          # graph -> its version at the last scan


class _Noting(object):
    # True while every Keras graph network made in this process was noted as it was made
    # (patched since keras.engine.network was imported): then no scan can find another.
    complete = False


noting = _Noting()


def note_model(wrapped, instance, args, kwargs):
    """Wrapper of ``Network._init_graph_network``: each model is known as it is made, so
    a ``Session.run`` of its tensors finds it without scanning the heap (``gc`` over every
    object: 20-60 ms once TensorFlow is loaded, paid inside the loop's first call)."""
    result = wrapped(*args, **kwargs)
    with _scan_lock:
        _known.add(instance)
    return result


# -- from tensors to a model -------------------------------------------------------------------

def _match(model, graph, feeds, fetches):
    if not getattr(model, '_is_graph_network', False) or not getattr(model, 'outputs', None):
        return None
    inputs = model._feed_inputs
    if (len(inputs) != len(feeds) or len(model.inputs) != len(inputs)
            or model.outputs[0].graph is not graph):
        return None
    position = {id(t): i for i, t in enumerate(feeds)}
    feed_order = [position.get(id(t)) for t in inputs]
    if None in feed_order or len(set(feed_order)) != len(feeds):
        return None
    outputs = {}
    for j, t in enumerate(model.outputs):
        outputs.setdefault(id(t), j)
    output_index = [outputs.get(id(t)) for t in fetches]
    if None in output_index:
        return None
    return model, feed_order, output_index


def model_of(feeds, fetches, phase_index):
    """``find_model`` for a call whose feeds hold Keras' learning phase at
    ``phase_index`` (or None): the model's feed order indexes the call's feeds. None where
    there is no model, or looking for one failed (the call then runs as it is)."""
    try:
        found = find_model([t for i, t in enumerate(feeds) if i != phase_index], fetches)
    except Exception:
        return None
    if found is None or phase_index is None:
        return found
    model, feed_order, outputs = found
    return model, [i if i < phase_index else i + 1 for i in feed_order], outputs


def find_model(feeds, fetches):
    """``(model, feed_order, output_index)`` for a Keras model whose inputs are exactly the
    placeholders ``feeds`` and whose outputs include every tensor of ``fetches``:
    ``feed_order[i]`` is the position in ``feeds`` of the model's i-th input,
    ``output_index[k]`` the model output that ``fetches[k]`` is. None if there is none.

    Models are found among those the fast path knows, else by one scan of the live
    objects per graph version (a tensor does not know the model it is an output of)."""
    if not feeds or not fetches:
        return None
    if not all(hasattr(t, '_keras_history') for t in fetches) or not all(
            t.op.type == 'Placeholder' and hasattr(t, '_keras_history') for t in feeds):
        return None
    if 'keras.engine.network' not in sys.modules:
        return None
    graph = fetches[0].graph
    seen = set()
    with _scan_lock:                    # (_known is added to under it, by other threads)
        known = list(_known)
    candidates = [e.model_ref() for e in compiled.entries()
                  if e.adapter is keras_adapter] + known
    for model in candidates:
        if model is not None and id(model) not in seen:
            seen.add(id(model))
            found = _match(model, graph, feeds, fetches)
            if found is not None:
                return found
    if noting.complete:
        return None
    with _scan_lock:
        if _scanned.get(graph) != graph.version:
            _scanned[graph] = graph.version
            for model in _scan():
                _known.add(model)
        known = list(_known)        # (scanned here or, meanwhile, by another thread)
    for model in known:
        if id(model) not in seen:
            found = _match(model, graph, feeds, fetches)
            if found is not None:
                return found
    return None


def _scan():
    from keras.engine.network import Network
    objects = gc.get_objects()
    try:
        kinds = {kind for kind in {type(o) for o in objects} if issubclass(kind, Network)}
        return [o for o in objects if type(o) in kinds]
    finally:
        del objects


def _vars_count(graph):
    variables = graph._collections.get('variables')
    return len(variables) if variables else 0


def model_entry(model, session):
    """The model's ``CompiledModel`` on ``session``, or None where the model path does not
    apply: ``session`` is not the one Keras uses now, or the model is left to Keras, or
    its calls update state (a stateful model: a plain run of its outputs updates none)."""
    ka = keras_adapter
    try:
        if ka.current_session() is not session or session._closed:
            return None
        entry = compiled.get(model)
        if not (entry is not None and entry.session is session and entry.model_ref() is model
                and entry.function is model.__dict__.get('predict_function')):
            # Not K.get_session(): it would initialise variables plain TF leaves alone.
            entry = keras_adapter.build_on(model, session)
    except Exception:
        return None
    if entry.refused or entry.updates is not None or entry.stateful:
        return None
    return entry


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
                 'model_pure', 'stats', '__weakref__')

    def __init__(self, fn):
        import tensorflow as tf
        self.refused = None
        self.pure = {}
        self.callable = None
        self.vars_len = -1
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
        phase = session_run.keras_phase(self.graph)
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
            pure = self.pure[phase_fed_true] = (not self.updates and session_run.side_effect_free(
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
                ('keras.engine.network', 'Network._init_graph_network', note_model))

    @announcing
    def call(self, wrapped, fn, args, kwargs):
        st = fn.__dict__.get(_ATTR)
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
            arrays = st.convert(inputs)
            if arrays is None:
                return self._original(st, wrapped, fn, args, kwargs, None, True, _ARGUMENTS)
            phase = st.phase_of(arrays)
        if phase is None:
            return self._original(st, wrapped, fn, args, kwargs, None, True, _ARGUMENTS)
        cfn = fn._callable_fn
        session = _current_session()
        if (cfn is None or cfn is not st.callable or session is not fn._session
                or session._closed or _vars_count(st.graph) != st.vars_len):
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
            runner = st.runner = session_run.Runner(session, st.inputs, st.fetches, st.targets)
        return runner.run(session, arrays)[:st.n_outputs]

    def _state(self, fn):
        try:
            if keras_adapter.tfb is None:
                keras_adapter._bind()
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
        ce = model_entry(model, session)
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
            found = model_of(st.inputs, st.outputs, st.phase_index)
        if found is not None:
            model, st.model_feeds, st.model_outputs = found
            st.model_ref = weakref.ref(model)
        st.model_checked = True


# Why a call went to Keras' own Function.__call__ (the report's reasons).
_ARGUMENTS = 'inputs Keras converts itself (or rejects)'
_KERAS_RUNS = 'a first call, new input shapes or new variables: Keras runs it'
_FAILED = 'the fast run failed: Keras raises its own error'

adapter = KerasFunctionAdapter()
