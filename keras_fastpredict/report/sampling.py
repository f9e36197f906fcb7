"""A site's sample of first calls: results watched, the function spanning consecutive
calls, one-row inputs compared with arrays in scope. Then the site takes the usual path."""
import threading
import weakref

import numpy as np

from ..config import settings
from . import sites, watch


_ndarray = np.ndarray
_UNNAMED = frozenset(('<listcomp>', '<genexpr>', '<dictcomp>', '<setcomp>', '<lambda>'))


def sampled(site):
    """One more call of the site's sample; the last one once every sampler is done or
    SAMPLE_CALLS calls were sampled (a sampler counts down only on calls it can use: a
    loop that gives it none must not keep its site on the slow path)."""
    site.sample_left -= 1
    if site.sample_left <= 0 or not (site.watch_left or site.span_left or site.fresh_left):
        sites.end_sample(site)


def sample(site, f, out, x, rows, served_ahead):
    sampled(site)
    if site.span_left and f is not None and rows <= 64:
        _span(site, f)
    if (site.fresh_left and rows == 1 and type(x) is _ndarray and x.ndim
            and not served_ahead):
        _fresh(site, f, x)
    if site.watch_left:
        kind = type(out)
        if kind is _ndarray or (kind is list and out and all(type(o) is _ndarray
                                                             for o in out)):
            from ..engine import deferred
            if not settings.defer and deferred.current() is None:
                t = site.threads.get(threading.get_ident())
                if t is not None:       # (counted by calls.after: its own thread's)
                    site.watch_left -= 1
                    site.watched += 1
                    rec = watch.Use(site, t)
                    t.open = True
                    if kind is list:
                        return [watch.watch(o, rec) for o in out]
                    return watch.watch(out, rec)
    return out


def _span(site, f):
    site.span_left -= 1
    tid = threading.get_ident()
    chain = []
    g = f
    while g is not None and len(chain) < 32:
        chain.append(g)
        g = g.f_back
    prev = site.held.get(tid)
    site.held[tid] = chain if site.span_left else None
    if not site.span_left:
        site.held = {}
    if prev is None:
        return
    ids = {id(p) for p in prev}
    for g in chain:
        if id(g) in ids and g.f_code.co_name not in _UNNAMED:
            code = g.f_code
            site.enclosing[(code.co_name, code.co_filename, code.co_firstlineno,
                            g.f_lineno)] += 1
            return


def _fresh(site, f, x):
    shape = x.shape
    base = x.base
    fresh = base is None or (type(base) is _ndarray and base.size == x.size)
    same = shape == site.last_shape
    site.last_shape = shape
    if not fresh or not same:
        return
    site.fresh_left -= 1
    site.fresh += 1
    row = x.reshape(-1)
    found = site.dataset
    if found is not None:
        array = found[0]()
        if array is not None:
            for j in range(found[2] + 1, min(found[2] + 5, len(array))):
                if np.array_equal(array[j].reshape(-1), row):
                    site.dataset = (found[0], found[1], j)
                    site.walk += 1
                    return
        site.dataset = None
        site.walk = 0
        return
    g = f
    for _ in range(3):
        if g is None:
            break
        try:
            names = dict(g.f_locals)
        except Exception:
            names = {}
        for name, value in names.items():
            if (type(value) is _ndarray and value.ndim and value.ndim == x.ndim
                    and len(value) > 1
                    and value.shape[1:] == shape[1:] and value.size <= (1 << 24)):
                flat = value.reshape(len(value), -1)
                hits = np.flatnonzero((flat == row).all(axis=1))
                if len(hits):
                    site.dataset = (weakref.ref(value), name, int(hits[0]))
                    return
        g = g.f_back
