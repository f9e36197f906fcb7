"""The recorder of calls that adapters announce (``Session.run``, ``K.function``): the
adapter says which of its cached states serves the call, and that state's counters are
read."""
import threading
import time
import types

import numpy as np

from .. import counters as _stats
from . import calls, frames, sites, watch


_perf = time.perf_counter
_ndarray = np.ndarray


class _Calls(threading.local):
    # This thread's announced call in flight (a list: made per call): for a call looked at
    # whole [user frame, table, entry name, instance, site, the state's fast_calls before,
    # the call's first input]; for a steady site's usual call [its _steady tuple, the
    # state's fast_calls before (-1: not announced yet, -2: announced otherwise), user
    # frame, the whole call's list where it was announced otherwise].
    current = None


_in_flight = _Calls() if calls.Recorder is None else calls.CCalls()   # (C recorders read it)
_announcers = []                    # adapters whose announce this module set
_USER, _SITES, _ENTRY, _INSTANCE, _SITE, _FC, _X = range(7)


# A steady announced site (_steady_at): (code, instance weakly, plain rows, state weakly,
# the site's accumulators, the site, the state's counters, the counters its paths are read
# from, the recorder's table, its entry name).


def _announcer():
    """The adapters' ``announce`` (a closure: see predict_calls' ``rest``)."""
    in_flight, ndarray, type_, len_ = _in_flight, _ndarray, type, len

    def announce(state, x):
        call = in_flight.current
        if call is None:
            return                      # not a recorded call
        steady = call[0]
        if type_(steady) is tuple:
            if call[1] != -1:
                return                  # announced already (a nested call)
            # (unpacked: an index by a named constant costs a global lookup)
            _, instance_ref, rows, state_ref, _, site, stats, path, table, entry = steady
            # As the site's calls go (its state, its rows, its paths' counters still its
            # own): the fast_calls to compare with after the call, and nothing else.
            if (state_ref() is state and type_(x) is ndarray and x.ndim and len_(x) == rows
                    and path.report_owner is site):
                call[1] = stats.fast_calls
                return
            call[1] = -2
            general = call[3] = [call[2], table, entry, instance_ref(), None, 0, None]
            call = general
        elif call[_SITE] is not None:
            return                      # announced already (a nested call)
        user = call[_USER]
        key = (id(user.f_code), user.f_lasti, id(state))
        site = call[_SITES].get(key)
        if site is None or site.state() is not state:
            site = _announced_site(call, key, state)
        ce = state.compiled
        path = state.stats if ce is None else ce.stats
        if path.report_owner is not site:
            if ce is not None:
                model = ce.model_ref()
                if model is not None and site.model_ref() is not model:
                    site.model_ref = sites.weak(model)
            sites.take(path, site)
        call[_SITE] = site
        call[_FC] = state.stats.fast_calls
        call[_X] = x

    return announce


_announce = _announcer()


def _announced_site(call, key, state):
    user = call[_USER]
    with sites.lock:
        table = call[_SITES]
        site = table.get(key)
        if site is None or site.state() is not state:
            if site is not None:
                sites.retired.append(site)
            site = table[key] = sites.Site(user.f_code, user.f_lineno, state.stats,
                                           call[_ENTRY], call[_INSTANCE], state=state)
    return site


def _steady_at(by_lasti, f, site, table, entry_name):
    """The site served at ``f``'s instruction, once its sample is taken, is the one its
    next calls there are checked against (the layout above)."""
    if site is not None and not (site.sampling or site.retime_left):
        by_lasti[f.f_lasti] = (site.code, site.instance_ref, site.plain_rows, site.state,
                               site.acc, site, site.stats, site.path, table, entry_name)


def recorder(wrapper, table, by_lasti, entry_name):
    """The recorder around the entry's ``wrapper``; its adapter announces from now on."""
    adapter = getattr(wrapper, '__self__', None)
    if adapter is not None:
        adapter.announce = (_announce if calls.Recorder is None
                            else calls.Announce(_announce, _ndarray))
        _announcers.append(adapter)

    # by_lasti: the calling instruction -> the _steady tuple of the site last served there,
    # once its sample is taken and where that frame is the user's own. Its usual call: one
    # lookup, two identity checks, a small list for announce, the clock; announce checks
    # the state and the input's rows and reads one counter.
    in_flight = _in_flight      # (a closure: see predict_calls' rest)

    def rest(f, wrapped, instance, args, kwargs):
        """A call from frame ``f`` (the C recorder's calls other than its usual one)."""
        try:
            steady = by_lasti[f.f_lasti]
        except KeyError:
            steady = None
        if steady is not None:
            code, instance_ref, rows, _, acc, site, stats, _, _, _ = steady
        if steady is not None and code is f.f_code and instance_ref() is instance:
            if sites.sampling_count:    # (some site's results may be watched: fed back here)
                args, kwargs = watch.unwatch_feeds(args, kwargs)
            call = [steady, -1, f, None]
            out, elapsed = _timed(call, None, _steady_error, wrapper, wrapped, instance,
                                  args, kwargs)
            fc = call[1]
            if fc >= 0:
                acc[0] += elapsed
                if stats.fast_calls != fc:
                    acc[1] += 1     # served, with the rows plain TF was timed for
                else:
                    sites.passed_on(site, stats, rows, elapsed)
                return out
            return unsteady(call, f, out, elapsed, wrapped, instance, args, kwargs)
        user = f
        if frames.skip_of.get(id(f.f_code)) is not False:
            user = frames.user_frame(f)
            if user is None or user is frames.NESTED:
                return wrapper(wrapped, instance, args, kwargs)
        if sites.sampling_count:        # (only sampled calls give watched results)
            args, kwargs = watch.unwatch_feeds(args, kwargs)
        call = [user, table, entry_name, instance, None, 0, None]
        out, elapsed = _timed(call, in_flight.current, _announced_error, wrapper, wrapped,
                              instance, args, kwargs)
        out = _announced_after(call, out, elapsed, wrapped, instance, args, kwargs)
        if user is f:
            _steady_at(by_lasti, f, call[_SITE], table, entry_name)
        return out

    def unsteady(call, f, out, elapsed, wrapped, instance, args, kwargs):
        """A steady site's call that the adapter left as it was, or announced as
        another state's: looked at whole."""
        if call[1] == -1:           # the adapter left the call as it was
            return _announced_after([f, table, entry_name, instance, None, 0, None],
                                    out, elapsed, wrapped, instance, args, kwargs)
        call = call[3]
        out = _announced_after(call, out, elapsed, wrapped, instance, args, kwargs)
        _steady_at(by_lasti, f, call[_SITE], table, entry_name)
        return out

    if calls.Recorder is not None:
        return calls.AnnouncedRecorder(by_lasti, wrapper, rest, calls.through, watch.Watched,
                                       None, sites.passed_on, _steady_error, unsteady)
    return calls.in_python(wrapper, rest)


def _timed(call, previous, on_error, wrapper, wrapped, instance, args, kwargs):
    """The call, with ``call`` this thread's call in flight (for announce), then
    ``previous`` again; and its time. An error goes to ``on_error``."""
    _in_flight.current = call
    t0 = _perf()
    try:
        out = wrapper(wrapped, instance, args, kwargs)
    except BaseException:
        _in_flight.current = previous
        on_error(call, _perf() - t0)
        raise
    elapsed = _perf() - t0
    _in_flight.current = previous
    return out, elapsed


def _announced_after(call, out, elapsed, wrapped, instance, args, kwargs):
    """A call looked at whole, once it returned: its site's counts, samples, plain cost."""
    site = call[_SITE]
    if site is None:                # the adapter left the call as it was
        site = _unannounced(call)
        site.time_s += elapsed
        sites.keras_call(site, _passed_rows(call[_ENTRY], args, kwargs), elapsed,
                         'not a call the adapter serves (left as it is)')
        return out
    site.time_s += elapsed
    x = call[_X]
    if (not site.sampling and site.stats.fast_calls != call[_FC] and type(x) is _ndarray
            and x.ndim and len(x) == site.plain_rows):
        site.hot += 1               # served, with the rows plain TF was timed for
        return out
    return calls.after(site, site.stats, call[_FC], out, elapsed, call[_USER], x,
                       sites.rows_of(x), wrapped, instance, args, kwargs)


def _passed_rows(entry, args, kwargs):
    """The rows of a call passed on unannounced: of its first feed (Session.run) or input
    (a backend function); 0 with none."""
    if entry == 'run':
        x = args[1] if len(args) > 1 else kwargs.get('feed_dict')
    else:
        x = args[0] if args else kwargs.get('inputs')
    kind = type(x)
    if x is None or ((kind is dict or kind is list or kind is tuple) and not x):
        return 0
    return sites.rows_of(x)


def _announced_error(call, elapsed):
    site = call[_SITE] or _unannounced(call)
    site.time_s += elapsed
    sites.error_in_call(site, elapsed)


def _steady_error(call, elapsed):
    _, instance_ref, _, _, _, site, stats, _, table, entry = call[0]
    fc = call[1]
    if fc >= 0:
        site.time_s += elapsed
        sites.error_in_call(site, elapsed)      # (``stats`` is the site's own)
    elif fc == -2:
        _announced_error(call[3], elapsed)
    else:
        _announced_error([call[2], table, entry, instance_ref(), None, 0, None], elapsed)


def _unannounced(call):
    """The site of calls the adapter passed on before announcing any state."""
    user, instance = call[_USER], call[_INSTANCE]
    key = (id(user.f_code), user.f_lasti, id(instance), None)
    with sites.lock:
        site = call[_SITES].get(key)
        if site is None or site.instance_ref() is not instance:
            site = call[_SITES][key] = sites.Site(user.f_code, user.f_lineno,
                                                  _stats.ModelStats('-'), call[_ENTRY],
                                                  instance, sampling=False)  # (no sample)
            site.model_ref = lambda: None
    return site


frames.RECORDER_CODES.update(id(c) for c in recorder.__code__.co_consts
                             if isinstance(c, types.CodeType) and c.co_name == 'rest')


def stop_announcing():
    """Adapters stop announcing (the report's wrappers are gone)."""
    while _announcers:
        _announcers.pop().announce = None
