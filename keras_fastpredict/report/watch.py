"""Watched results: a returned array handed back as a view of an ndarray subclass that
records its first use (whether results are read before the next call, the evidence
deferral advice rests on)."""
import numpy as np

from ..engine.pending import map_nested

_ndarray = np.ndarray


class Use(object):
    __slots__ = ('site', 'epoch')

    def __init__(self, site, epoch):
        self.site = site
        self.epoch = epoch


def _used(rec):
    site = rec.site
    if rec.epoch == site.epoch:
        # Deferral would have flushed here: every call since the last flush in one batch.
        site.batches.append(site.calls - site.epoch_start)
        site.epoch += 1
        site.epoch_start = site.calls
        site.open_watch = False
    rec.epoch = -1


class Watched(np.ndarray):
    """A result being watched for its first use (see the module docs)."""

    def __array_finalize__(self, obj):
        pass

    def __getattribute__(self, name):
        if name in _QUIET:
            return _ndarray.__getattribute__(self, name)
        _mark(self)
        return getattr(_ndarray.view(self, _ndarray), name)

    def __getitem__(self, key):
        # Any item or view is a use. A view could be watched too, but not its reads:
        # np.asarray(view) (Keras' own text generator does it) makes a plain array of an
        # ndarray subclass without a call the subclass sees, and deferral would run there.
        # So `y[0]` counts as read: the report may miss advice, never give wrong advice.
        _mark(self)
        return _ndarray.view(self, _ndarray)[key]

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        inputs = tuple(plain_of(v) for v in inputs)
        out = kwargs.get('out')
        if not out:
            return getattr(ufunc, method)(*inputs, **kwargs)
        kwargs['out'] = tuple(plain_of(v) for v in out)
        result = getattr(ufunc, method)(*inputs, **kwargs)
        # As numpy returns the out array itself (``y += 1`` keeps y the same object).
        if type(result) is tuple:
            return tuple(o if type(o) is Watched else r for o, r in zip(out, result))
        return out[0] if type(out[0]) is Watched else result

    def __array_function__(self, func, types, args, kwargs):
        return func(*plain_deep(args), **plain_deep(kwargs))

    def __array__(self, dtype=None):
        _mark(self)
        plain = _ndarray.view(self, _ndarray)
        return plain if dtype is None else plain.astype(dtype, copy=False)

    def __array_wrap__(self, array, context=None):
        return _ndarray.view(array, _ndarray)

    def __reduce__(self):
        _mark(self)
        return _ndarray.view(self, _ndarray).__reduce__()

    def __reduce_ex__(self, protocol):
        _mark(self)
        return _ndarray.view(self, _ndarray).__reduce_ex__(protocol)


Watched.__name__ = Watched.__qualname__ = 'ndarray'


_QUIET = frozenset(('shape', 'dtype', 'ndim', 'size', 'itemsize', '__dict__', '__class__',
                    '__array_finalize__', '__array_priority__', '__array_ufunc__',
                    '__array_function__', '__array_wrap__', '__array__', '__len__',
                    '__getitem__', 'base', 'view',
                    # The result's own flags (set on a view, a read-only result stayed
                    # writable): not a read of its values.
                    'flags', 'setflags'))


def _forward(name):
    def method(self, *args):
        _mark(self)
        return getattr(_ndarray.view(self, _ndarray), name)(*args)
    method.__name__ = name
    return method


for _name in ('float int index complex bool iter repr str format contains setitem '
              'delitem copy deepcopy').split():
    setattr(Watched, '__%s__' % _name, _forward('__%s__' % _name))


def _mark(w):
    rec = _ndarray.__getattribute__(w, '__dict__').pop('_kfp_use', None)
    if rec is not None and rec.epoch != -1:
        _used(rec)


def watch(array, rec):
    w = _ndarray.view(array, Watched)
    w._kfp_use = rec
    return w


def plain_of(v):
    if type(v) is Watched:
        _mark(v)
        return _ndarray.view(v, _ndarray)
    return v


def plain_deep(v):
    return map_nested(v, plain_of)


def unwatch_call(x, args, kwargs):
    """A watched result passed back in (the next step of a loop): a use, and the plain
    array goes on, so the call takes the path it takes without the report."""
    new = plain_deep(x)
    if args:
        args = (new,) + tuple(args[1:])
    else:
        kwargs = dict(kwargs, x=new)
    return new, args, kwargs


def unwatch_feeds(args, kwargs):
    """Watched results passed back in (a feed dict's values, a K.function input list): a
    use, and plain arrays go on, so the call takes the path it takes without the report.
    Containers without one are passed as they are."""
    changed = False
    new = []
    for a in args:
        kind = type(a)
        if kind is dict and any(type(v) is Watched for v in a.values()):
            a = {k: plain_of(v) for k, v in a.items()}
            changed = True
        elif (kind is list or kind is tuple) and any(type(v) is Watched for v in a):
            a = kind(plain_of(v) for v in a)
            changed = True
        new.append(a)
    fd = kwargs.get('feed_dict')
    if type(fd) is dict and any(type(v) is Watched for v in fd.values()):
        kwargs = dict(kwargs, feed_dict={k: plain_of(v) for k, v in fd.items()})
    return (tuple(new) if changed else args), kwargs
