"""Deferred results: predict returns at once with a stand-in for its numpy array.

A ``DeferredArray`` is a wrapt proxy. Until its batch has run it wraps a ``_Pending``
object that knows the shape and dtype and runs the batch on any other use; then the
proxy is pointed at the real array, so later uses cost what a plain proxy costs.
A ``Scope`` (one per ``batching()`` block or ``@fast_predict`` call) collects the pending
requests of its thread and runs them together.
"""
import threading
import weakref

import numpy as np
import wrapt

from . import engine, hooks
from .config import settings

_local = threading.local()          # .stack: the active scopes of this thread
_scopes = set()                     # scopes with pending work, for hooks to flush
_scopes_lock = threading.Lock()
_ZERO = bytearray(1)


class DeferredArray(wrapt.ObjectProxy):
    """Stands for the ndarray a deferred predict call will return."""

    def __repr__(self):
        return repr(self.__wrapped__)

    def __reduce_ex__(self, protocol):
        return resolve(self).__reduce_ex__(protocol)

    def __reduce__(self):
        return resolve(self).__reduce__()

    def __copy__(self):
        return resolve(self).copy()

    def __deepcopy__(self, memo):
        return resolve(self).copy()


def resolve(value):
    """The real ndarray behind ``value`` (running its batch if need be)."""
    if type(value) is DeferredArray:
        inner = value.__wrapped__
        if type(inner) is _Pending:
            return inner._value()
        return inner
    return value


def materialize(obj):
    """``obj`` with deferred arrays replaced by ndarrays, in lists, tuples and dicts too."""
    kind = type(obj)
    if kind is DeferredArray:
        return resolve(obj)
    if kind is list or kind is tuple:
        return kind(materialize(v) for v in obj)
    if kind is dict:
        return {k: materialize(v) for k, v in obj.items()}
    return obj


def _shape_after(shape, key):
    # The shape of array[key] without the data: index a zero-stride array of that shape.
    return np.ndarray(shape, np.bool_, _ZERO, 0, (0,) * len(shape))[key].shape


class _Pending(object):
    """What a DeferredArray wraps until its request has run."""
    __slots__ = ('request', 'output', 'keys', '_shape', 'dtype')

    def __init__(self, request, output, keys, shape, dtype):
        self.request = request
        self.output = output
        self.keys = keys
        self._shape = shape       # None where the model's output shape is not static
        self.dtype = dtype

    @property
    def __class__(self):
        return np.ndarray

    def _value(self):
        req = self.request
        if req.outputs is None and req.error is None:
            req.scope_ref().flush()
        if req.error is not None:
            raise req.error
        value = req.outputs[self.output]
        for key in self.keys:
            value = value[key]
        return value

    # Known without running the batch.
    @property
    def shape(self):
        return self._shape if self._shape is not None else self._value().shape

    @property
    def ndim(self):
        return len(self._shape) if self._shape is not None else self._value().ndim

    @property
    def size(self):
        return int(np.prod(self._shape)) if self._shape is not None else self._value().size

    def __len__(self):
        return self._shape[0] if self._shape is not None else len(self._value())

    def __getitem__(self, key):
        if self._shape is not None and _simple_key(key):
            shape = _shape_after(self._shape, key)
            if shape:
                proxy = DeferredArray(_Pending(self.request, self.output, self.keys + (key,),
                                               shape, self.dtype))
                if self.request.outputs is None and self.request.error is None:
                    self.request.proxies.append(proxy)
                    return proxy
        return self._value()[key]

    def __getattr__(self, name):
        return getattr(self._value(), name)

    def __iter__(self):
        return iter(self._value())

    def __hash__(self):
        raise TypeError("unhashable type: 'numpy.ndarray'")


def _simple_key(key):
    if type(key) is tuple:
        return all(type(k) in (int, slice) or k is None or k is Ellipsis for k in key)
    return type(key) in (int, slice)


def _forward(name):
    def method(self, *args):
        return getattr(self._value(), name)(*args)
    method.__name__ = name
    return method


def _forward_inplace(name):
    def method(self, other):
        value = self._value()
        getattr(value, name)(other)
        return value
    method.__name__ = name
    return method


for _name in ('add sub mul truediv floordiv mod divmod pow matmul lshift rshift and or xor'
              ).split():
    for _fmt in ('__%s__', '__r%s__'):
        setattr(_Pending, _fmt % _name, _forward(_fmt % _name))
    if _name != 'divmod':
        setattr(_Pending, '__i%s__' % _name, _forward_inplace('__i%s__' % _name))
for _name in ('lt le eq ne gt ge neg pos abs invert float int index complex bool '
              'contains setitem delitem str format round array').split():
    setattr(_Pending, '__%s__' % _name, _forward('__%s__' % _name))
_Pending.__repr__ = _forward('__repr__')


class Scope(object):
    """Pending predict calls of one thread, run together when any result is needed."""

    def __init__(self, max_batch_size=None, models=None, readahead=None):
        self.max_batch_size = max_batch_size or settings.max_batch_size
        self.model_ids = None if models is None else {id(m) for m in models}
        self.readahead = readahead
        self.pending = []
        self.rows = 0
        self.lock = threading.RLock()
        # Per model: how many flushes in a row ran a lone call because its value was read
        # at once (a use-immediately loop); past a limit deferral only adds cost.
        self._lone_flushes = {}
        self._reading = False

    def wants(self, entry):
        if self.model_ids is not None and entry.model_ref is not None:
            model = entry.model_ref()
            if model is None or id(model) not in self.model_ids:
                return False
        return self._lone_flushes.get(id(entry), 0) < 16

    def defer(self, entry, arrays, rows):
        # Copy now: loops often refill one input buffer for the next call.
        arrays = [np.array(a) for a in arrays]
        req = engine.Request(entry, arrays, rows)
        req.scope_ref = weakref.ref(self)
        req.proxies = []
        proxies = []
        for i, (shape, dtype) in enumerate(zip(entry.output_shapes, entry.output_dtypes)):
            static = None if None in shape[1:] else (rows,) + tuple(shape[1:])
            proxy = DeferredArray(_Pending(req, i, (), static, dtype))
            req.proxies.append(proxy)
            proxies.append(proxy)
        entry.stats.deferred += 1
        with self.lock:
            if not self.pending:
                with _scopes_lock:
                    _scopes.add(self)
            self.pending.append(req)
            self.rows += rows
            full = self.rows >= self.max_batch_size
        if full:
            self.flush(lone_read=False)
        return proxies

    def flush(self, lone_read=True):
        with self.lock:
            requests, self.pending = self.pending, []
            self.rows = 0
            if not requests:
                return
            with _scopes_lock:
                _scopes.discard(self)
            by_entry = {}
            for req in requests:
                by_entry.setdefault(id(req.entry), []).append(req)
            for group in by_entry.values():
                entry = group[0].entry
                if lone_read and len(group) == 1:
                    self._lone_flushes[id(entry)] = self._lone_flushes.get(id(entry), 0) + 1
                else:
                    self._lone_flushes[id(entry)] = 0
                try:
                    engine.run_requests(entry, group)
                except Exception as exc:      # e.g. verification itself failed
                    for req in group:
                        if req.outputs is None:
                            req.error = exc
            for req in requests:
                _settle(req)

    # Context-manager use: push on this thread's stack; leaving runs what is pending.
    def activate(self):
        stack = _stack()
        stack.append(self)

    def deactivate(self):
        stack = _stack()
        if stack and stack[-1] is self:
            stack.pop()
        elif self in stack:
            stack.remove(self)

    def __enter__(self):
        self.activate()
        return self

    def __exit__(self, *exc):
        self.deactivate()
        self.flush(lone_read=False)
        return False


def _settle(req):
    """Point the request's proxies at their real arrays; on error they keep raising it."""
    proxies, req.proxies = req.proxies, None
    if req.error is not None:
        return
    for proxy in proxies:
        pending = proxy.__wrapped__
        if type(pending) is _Pending:
            proxy.__wrapped__ = pending._value()
    req.arrays = None


def _stack():
    stack = getattr(_local, 'stack', None)
    if stack is None:
        stack = _local.stack = []
    return stack


def current():
    """The innermost active scope of this thread, or None."""
    stack = getattr(_local, 'stack', None)
    return stack[-1] if stack else None


def flush_all():
    if not _scopes:
        return
    with _scopes_lock:
        scopes = list(_scopes)
    for scope in scopes:
        scope.flush(lone_read=False)


hooks._flush_all = flush_all


def implicit_scope():
    """This thread's scope for ``defer=True`` without a ``batching()`` block: it runs its
    calls when a value is read, when the batch is full, before graph use, and at exit."""
    scope = getattr(_local, 'implicit', None)
    if scope is None:
        scope = _local.implicit = Scope()
    return scope
