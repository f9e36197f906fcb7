"""The recorder of ``Model.predict`` and ``predict_on_batch`` calls (the model is the
call's instance)."""
import threading
import time
import types

import numpy as np

from ..config import settings
from . import calls, frames, sites, watch


_perf = time.perf_counter
_ndarray = np.ndarray


def recorder(wrapper, table, by_line, entry_name):
    """The recorder around the entry's ``wrapper``."""
    # table: (id(code), line, id(model)) of the user's frame -> Site; by_line: the
    # instruction of the calling frame (f_lasti: read as it is, where f_lineno is computed)
    # -> its site's hot tuple, once the site's sample is taken and where that frame is
    # the user's own. The usual call: one lookup, two identity checks, the input's type and
    # rows, one counter read before and after, the clock. (Names used per call are bound
    # in this closure: a cell is read faster than a global or a builtin, and default
    # arguments would take a function call off CPython's fast path.)
    ndarray, type_, len_, ident = _ndarray, type, len, threading.get_ident

    def rest(f, wrapped, instance, args, kwargs):
        """A call from frame ``f`` (the C recorder's calls other than its usual one)."""
        try:
            hot = by_line[f.f_lasti]       # (a subscript: cheaper than .get's call)
        except KeyError:
            hot = None
        if hot is not None:
            n, owner = len_(hot), None
            if n == 6:
                code, ref, rows, s, acc, site = hot
                auto = False
            elif n == 7:            # auto-batch: the site's Auto.call, or None (see below)
                code, ref, rows, s, acc, site, auto = hot
            else:                   # the sample's one thread, its results unread (hot_tuple)
                code, ref, rows, s, acc, site, auto, owner = hot
            if code is f.f_code and ref() is instance:
                if owner is not None and owner != ident():
                    watch.another_thread(site)
                    out = _record(site, f, wrapper, wrapped, instance, args, kwargs)
                    by_line[f.f_lasti] = hot_tuple(site, s)
                    return out
                x = args[0] if args else None
                if type_(x) is ndarray and x.ndim and len_(x) == rows:
                    # _record's steps, fewer, for the usual call.
                    if auto is None:        # auto-batch alone, a site it does not batch
                        return wrapper(wrapped, instance, args, kwargs)
                    if s.report_owner is not site:
                        sites.take(s, site)
                    if auto is not False:   # a deferred result, or the usual path
                        t0 = _perf()
                        out = auto(instance, args, kwargs)
                        if out is not None:
                            acc[0] += _perf() - t0
                            acc[1] += 1
                            return out
                    fc = s.fast_calls
                    out, elapsed = timed(wrapper, wrapped, instance, args, kwargs, site, s)
                    if s.fast_calls != fc:
                        acc[1] += 1
                    else:
                        sites.passed_on(site, s, rows, elapsed)
                    return out
                out = _record(site, f, wrapper, wrapped, instance, args, kwargs)
                if rows != site.plain_rows and not (site.sampling or site.retime_left):
                    by_line[f.f_lasti] = hot_tuple(site, s)   # plain timed since: rows known
                return out
        site, direct = frames.find_site(table, f, instance, entry_name)
        if site is None:                        # inside a recorded call: not again
            return wrapper(wrapped, instance, args, kwargs)
        out = _record(site, f, wrapper, wrapped, instance, args, kwargs)
        if direct and not (site.sampling or site.retime_left):
            by_line[f.f_lasti] = hot_tuple(site, site.stats)
        return out

    if calls.Recorder is not None:
        return calls.Recorder(by_line, wrapper, rest, calls.through, _ndarray, sites.take,
                              sites.passed_on, sites.error_in_call)
    return calls.in_python(wrapper, rest)


frames.RECORDER_CODES.update(id(c) for c in recorder.__code__.co_consts
                             if isinstance(c, types.CodeType) and c.co_name == 'rest')


def hot_tuple(site, counters):
    """What a site's usual call reads, in one tuple (unpacked at once, where each
    attribute read costs about as much as a lookup): the user's code, the instance (or
    state) weakly, the row count plain Keras was timed for, the counters whose fast_calls
    tell a served call, the site's accumulators, the site; for an auto-batched site, or one
    whose threads' calls are counted apart (``watch.counter``), then a call giving a
    deferred result or None for the usual path (``Auto.call``, behind the count if both);
    for a site auto-batch alone (no report shown) decided not to batch, None: its calls
    pass on uncounted; for a site whose sample one thread made, its results unread, that
    call (False: none) and the thread's id: another thread's call is looked at whole, and
    from then on each thread's calls are counted apart."""
    hot = (site.code, site.instance_ref if site.state is None else site.state,
           site.plain_rows, counters, site.acc, site)
    call = site.auto.call if site.auto is not None else None   # auto-batch: its Auto first
    owner = watch.counting(site) if settings.report else None
    if owner is True:
        call = watch.counter(site, call)    # each thread's calls: its unread results' count
    if owner not in (None, True):
        hot += (False if call is None else call, owner)
    elif call is not None:
        hot += (call,)
    elif site.auto_note is not None and not settings.report:
        hot += (None,)              # auto-batch alone, not batched: calls pass uncounted
    return hot


def timed(wrapper, wrapped, instance, args, kwargs, site, s):
    """The call and its time, added to the site's; an error counted as the site's."""
    t0 = _perf()
    try:
        out = wrapper(wrapped, instance, args, kwargs)
    except BaseException:
        elapsed = _perf() - t0
        site.acc[0] += elapsed
        sites.error_in_call(site, elapsed)      # (``s`` is the site's own counters)
        raise
    elapsed = _perf() - t0
    site.acc[0] += elapsed
    return out, elapsed


def _record(site, f, wrapper, wrapped, instance, args, kwargs):
    """A call, every part of it looked at (a site's first calls, other input shapes)."""
    x = args[0] if args else kwargs.get('x')
    kind = type(x)
    if kind is _ndarray:
        rows = x.shape[0] if x.ndim else 1
    else:
        if kind is watch.Watched or kind is list or kind is tuple or kind is dict:
            x, args, kwargs = watch.unwatch_call(x, args, kwargs)
        rows = sites.rows_of(x)
    s = site.stats
    if s.report_owner is not site:
        sites.take(s, site)
    fc = s.fast_calls
    out, elapsed = timed(wrapper, wrapped, instance, args, kwargs, site, s)
    return calls.after(site, s, fc, out, elapsed, f, x, rows, wrapped, instance, args, kwargs)
