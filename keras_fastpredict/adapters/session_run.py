"""The adapter for TensorFlow 1's ``Session.run``: repeated runs served by cached callables.

Legacy code often runs a model's tensors itself, once per sample::

    for img in images:
        boxes, scores = sess.run([model.output, scores_t], {model.input: img[None]})

Each such call pays ``Session.run``'s per-call work (feed checks, a fetch handler, graph
extension). Here a call's *signature* is its fetch structure (tensors, operations and
names in lists, tuples, namedtuples and dicts) and its feed keys, per session. The first
call of a signature, and of each new set of feed shapes, goes to the original
``Session.run``: that run is both the validation and the result (but for a Keras model's
signature whose feeds pass the checks ``Session.run`` makes before it runs: see
``_new_shapes``). Later calls feed the
values, converted as ``Session.run`` converts them, to a session callable made once for
the signature, and the result is put in the shape ``Session.run`` gives it (nesting,
duplicates, ``None`` for operations, numpy scalars). Errors of a cached run are raised
as ``Session.run`` raises them (``_do_call``). When the fetches are outputs of a Keras
model and the feeds its inputs (and, optionally, the learning phase fed 0) on the session
Keras uses, the call goes through the model's engine path instead (read-ahead, deferral,
merging of threads' calls).

Anything else goes to the original untouched: ``options`` or ``run_metadata``, sparse
tensors, variables, tensor handles, feeds that are no placeholders, feed values other
than arrays, scalars and lists, string feeds, a fetch that is also fed. Such calls, and
cached calls whose fetches may change state (any operation fetched, or a graph with ops
that have side effects, as ``batch_safety`` reads it), settle pending work first
(``hooks.graph_event``), as every ``Session.run`` did before this adapter. Pure reads
served from the cache leave pending deferred predictions and read-ahead windows alone.

Caches hang off the session object and hold no reference to it: they die with it, and
``close()`` releases their callables at once. Each holds at most ``MAX_ENTRIES``
signatures. No graph op is ever added.
"""
import threading
import weakref

import numpy as np

from .. import counters
from ..engine import compiled, deferred, hooks, route, warmup
from ..engine.pending import DeferredArray
from ..report import announcing
from . import model_path, tf1_session

_ndarray = np.ndarray
_generic = np.generic
_ATTR = '_kfp_runs'
MAX_ENTRIES = 128        # signatures cached per session (then the cache starts afresh)
MAX_SHAPES = 64          # validated feed shapes per signature
_PLACEHOLDERS = frozenset(('Placeholder', 'PlaceholderV2', 'PlaceholderWithDefault'))
_caches = weakref.WeakSet()     # every session's cache, for clear()
_lock = threading.RLock()
_tf = None


def _bind():
    global _tf, _Tensor, _Operation
    if _tf is None:
        tf = tf1_session.bind()
        _Tensor, _Operation = tf.Tensor, tf.Operation
        _tf = tf
    return _tf


_Tensor = _Operation = None     # set by _bind()


# -- signatures ---------------------------------------------------------------------------

def fetch_key(fetch):
    """A hashable key for the structure of ``fetches``, or None where this adapter leaves
    the call to ``Session.run``. Tensors and operations count by identity (a cached entry
    holds them, so their ids are not reused while it lives), names by value."""
    kind = type(fetch)
    if kind is _Tensor or kind is _Operation:
        return id(fetch)
    if kind is str:
        return fetch
    if kind is list or kind is tuple or (kind.__base__ is tuple and hasattr(kind, '_fields')):
        parts = [kind]
        for f in fetch:
            k = fetch_key(f)
            if k is None:
                return None
            parts.append(k)
        return tuple(parts)
    if kind is dict or kind.__name__ == 'OrderedDict' and kind.__module__ == 'collections':
        parts = [kind]
        for name, f in fetch.items():
            k = fetch_key(f)
            if k is None:
                return None
            parts.append(name)
            parts.append(k)
        return tuple(parts)
    return None


def _frozen(fetch):
    """A copy of the fetch structure that later changes to the caller's lists and dicts
    cannot reach (TF's fetch mappers keep the structure they were made from)."""
    kind = type(fetch)
    if kind is list:
        return [_frozen(f) for f in fetch]
    if kind is tuple:
        return tuple(_frozen(f) for f in fetch)
    if issubclass(kind, tuple):                    # namedtuple
        return kind(*[_frozen(f) for f in fetch])
    if issubclass(kind, dict):
        return kind((name, _frozen(f)) for name, f in fetch.items())
    return fetch


def _fetch_list(fetch):
    """The leaves of a fetch structure (to name it)."""
    if isinstance(fetch, (list, tuple)):
        return [leaf for f in fetch for leaf in _fetch_list(f)]
    if isinstance(fetch, dict):
        return [leaf for f in fetch.values() for leaf in _fetch_list(f)]
    return [fetch]


def _feed_key(feed_dict):
    return tuple([k if type(k) is str else id(k) for k in feed_dict])


# -- one signature ----------------------------------------------------------------------------

_SINGLE, _LIST, _GENERAL = 0, 1, 2


class _Entry(object):
    """A cached signature on one session: its feeds, fetches, callable and result shape."""
    __slots__ = ('pins', 'feeds', 'dtypes', 'dtype_objs', 'n_feeds', 'fetches', 'targets',
                 'kind', 'mapper', 'ops', 'shapes', 'runner', 'phase_index', 'pure', 'graph',
                 'model_ref', 'compiled_ref', 'model_id', 'model_pure', 'n_model_feeds',
                 'model_feeds', 'model_outputs', 'model_checked', 'stats', '__weakref__')
    refused = False

    def __init__(self, session, fetches, feed_dict, pins):
        tf = _bind()
        graph = session.graph
        self.pins = pins
        self.graph = graph
        feeds = [graph.as_graph_element(k, allow_tensor=True, allow_operation=False)
                 for k in feed_dict]
        with graph.as_default():
            handler = tf.FetchHandler(graph, _frozen(fetches), {}, None)
        self.feeds = feeds
        self.dtypes = [t.dtype.as_numpy_dtype for t in feeds]
        self.dtype_objs = [np.dtype(d) for d in self.dtypes]
        self.n_feeds = len(feeds)
        self.fetches = list(handler._fetches)
        self.targets = list(handler._targets)
        self.ops = list(handler._ops)
        self.mapper = handler._fetch_mapper
        kind = type(fetches)
        if kind is _Tensor or (kind is str and len(self.fetches) == 1 and not self.targets):
            self.kind = _SINGLE
        elif (kind is list and not self.targets and len(self.fetches) == len(fetches)
              and all(type(f) is _Tensor or type(f) is str for f in fetches)):
            self.kind = _LIST
        else:
            self.kind = _GENERAL
        self.shapes = set()
        self.runner = None
        self.pure = {}
        phase = tf1_session.keras_phase(graph)
        self.phase_index = next((i for i, t in enumerate(feeds) if t is phase), None)
        self.model_ref = self.compiled_ref = self.model_id = None
        self.model_checked = False
        self.stats = _stats_for(self.fetches + self.targets)
        reason = self._unsupported(handler, feeds)
        if reason is not None:
            raise _Unsupported(reason)

    def _unsupported(self, handler, feeds):
        if len({id(t) for t in feeds}) != len(feeds):
            return 'a tensor fed twice'
        for t in feeds:
            if type(t) is not _Tensor or t.op.type not in _PLACEHOLDERS:
                return 'feeds a tensor that is no placeholder'
            if np.dtype(t.dtype.as_numpy_dtype).kind not in 'biufc':
                return 'feeds strings or another dtype'
        if handler._fetch_handles:
            return 'fetches a tensor handle'
        if not self.fetches and not self.targets:
            return 'fetches nothing'
        fed = {id(t) for t in feeds}
        if any(id(t) in fed for t in self.fetches):
            return 'a fetch is fed'
        return None

    @property
    def compiled(self):
        """The model's compiled entry this signature was last served through, or None."""
        ref = self.compiled_ref
        return None if ref is None else ref()

    def is_pure(self, phase_fed_true):
        """No side effects: no operation fetched, and none in the graph that runs (with the
        learning phase read as unfed where it is fed 0: the same branch runs)."""
        pure = self.pure.get(phase_fed_true)
        if pure is None:
            feeds = self.feeds
            if self.phase_index is not None and not phase_fed_true:
                feeds = [t for i, t in enumerate(feeds) if i != self.phase_index]
            pure = self.pure[phase_fed_true] = (not self.targets and tf1_session.side_effect_free(
                self.graph, feeds, self.fetches))
        return pure

    def convert(self, values):
        """The feed arrays as ``Session.run`` makes them (``np.asarray`` to the feed's
        dtype), or None where ``Session.run`` must see the value itself (it may raise)."""
        arrays = []
        for i, (v, dto) in enumerate(zip(values, self.dtype_objs)):
            kind = type(v)
            if kind is _ndarray:
                arrays.append(v if v.dtype is dto else np.asarray(v, self.dtypes[i]))
            elif kind is float or kind is list or kind is tuple or kind is DeferredArray or \
                    isinstance(v, _generic):
                arrays.append(np.asarray(v, self.dtypes[i]))
            elif kind is int or kind is bool:
                dtype = self.dtypes[i]
                if _tf.convert_to_numpy_obj(dtype, v) != v:
                    return None         # Session.run raises its TypeError
                arrays.append(np.asarray(v, dtype))
            else:
                return None
        return arrays

    def build(self, values):
        """The result as ``Session.run`` shapes it, from the values of ``self.fetches``."""
        kind = self.kind
        if kind is _SINGLE:
            return values[0]
        if kind is _LIST:
            return values
        full = []
        it = iter(values)
        for is_op in self.ops:
            full.append(None if is_op else next(it))
        return self.mapper.build_results(full)

    def run(self, session, arrays):
        """The fetches' values from the cached callable, errors raised as Session.run
        raises them."""
        runner = self.runner
        if runner is None:
            with _lock:
                if self.runner is None:
                    self.runner = tf1_session.Runner(session, self.feeds, self.fetches,
                                                     self.targets)
            runner = self.runner
        return session._do_call(runner.run, session, arrays)


class _Unsupported(Exception):
    pass


class _Refused(object):
    """A signature left to ``Session.run`` (decided once); pins its key's objects."""
    __slots__ = ('pins', 'reason', 'stats')
    refused = True
    compiled = None

    def __init__(self, pins, reason, fetches):
        self.pins = pins
        self.reason = reason
        self.stats = _stats_for(fetches)

    @staticmethod
    def is_pure(phase_fed_true):
        return False


def _stats_for(fetches):
    """A signature's own counters (for the call-site report), named by what it fetches."""
    try:
        names = ', '.join(getattr(f, 'name', str(f)) for f in fetches)
    except Exception:
        names = '?'
    return counters.named('Session.run', names)


class _Cache(object):
    __slots__ = ('entries', '__weakref__')

    def __init__(self):
        self.entries = {}


def _cache_of(session):
    cache = session.__dict__.get(_ATTR)
    if cache is None:
        with _lock:
            cache = session.__dict__.get(_ATTR)
            if cache is None:
                cache = session.__dict__[_ATTR] = _Cache()
                _caches.add(cache)
    return cache


def clear():
    """Drop every session's cached signatures (their callables are released)."""
    with _lock:
        for cache in list(_caches):
            cache.entries = {}


# -- the adapter --------------------------------------------------------------------------------

def _bind_run(fetches, feed_dict=None, options=None, run_metadata=None):
    return fetches, feed_dict, options, run_metadata


class SessionRunAdapter(object):
    """``BaseSession.run`` and ``BaseSession.close``."""

    module = 'tensorflow.python.client.session'
    # The call-site report's hook while it is on: ``announce(entry, x)`` before a call
    # with a cached signature is served (report.announcing).
    announce = None

    def entry_points(self):
        return (
            (self.module, 'BaseSession.run', self.run),
            (self.module, 'BaseSession.close', self.close),
        )

    def close(self, wrapped, session, args, kwargs):
        """Run the deferred calls pending on this session, release its cached callables,
        then close it. (Only this session's pending calls: ``Session.__del__`` closes too,
        from the garbage collector at any point, and a session with pending calls is never
        collected, so that is a no-op.)"""
        deferred.settle_session(session)
        cache = session.__dict__.pop(_ATTR, None)
        if cache is not None:
            cache.entries = {}
        return wrapped(*args, **kwargs)

    @announcing
    def run(self, wrapped, session, args, kwargs):
        if kwargs or len(args) != 2:
            try:
                fetches, feed_dict, options, run_metadata = _bind_run(*args, **kwargs)
            except TypeError:
                return self.original(wrapped, args, kwargs)
            if options is not None or run_metadata is not None:
                return self.original(wrapped, args, kwargs)
        else:
            fetches, feed_dict = args
        if _tf is None:
            _bind()
        key = id(fetches) if type(fetches) is _Tensor else fetch_key(fetches)
        if key is None:
            return self.original(wrapped, args, kwargs)
        if type(feed_dict) is dict:
            if len(feed_dict) == 1:
                (k, value), = feed_dict.items()
                key = (key, k if type(k) is str else id(k))
            else:
                value = None
                key = (key, _feed_key(feed_dict))
        elif feed_dict is None:
            value = None
            feed_dict = {}
            key = (key, ())
        else:
            return self.original(wrapped, args, kwargs)
        cache = session.__dict__.get(_ATTR) or _cache_of(session)
        entry = cache.entries.get(key)
        if entry is None:
            return self._first(wrapped, session, args, kwargs, cache, key, fetches, feed_dict)
        if self.announce is not None:
            self.announce(entry, feed_dict if value is None else value)
        if entry.refused:
            return self.original(wrapped, args, kwargs, entry, entry.reason)
        if session._closed:
            return self.original(wrapped, args, kwargs, entry, 'the session is closed')
        if value is not None and type(value) is _ndarray and value.dtype is entry.dtype_objs[0]:
            arrays = [value]
            shapes = value.shape
        else:
            arrays = self._converted(entry, feed_dict)
            if arrays is None:
                return self.original(wrapped, args, kwargs, entry, _UNCONVERTED)
            shapes = arrays[0].shape if entry.n_feeds == 1 else tuple([a.shape for a in arrays])
        if shapes not in entry.shapes:
            return self._new_shapes(wrapped, session, args, kwargs, entry, arrays, shapes)
        stats = entry.stats
        stats.calls += 1
        stats.fast_calls += 1
        phase = entry.phase_index is not None and bool(arrays[entry.phase_index])
        if not phase and (entry.model_ref is not None or not entry.model_checked):
            result = self._model(entry, session, arrays)
            if result is not None:
                if result is RERUN:
                    stats.fast_calls -= 1
                    stats.calls -= 1
                    return self.original(wrapped, args, kwargs, entry, _FAILED)
                return result
        if not entry.is_pure(phase):
            hooks.graph_event()
        return entry.build(entry.run(session, arrays))

    @staticmethod
    def _converted(entry, feed_dict):
        """The feeds as arrays, or None where a value does not convert: TF's own run then
        raises, in its own order (a closed session, an earlier feed's shape...)."""
        try:
            return entry.convert(feed_dict.values())
        except Exception:
            return None

    @staticmethod
    def original(wrapped, args, kwargs, entry=None, reason=None):
        """TF's own run (counted for ``entry``, with why, where there is one)."""
        if entry is not None:
            entry.stats.fallback(reason)
        hooks.graph_event()
        return wrapped(*args, **kwargs)

    def _first(self, wrapped, session, args, kwargs, cache, key, fetches, feed_dict):
        """The first call of a signature: the original run, and the signature cached."""
        warmup.expect_batches()     # a session runs: TF's pools are set
        pins = (fetches, tuple(feed_dict))
        try:
            entry = _Entry(session, fetches, feed_dict, pins)
        except _Unsupported as exc:
            entry = _Refused(pins, str(exc), _fetch_list(fetches))
        except Exception:
            # TF will raise for this call (an unknown name, another graph...): nothing cached.
            return self.original(wrapped, args, kwargs)
        entries = cache.entries
        if len(entries) >= MAX_ENTRIES:
            entries = cache.entries = {}
        entries[key] = entry
        if self.announce is not None:
            self.announce(entry, feed_dict)
        if entry.refused:
            return self.original(wrapped, args, kwargs, entry, entry.reason)
        arrays = self._converted(entry, feed_dict)
        if arrays is None:
            return self.original(wrapped, args, kwargs, entry, _UNCONVERTED)
        shapes = arrays[0].shape if entry.n_feeds == 1 else tuple(a.shape for a in arrays)
        return self._new_shapes(wrapped, session, args, kwargs, entry, arrays, shapes)

    def _new_shapes(self, wrapped, session, args, kwargs, entry, arrays, shapes):
        """A new signature or set of feed shapes. Where the call goes to a Keras model and
        its feeds pass the checks ``Session.run`` makes before it runs anything (done here
        as it makes them), the model path answers it: TF's own run would make an executor
        of its own besides the model's callable (5-7 ms on Dense(64)x2), paid once more in
        the loop's first calls. Anything else: ``Session.run`` checks them (and answers)."""
        if (entry.n_feeds and (entry.model_ref is not None or not entry.model_checked)
                and not session._closed and _passes_run_checks(entry, arrays)
                and (entry.phase_index is None or not arrays[entry.phase_index])):
            stats = entry.stats
            stats.calls += 1
            stats.fast_calls += 1
            result = self._model(entry, session, arrays)
            if result is RERUN:
                stats.fast_calls -= 1
                stats.calls -= 1
                return self.original(wrapped, args, kwargs, entry, _FAILED)
            if result is not None:
                _add_shapes(entry, shapes)
                return result
            stats.fast_calls -= 1
            stats.calls -= 1
        return self._validate(wrapped, args, kwargs, entry, shapes)

    def _validate(self, wrapped, args, kwargs, entry, shapes):
        """A new set of feed shapes: ``Session.run`` checks them (and answers)."""
        result = self.original(wrapped, args, kwargs, entry, _VALIDATES)
        _add_shapes(entry, shapes)
        return result

    # -- known models ---------------------------------------------------------------------------

    def _model(self, entry, session, arrays):
        """The result through the Keras model path, or None where it does not apply now;
        RERUN where its run failed with no side effects (the original then raises TF's
        own error)."""
        # The model's compiled entry, while it is still the one the engine holds and it
        # runs on this session (else asked for again: only where Keras uses this session).
        # Held weakly: the entry holds the session, which holds this cache.
        ce = _compiled_entries.get(entry.model_id)
        ref = entry.compiled_ref
        if ce is None or ref is None or ref() is not ce or ce.session is not session:
            ce = self._model_entry(entry, session)
            if ce is None:
                return None
        if entry.n_model_feeds == 1:
            x = arrays[entry.model_feeds[0]]
            if x.ndim == 0:
                return None
            rows = x.shape[0]
            feeds = [x]
        else:
            feeds = [arrays[i] for i in entry.model_feeds]
            x = feeds
            rows = feeds[0].shape[0] if feeds[0].ndim else 0
            if any(a.ndim == 0 or a.shape[0] != rows for a in feeds):
                return None
        if not rows:
            return None
        if not entry.model_pure:
            hooks.graph_event()
        try:
            outs = _serve(ce, x, feeds, rows, 0)
        except _tf.OpError as exc:
            session._do_call(_raise, exc)     # raised as Session.run raises it
        if outs is RERUN:
            return RERUN
        index = entry.model_outputs
        if entry.kind is _SINGLE:
            return outs[index[0]]
        return entry.build([outs[j] for j in index])

    @staticmethod
    def _model_entry(entry, session):
        if not entry.model_checked:
            _find_model(entry)
        ref = entry.model_ref           # (read once: another thread may have looked)
        model = None if ref is None else ref()
        if model is None:
            entry.model_ref = None
            return None
        ce = model_path.model_entry(model, session)
        if ce is None:
            entry.compiled_ref = None
            return None
        # Bound last: another thread takes the model path once compiled_ref matches, and
        # reads the rest without a lock.
        entry.model_pure = entry.is_pure(False)
        entry.model_id = id(model)
        entry.compiled_ref = weakref.ref(ce)
        return ce


_compiled_entries = compiled.by_model_id      # the engine's entries (read without a lock)
# Why a call with a cached signature went to Session.run (the report's reasons).
_UNCONVERTED = 'a feed value Session.run converts itself (or rejects)'
_FAILED = 'the fast run failed: Session.run raises its own error'
_VALIDATES = 'a new signature or feed shapes: Session.run checks them'
_serve = route.serve


RERUN = route.RERUN  # a model-path run failed with no side effects: the original answers


def _raise(exc):
    raise exc


def _add_shapes(entry, shapes):
    if len(entry.shapes) >= MAX_SHAPES:
        entry.shapes = set()
    entry.shapes.add(shapes)


def _passes_run_checks(entry, arrays):
    """Whether ``Session.run`` accepts these feed arrays (converted as it converts them,
    ``_Entry.convert``) before running anything: each fed tensor's static shape is
    compatible with its array's shape, and the tensor may be fed. Its other checks (the
    fetches, feed keys and values) were made where the signature was cached and the
    arrays converted."""
    graph = entry.graph
    for t, a in zip(entry.feeds, arrays):
        if not t.get_shape().is_compatible_with(a.shape) or not graph.is_feedable(t):
            return False
    return True


def _find_model(entry):
    # Marked checked last, with model_ref the last field bound: other threads read them
    # without a lock (one that sees the entry unchecked looks for the model itself).
    found = None if entry.targets else model_path.model_of(
        entry.feeds, entry.fetches, entry.phase_index)
    if found is not None:
        model, model_feeds, entry.model_outputs = found
        entry.model_feeds = model_feeds
        entry.n_model_feeds = len(model_feeds)
        entry.model_ref = weakref.ref(model)
    entry.model_checked = True


adapter = SessionRunAdapter()
