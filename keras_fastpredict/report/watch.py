"""Watched results: a returned array handed back as a view of an ndarray subclass that
records its first use (whether results are read before the next call, the evidence
deferral advice rests on).

Deferral's scope is per thread, so the calls a result's first read would have batched are
its own thread's: each thread that called a site in its sample has its record (``Thread``),
its calls counted on the report's Python path, and on the usual path too (``counter``)
where several threads called it with results still unread. A site one thread called in
its sample counts the site's calls (its usual path counts none apart) until another thread
calls it (``another_thread``). An announced site's usual path (Session.run, K.function)
counts no thread's: there a thread's count may fall short, or take another thread's calls
after a sample one thread made."""
import threading

import numpy as np

from ..engine.pending import map_nested

_ndarray = np.ndarray
_ident = threading.get_ident


class Thread(object):
    """One thread's calls at a site and its open epoch (the calls deferral would batch
    until one of its results is read): ``start`` the site's calls, ``own_start`` its own
    when the epoch began."""
    __slots__ = ('calls', 'epoch', 'start', 'own_start', 'open')

    def __init__(self, start):
        self.calls = self.epoch = self.own_start = 0
        self.start = start
        self.open = False


class Use(object):
    __slots__ = ('site', 'thread', 'epoch')

    def __init__(self, site, thread):
        self.site = site
        self.thread = thread
        self.epoch = thread.epoch


def counted(site):
    """A call of this thread at the site, looked at in Python: counted in its thread's
    record, made while the site samples (later threads' results are not watched)."""
    t = site.threads.get(_ident())
    if t is not None:
        t.calls += 1
    elif site.sampling:
        t = site.threads[_ident()] = Thread(site.calls)
        t.calls = 1
    return t


def counter(site, then):
    """The usual path's count of each thread's calls (as the hot tuple's call: None for
    the usual path), then ``then`` (auto-batch's call) if any."""
    threads = site.threads

    def count(instance, args, kwargs):
        t = threads.get(_ident())
        if t is not None:
            t.calls += 1
        return None if then is None else then(instance, args, kwargs)
    return count


def counting(site):
    """What the usual path counts while some result is unread: each thread's calls (True)
    where several threads called the site in its sample; else the id of the one thread that
    did, whose calls are the site's until another thread calls (``another_thread``).
    None: nothing."""
    items = list(site.threads.items())
    if not any(t.open for _, t in items):
        return None
    return True if len(items) > 1 else items[0][0]


def another_thread(site):
    """A thread other than the sample's one calls the site: every call so far was that
    one's, so its count goes on from the site's, and this thread's calls count apart."""
    items = list(site.threads.items())
    if len(items) == 1:
        t = items[0][1]
        t.own_start = t.start
        t.calls = site.calls
    site.threads.setdefault(_ident(), Thread(site.calls))


def pending(site, t):
    """The calls deferral would have run in ``t``'s open batch, so far."""
    if len(site.threads) == 1:
        return site.calls - t.start
    return t.calls - t.own_start


def batches(site):
    """Each batch deferral would have run (its results' first read), and each thread's
    open one."""
    out = list(site.batches)
    out.extend(pending(site, t) for t in list(site.threads.values()) if t.open)
    return out


def _used(rec):
    site, t = rec.site, rec.thread
    if rec.epoch == t.epoch:
        # Deferral would have flushed here: the thread's calls since its last flush in one
        # batch.
        site.batches.append(pending(site, t))
        t.epoch += 1
        t.start = site.calls
        t.own_start = t.calls
        t.open = False
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
