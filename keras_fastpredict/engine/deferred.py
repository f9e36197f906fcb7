"""Deferred calls: predict returns at once with a stand-in for its numpy array.

A ``Scope`` (one per ``batching()`` block or ``@fast_predict`` call, one per thread for
auto-batched sites) collects the pending requests of its thread and runs them together;
``Scope.defer`` is the one way a call is deferred. The stand-in (``DeferredArray``) and
the pending state it wraps until its batch has run are ``engine.pending``'s.
"""
import collections
import itertools
import os
import threading
import time
import weakref

import numpy as np
import wrapt

from . import hooks, merge
from .pending import C_PROXY, DeferredArray, Known, Pending, SLOT_BITS, set_wrapped
from .pending import batches as pending_batches, calls as pending_calls
from ..config import settings

try:    # a scope's usual deferral, an auto-batched site's usual call, in C (specified
    # by Scope.defer and auto_caller's call, which take every other call)
    from ._deferral import AutoCall as _AutoCall, Deferrer as _Deferrer, forget as _forget
    from ._deferral import settle as _settle_c
except ImportError:
    _AutoCall = _Deferrer = _forget = _settle_c = None
if not C_PROXY:     # (settle writes at the C proxy's offset; the others make proxies by
    _settle_c = None    # calling the type, and read none in place)

_local = threading.local()          # .stack: the active scopes of this thread
_scopes = set()                     # scopes with pending work, for hooks to flush
_scopes_lock = threading.Lock()
_active = 0                         # scopes on any thread's stack
_serials = itertools.count(1)       # batches' serials (see pending.calls)


class _Batch(object):
    """One model's deferred calls in a scope: their rows, copied into one input buffer."""
    __slots__ = ('scope', 'entry', 'buffers', 'n', 'stops', 'proxies', 'derived',
                 'results', 'owner', 'capacity', 'serial', 'key', 'n_outputs', 'row_shapes',
                 'dtypes', 'retired')

    def __init__(self, scope, entry, buffers, owner):
        self.owner = owner        # auto-batch: the site (its Auto) of the first call
        self.capacity = len(buffers[0])
        self.scope, self.entry, self.buffers = scope, entry, buffers
        self.n = 0
        self.stops = []           # per call: where its rows end (untracked ints)
        self.proxies = []         # per slot (call * n_outputs + output): its proxy
        self.derived = []         # proxies made by indexing a pending one
        self.results = None       # per slot: the output, or the call's exception
        self.serial = next(_serials)
        self.key = self.serial << SLOT_BITS
        self.n_outputs = entry.n_outputs
        self.row_shapes = entry.row_shapes
        self.dtypes = entry.output_dtypes
        self.retired = None       # the objects its proxies wrapped before it ran


class Scope(object):
    """Pending predict calls of one thread, run together when any result is needed."""

    def __init__(self, max_batch_size=None, models=None, readahead=None):
        self.max_batch_size = max_batch_size or settings.max_batch_size
        self.model_ids = None if models is None else {id(m) for m in models}
        self.readahead = readahead
        self.lock = threading.RLock()
        self._open = {}           # entry -> _Batch being filled
        # Batches whose run an interrupt (Ctrl-C) cut short: pending still, run first by
        # the next flush (the interrupt reached the caller, as it does a plain call).
        self._interrupted = []
        # Per model, by id(entry) so that a long-lived scope keeps no dropped model's entry
        # (and session) alive: how many flushes in a row ran a lone call because its value
        # was read at once (a use-immediately loop); past a limit deferral only adds cost.
        self._lone_flushes = {}
        self._fast = _deferrer(self._open, self.max_batch_size)

    def wants(self, entry):
        if self.model_ids is not None:
            model = entry.model_ref()
            if model is None or id(model) not in self.model_ids:
                return False
        return entry.fixed_rows and self._lone_flushes.get(id(entry), 0) < 16

    def defer(self, entry, arrays, rows, owner=None):
        """One call's deferred results, a list of one per output. Its ``rows``
        rows of ``arrays`` (one per feed) are copied into the batch's buffers now, cast
        as Keras casts them (loops often refill one input buffer for the next call).
        ``owner``: the auto-batched site making the call (told how its batches ran)."""
        fast = self._fast           # (the usual call, where it applies: _native/deferrer.c)
        if fast is not None and len(arrays) == 1:
            proxy = fast(entry, arrays[0], rows, None)
            if proxy is not None:
                return [proxy]
        with self.lock:
            batch = self._open.get(entry)
            if batch is not None and batch.n + rows > batch.capacity:
                self._run_full(batch)
                batch = None
            if batch is None:
                batch = self._new_batch(entry, rows, owner)
                if owner is not None:
                    owner.open += 1     # (the report counts no run that is still to come)
            start = batch.n
            stop = batch.n = start + rows
            if len(arrays) == 1:
                batch.buffers[0][start:stop] = arrays[0]
            else:
                for buf, a in zip(batch.buffers, arrays):
                    buf[start:stop] = a
            batch.stops.append(stop)
            # Per output: an untracked Pending, placed by its id (pending.calls), in a proxy.
            proxies = batch.proxies
            slot = batch.key + len(proxies)
            pending = Pending()
            pending_calls[id(pending)] = slot
            result = [DeferredArray(pending)]
            for k in range(1, batch.n_outputs):
                pending = Pending()
                pending_calls[id(pending)] = slot + k
                result.append(DeferredArray(pending))
            proxies += result
            entry.stats.deferred += 1
            if stop >= self.max_batch_size:
                self._run_full(batch)
        return result

    def _run_full(self, batch):
        _retire([self._run(batch, lone_read=False)])

    def _new_batch(self, entry, rows, owner):
        capacity = max(rows, min(self.max_batch_size, entry.large_batch))
        buffers = [np.empty((capacity,) + shape[1:], dtype) for shape, dtype in
                   zip(entry.feed_shapes, entry.feed_dtypes)]
        batch = self._open[entry] = _Batch(self, entry, buffers, owner)
        pending_batches[batch.serial] = batch
        if len(self._open) == 1:
            with _scopes_lock:
                _scopes.add(self)
        return batch

    def _run(self, batch, lone_read):
        """Run ``batch`` and settle its proxies; returns it (to be retired)."""
        entry = batch.entry
        # First, before anything of the batch is read: the C deferral (which takes no
        # lock) then adds no row to it (see _native/deferrer.c).
        if self._open.get(entry) is batch:
            del self._open[entry]
        else:
            self._interrupted.remove(batch)
        if not self._open and not self._interrupted:
            with _scopes_lock:
                _scopes.discard(self)
        n_calls = len(batch.stops)
        key = id(entry)
        if lone_read and n_calls == 1:
            self._lone_flushes[key] = self._lone_flushes.get(key, 0) + 1
        else:
            self._lone_flushes[key] = 0
        arrays = [buf[:batch.n] for buf in batch.buffers]
        entry.stats.deferred_batches += 1
        try:
            results = merge.run_calls(entry, arrays, batch.stops)
        except Exception as exc:      # a failure of the engine itself: every call gets it
            results = [exc] * len(batch.proxies)
        except BaseException:
            entry.stats.deferred_batches -= 1
            self._interrupted.append(batch)
            with _scopes_lock:
                _scopes.add(self)
            raise
        batch.results = results
        batch.buffers = batch.entry = batch.scope = None    # results are all it needs now
        _settle(batch)
        return batch

    def flush(self, lone_read=True):
        """Run every pending call of this scope."""
        with self.lock:
            self._run_all(self.pending(), lone_read)

    def pending(self):
        """The batches not run yet."""
        return self._interrupted + list(self._open.values())

    def _run_all(self, batches, lone_read):
        ran = []
        try:
            for batch in batches:
                ran.append(self._run(batch, lone_read))
        finally:    # (those run before an interrupt too)
            if ran:
                _retire(ran)

    # Context-manager use: push on this thread's stack; leaving runs what is pending.
    def activate(self):
        global _active
        with _scopes_lock:
            _active += 1
        _stack().append(self)

    def deactivate(self):
        global _active
        stack = _stack()
        if stack and stack[-1] is self:
            stack.pop()
        elif self in stack:
            stack.remove(self)
        else:
            return
        with _scopes_lock:
            _active -= 1

    def __enter__(self):
        self.activate()
        return self

    def __exit__(self, *exc):
        self.deactivate()
        self.flush(lone_read=False)
        return False


# The dtypes whose rows the C deferrer copies byte for byte (no object references).
_PLAIN = tuple(np.dtype(t) for t in (
    'int16 bool int8 uint8 uint16 int32 uint32 int64 uint64 float16 float32 float64 '
    'complex64 complex128').split())
_PROBE = np.zeros((2, 3), np.int16)     # (its layout checked by the deferrer's init)


def _deferrer(open_, max_rows):
    """The C deferrer of a scope's batches ``open_``, or None (not built, or numpy's
    arrays not laid out as it reads them)."""
    if _Deferrer is None:
        return None
    try:
        return _Deferrer(open_, max_rows, Pending, DeferredArray, pending_calls, _PLAIN,
                         tuple(d.itemsize for d in _PLAIN), _PROBE, _PROBE.ctypes.data)
    except TypeError:
        return None


_wrapped_of = wrapt.ObjectProxy.__dict__['__wrapped__'].__get__


def _settle(batch):
    """Point the proxies at their real arrays; a failed call's proxies at a ``Known``
    that keeps raising its error."""
    # A settle can happen inside an operation on a proxy: wrapt hands numpy the wrapped
    # Pending as a borrowed reference, and numpy may still use it. The replaced objects
    # are kept with the batch, in the ring of recently retired ones (_retire), for the
    # next few flushes, longer than any one operation lasts (it touches two proxies, so
    # two flushes, at most); their places in pending.calls as long.
    proxies, results = batch.proxies, batch.results
    # In C where no result is an exception (None: it changed nothing).
    retired = None if _settle_c is None else _settle_c(proxies, results)
    if retired is None:
        retired = list(map(_wrapped_of, proxies))
        if any(map(isinstance, results, itertools.repeat(Exception))):
            n_outputs = batch.n_outputs
            for slot, (proxy, result) in enumerate(zip(proxies, results)):
                if isinstance(result, Exception):
                    pending = retired[slot]
                    result = Known(batch, slot, (), pending._kfp_shape,
                                    batch.dtypes[slot % n_outputs])
                set_wrapped(proxy, result)
        else:
            collections.deque(map(set_wrapped, proxies, results), 0)
    batch.retired = retired
    for proxy in batch.derived:
        pending = proxy.__wrapped__
        if not isinstance(results[pending._kfp_slot], Exception):
            retired.append(pending)
            set_wrapped(proxy, pending._kfp_value())
    batch.proxies = batch.derived = None


_retired = collections.deque()  # lists of the batches run by recent flushes
_RETIRED_KEPT = 4


def _retire(batches):
    """Keep the batches just run (and what their proxies wrapped) for a few flushes."""
    _retired.append(batches)
    while len(_retired) > _RETIRED_KEPT:
        try:
            old = _retired.popleft()
        except IndexError:          # (another thread's retire took it)
            break
        for batch in old:
            pending_batches.pop(batch.serial, None)
            if _forget is not None:
                _forget(pending_calls, batch.retired)
            else:
                collections.deque(map(pending_calls.pop, map(id, batch.retired),
                                      itertools.repeat(None)), 0)


def _stack():
    stack = getattr(_local, 'stack', None)
    if stack is None:
        stack = _local.stack = []
    return stack


def current():
    """The innermost active scope of this thread, or None."""
    if not _active:             # no scope in any thread: no thread-local lookup per call
        return None
    stack = getattr(_local, 'stack', None)
    return stack[-1] if stack else None


def flush_all():
    """Run every scope's pending calls (before the graph is used). Called on every
    Session.run, so it returns at once when nothing is pending."""
    if not _scopes or getattr(_local, 'flushing_all', False):
        return
    _local.flushing_all = True
    try:
        with _scopes_lock:
            scopes = list(_scopes)
        for scope in scopes:
            scope.flush(lone_read=False)
    finally:
        _local.flushing_all = False


def settle_session(session):
    """Run the pending calls that run on ``session`` (before it closes). A pending batch
    holds its session through its entry, so a session the garbage collector closes has
    none: this is then a no-op, whatever the collector interrupted."""
    if not _scopes:
        return
    with _scopes_lock:
        scopes = list(_scopes)
    for scope in scopes:
        with scope.lock:
            scope._run_all([batch for batch in scope.pending()
                            if batch.entry.session is session], False)


hooks.flush_all = flush_all


class AutoScope(Scope):
    """A thread's scope for auto-batched call sites (``engine.autobatch``): never on the
    thread's stack (a site's calls come here one by one, from ``auto_caller``), flushed as
    any scope is (a read, a full batch, graph use, a session closing) and at exit or fork.
    Each batch tells the site of its first call whether it ran a lone call because its
    value was read at once: past a limit, that site goes back to the fast path."""

    calling = False     # a full batch run inside a call (timed as part of the call)

    def _run_full(self, batch):
        self.calling = True
        try:
            Scope._run_full(self, batch)
        finally:
            self.calling = False

    def _run(self, batch, lone_read):
        owner = batch.owner
        lone = lone_read and len(batch.stops) == 1
        start = time.perf_counter()
        Scope._run(self, batch, lone_read)
        if owner is not None:
            owner.ran(lone, 0.0 if self.calling else time.perf_counter() - start)
        return batch


def auto_caller(entries, owner, serves, eligible):
    """The call of an auto-batched site of a single-input model: ``call(model, args,
    kwargs)`` gives its deferred result (a list of them for several outputs, as predict
    returns them; made by ``Scope.defer``, in this thread's ``AutoScope``), or None where the call must take the usual path: not ``owner.on``;
    other arguments than one array (the recorder checked its type and rows); the model's
    entry (in ``entries``, by id: none is held here, so a freed model's session is not
    kept) not ``eligible`` or no longer batched as it was; an opt-in scope or
    ``defer=True``; ``serves(model, entry)`` false (another session or predict function);
    an input signature Keras has not validated for the model; too many rows. (It is on
    every call of such a site: the names it reads are bound in this closure.)"""
    stats = signatures = None
    bound = [lambda: None]          # the entry the names above are of, weakly
    seen_dtype = seen_tail = None   # the input signature last checked: dtype, shape[1:]
    local, len_, entries_get = _local, len, entries.get

    def call(model, args, kwargs):
        nonlocal stats, signatures, seen_dtype, seen_tail
        if kwargs or len_(args) != 1 or not owner.on:
            return None
        entry = entries_get(id(model))
        if entry is None:
            return None
        if bound[0]() is not entry:         # (first call, compiled again, a new session)
            if not eligible(entry):
                return None
            stats, signatures = entry.stats, entry.signatures
            seen_dtype = seen_tail = None
            bound[0] = weakref.ref(entry)
        x = args[0]
        if (entry.batch_safe is not True or entry.excluded or entry.unroll_ready
                or settings.defer or (_active and current() is not None)
                or not serves(model, entry)):
            return None
        tail = x.shape[1:]
        if x.dtype is not seen_dtype or tail != seen_tail:
            if (x.dtype, tail) not in signatures:
                return None
            seen_dtype, seen_tail = x.dtype, tail
        rows = len_(x)
        if rows >= settings.max_batch_size:
            return None
        try:
            scope = local.auto
        except AttributeError:
            scope = auto_scope()
        fast = scope._fast
        if fast is not None:        # (counts the call as below)
            result = fast(entry, x, rows, owner)
            if result is not None:
                return result
        stats.calls += 1
        stats.fast_calls += 1
        owner.calls += 1
        result = scope.defer(entry, args, rows, owner)
        return result[0] if len_(result) == 1 else result
    if _AutoCall is None:
        return call
    try:
        return _AutoCall(call, owner, entries, serves, settings, globals(), local, np.ndarray)
    except TypeError:           # (numpy's arrays not laid out as it reads them)
        return call


def auto_scope():
    """This thread's auto-batch scope."""
    scope = getattr(_local, 'auto', None)
    if scope is None:
        scope = _local.auto = AutoScope()
        with _scopes_lock:
            _auto_scopes.add(scope)
    return scope


_auto_scopes = weakref.WeakSet()    # every live thread's AutoScope


def flush_auto():
    """Run every auto-batch scope's pending calls (at exit)."""
    if not _auto_scopes:
        return
    with _scopes_lock:
        scopes = list(_auto_scopes)
    for scope in scopes:
        scope.flush(lone_read=False)


def implicit_scope():
    """This thread's scope for ``defer=True`` without a ``batching()`` block: it runs its
    calls when a value is read, when the batch is full, before graph use, and at exit."""
    scope = getattr(_local, 'implicit', None)
    if scope is None:
        scope = _local.implicit = Scope()
    return scope


def _after_fork_in_child():
    # Only this thread survives a fork: its own scopes are the active ones, and a lock
    # another thread held at the fork is never released.
    global _scopes_lock, _active
    _scopes_lock = threading.Lock()
    _active = len(getattr(_local, 'stack', None) or ())


# A forked child must not run its parent's session (TF's threads stay in the parent: run
# on its pool, the child died of SIGSEGV): the calls pending in every scope run in the
# parent first, as before any other graph use, and the child inherits their results.
os.register_at_fork(before=flush_all, after_in_child=_after_fork_in_child)
