"""The stand-in a deferred predict call returns, and what it wraps until its batch has run.

A ``DeferredArray`` is a wrapt proxy. Until its batch has run it wraps a ``Pending``
object that knows the shape and dtype and runs the batch on any other use; then the
proxy is pointed at the real array (``set_wrapped``), so later uses cost what a plain
proxy costs. A pending call's batch and slot are found by its id in ``calls``; the
batches themselves (made and run by ``deferred.Scope``) by serial in ``batches``.
"""
import numpy as np
import wrapt

_ZERO = bytearray(1)
# Points a proxy at another object, past DeferredArray.__setattr__ (and faster).
set_wrapped = wrapt.ObjectProxy.__dict__['__wrapped__'].__set__

try:    # wrapt's C proxy; with WRAPT_DISABLE_EXTENSIONS set wrapt's proxy is its Python one
    from wrapt._wrappers import ObjectProxy as _CObjectProxy
except ImportError:
    _CObjectProxy = None
# Whether DeferredArray is wrapt's C proxy: the C code (engine/_native) that reads or
# makes proxies in place assumes its layout, and is used only then.
C_PROXY = _CObjectProxy is not None and issubclass(wrapt.ObjectProxy, _CObjectProxy)


class DeferredArray(wrapt.ObjectProxy):
    """Stands for the ndarray a deferred predict call will return."""

    if not C_PROXY:
        # wrapt's Python proxy copies the wrapped object's __qualname__ and
        # __annotations__ at init: asked of a Pending, that ran its batch before the call
        # was even in it (its result then read a batch retired since: KeyError). (Not on
        # the C proxy: uncounted() takes a type with no __init__ of its own.)
        def __init__(self, wrapped):
            set_wrapped(self, wrapped)

    def __repr__(self):
        return repr(self.__wrapped__)

    # wrapt's C proxy fills only the mapping slot for [], so PySequence_Check() is false
    # for it. numpy 1.18 (discover_dimensions) then takes a list element for a scalar
    # before looking at its __array_struct__: np.array([proxies]) gave a 1-d array (or
    # float(proxy) failed). Defined in Python, __getitem__ also fills the sequence slot.
    def __getitem__(self, key):
        return self.__wrapped__[key]

    # Setting an attribute (y.shape = ..., y.dtype = ...) acts on the real array, as on an
    # ndarray: the batch runs first. (Here, not on Pending: its __init__ stays cheap.)
    def __setattr__(self, name, value):
        if name == '__wrapped__':
            set_wrapped(self, value)
        else:
            resolve(self)               # runs the batch: self now wraps the real array
            setattr(self.__wrapped__, name, value)

    def __delattr__(self, name):
        if name == '__wrapped__':
            wrapt.ObjectProxy.__delattr__(self, name)
        else:
            resolve(self)
            delattr(self.__wrapped__, name)

    # numpy looks these up when converting; defined here they skip a failed attribute
    # lookup on the proxy (np.concatenate of many results is a common next step).
    # (ndarray's own priority, found on the class: no lookup forwarded to the wrapped
    # object, which for a pending one would run its batch.)
    __array_priority__ = 0.0

    # numpy functions (np.concatenate, np.stack, ...) get the real arrays: numpy's own
    # conversion of each proxy cost 1.5-2.5 us against 0.2 a real array. Functions that
    # read only the shape get the proxies as they are (a pending one answers without
    # running its batch).
    def __array_function__(self, func, types, args, kwargs):
        if func in _SHAPE_ONLY:
            return func._implementation(*args, **kwargs)
        return func(*materialize(args), **materialize(kwargs))

    @property
    def __array_struct__(self):
        return resolve(self).__array_struct__

    @property
    def __array_interface__(self):
        return resolve(self).__array_interface__

    def __reduce_ex__(self, protocol):
        return resolve(self).__reduce_ex__(protocol)

    def __reduce__(self):
        return resolve(self).__reduce__()

    def __copy__(self):
        return resolve(self).copy()

    def __deepcopy__(self, memo):
        return resolve(self).copy()

    # A ufunc writes only into real arrays (out=y raised TypeError): the real ones are
    # passed, and the proxy given as out= is returned as plain numpy returns the out array.
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get('out')
        if out is not None:
            kwargs['out'] = tuple(resolve(o) for o in out)
        result = getattr(ufunc, method)(*(resolve(v) for v in inputs), **kwargs)
        if out is None:
            return result
        if type(result) is tuple:
            return tuple(o if type(o) is DeferredArray else r for o, r in zip(out, result))
        return out[0] if type(out[0]) is DeferredArray and result is not None else result


_SHAPE_ONLY = frozenset((np.shape, np.ndim, np.size))

try:    # Results that bring no garbage collection on, as the ndarrays they stand for.
    from ._deferral import uncounted
except ImportError:     # (not built: they count towards the next one as any object)
    pass
else:   # (wrapt's C proxy only: on its Python one, uncounted took object's init as
    if C_PROXY:     # wrapt's, and raised TypeError at import, the type half changed)
        uncounted(DeferredArray)


def resolve(value):
    """The real ndarray behind ``value`` (running its batch if need be)."""
    if type(value) is DeferredArray:
        inner = value.__wrapped__
        if type(inner) in PENDING:
            return inner._kfp_value()
        return inner
    return value


def resolving_first_argument(wrapped, instance, args, kwargs):
    """numpy.random.shuffle's type check is C's, not isinstance: a proxy takes its path
    for sequences, which swaps rows through views and duplicates them. It gets the array."""
    if args and type(args[0]) is DeferredArray:
        args = (resolve(args[0]),) + tuple(args[1:])
    return wrapped(*args, **kwargs)


resolving_first_argument._kfp_pickled_as_original = True


def map_nested(obj, leaf):
    """``obj`` with ``leaf`` applied to everything in it that is no list, tuple or dict
    (the containers Keras takes inputs in and functions return results in)."""
    kind = type(obj)
    if kind is list or kind is tuple:
        return kind(map_nested(v, leaf) for v in obj)
    if kind is dict:
        return {k: map_nested(v, leaf) for k, v in obj.items()}
    return leaf(obj)


def materialize(obj):
    """``obj`` with deferred arrays replaced by ndarrays, in lists, tuples and dicts too."""
    return map_nested(obj, resolve)


def _shape_after(shape, key):
    # The shape of array[key] without the data: index a zero-stride array of that shape.
    return np.ndarray(shape, np.bool_, _ZERO, 0, (0,) * len(shape))[key].shape


class Pending(object):
    """What a DeferredArray wraps until its batch has run: one output of one call.

    It holds nothing (no slots: the garbage collector does not track it, where a tracked
    object per pending call filled the youngest generation and brought full collections
    into collect loops); its batch and slot are found by its id in ``calls`` (see
    ``Scope.defer``). ``Known`` is the same with its place held in slots. Its own names
    start with ``_kfp_`` so that none hides an ndarray attribute (the proxy forwards every
    attribute here; ``hasattr(y, 'keys')`` must stay False).
    """
    __slots__ = ()

    @property
    def __class__(self):
        return np.ndarray

    @property
    def _kfp_batch(self):
        return batches[calls[id(self)] >> SLOT_BITS]

    @property
    def _kfp_slot(self):            # the call's index times its model's outputs, + output
        return calls[id(self)] & SLOT_MASK

    _kfp_keys = ()                  # indexes applied to the output (a row of it, ...)

    @property
    def _kfp_shape(self):           # None where the output shape is not static
        batch = self._kfp_batch
        slot = self._kfp_slot
        row = batch.row_shapes[slot % batch.n_outputs]
        if row is None:
            return None
        call = slot // batch.n_outputs
        stops = batch.stops
        return (stops[call] - (stops[call - 1] if call else 0),) + row

    @property
    def _kfp_dtype(self):
        batch = self._kfp_batch
        return batch.dtypes[self._kfp_slot % batch.n_outputs]

    def _kfp_value(self):
        batch = self._kfp_batch
        scope = batch.scope     # (first: another thread's run sets results, then clears it)
        if batch.results is None:
            scope.flush()
        value = batch.results[self._kfp_slot]
        if isinstance(value, Exception):
            raise value
        for key in self._kfp_keys:
            value = value[key]
        return value

    # Known without running the batch.
    @property
    def dtype(self):
        return self._kfp_dtype

    @property
    def shape(self):
        shape = self._kfp_shape
        return shape if shape is not None else self._kfp_value().shape

    @property
    def ndim(self):
        shape = self._kfp_shape
        return len(shape) if shape is not None else self._kfp_value().ndim

    @property
    def size(self):
        shape = self._kfp_shape
        return int(np.prod(shape)) if shape is not None else self._kfp_value().size

    def __len__(self):
        shape = self._kfp_shape
        return shape[0] if shape is not None else len(self._kfp_value())

    def __getitem__(self, key):
        shape = self._kfp_shape
        batch = self._kfp_batch
        if shape is not None and _simple_key(key):
            shape = _shape_after(shape, key)
            scope = batch.scope
            if shape and scope is not None:
                with scope.lock:        # (another thread's run settles batches under it)
                    if batch.results is None:
                        proxy = DeferredArray(Known(batch, self._kfp_slot,
                                                     self._kfp_keys + (key,), shape,
                                                     self._kfp_dtype))
                        batch.derived.append(proxy)
                        return proxy
        return self._kfp_value()[key]

    def __getattr__(self, name):
        return getattr(self._kfp_value(), name)

    def __iter__(self):
        return iter(self._kfp_value())

    def __hash__(self):
        raise TypeError("unhashable type: 'numpy.ndarray'")


class Known(Pending):
    """A ``Pending`` whose place is held here: a row (or other part) of a pending result,
    and a failed call's result (which raises the call's error on every use)."""
    __slots__ = ('_kfp_batch', '_kfp_slot', '_kfp_keys', '_kfp_shape', '_kfp_dtype')

    def __init__(self, batch, slot, keys, shape, dtype):
        self._kfp_batch = batch
        self._kfp_slot = slot
        self._kfp_keys = keys
        self._kfp_shape = shape
        self._kfp_dtype = dtype


PENDING = (Pending, Known)
# Pending calls: id(Pending) -> its batch's serial << SLOT_BITS | its slot (untracked
# ints), from its call until its batch leaves deferred's ring of retired batches; the
# batches by serial, as long.
SLOT_BITS = 32
SLOT_MASK = (1 << SLOT_BITS) - 1
calls = {}
batches = {}

try:    # materialize in C (numpy functions given many results: 0.4 us a result in Python)
    from ._deferral import Materializer
except ImportError:
    pass
else:   # (it reads a proxy's wrapped object at the C proxy's offset)
    if C_PROXY:
        materialize = Materializer(resolve, DeferredArray, PENDING)


def _simple_key(key):
    if type(key) is tuple:
        return all(type(k) in (int, slice) or k is None or k is Ellipsis for k in key)
    return type(key) in (int, slice)


def _forward(name):
    def method(self, *args):
        return getattr(self._kfp_value(), name)(*args)
    method.__name__ = name
    return method


def _forward_inplace(name):
    def method(self, other):
        value = self._kfp_value()
        getattr(value, name)(other)
        return value
    method.__name__ = name
    return method


for _name in ('add sub mul truediv floordiv mod divmod pow matmul lshift rshift and or xor'
              ).split():
    for _fmt in ('__%s__', '__r%s__'):
        setattr(Pending, _fmt % _name, _forward(_fmt % _name))
    if _name != 'divmod':
        setattr(Pending, '__i%s__' % _name, _forward_inplace('__i%s__' % _name))
for _name in ('lt le eq ne gt ge neg pos abs invert float int index complex bool '
              'contains setitem delitem str format round array').split():
    setattr(Pending, '__%s__' % _name, _forward('__%s__' % _name))
Pending.__repr__ = _forward('__repr__')
