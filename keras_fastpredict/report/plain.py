"""What plain Keras would have spent: calls left to Keras are their own measure; other
calls' cost is timed by running the original method again, where that changes nothing
the program sees."""
import time

import numpy as np

from ..config import settings
from . import passing


_perf = time.perf_counter
_ndarray = np.ndarray

PLAIN_MAX_ROWS = 1024
PLAIN_WAIT_CALLS = 256  # calls a site waits for our one-time work before timing plain anyway
RETIME_CALLS = 4096     # calls that may then wait for it to end, to time plain again
_cache = {}                        # (stats, row bucket) -> (seconds, rows) or reason str

PLAIN_METHOD = ('calls left to Keras are their own measure; otherwise the original '
                '(unpatched) method was timed, as it runs unpatched (the patched entries it '
                'calls left to their originals), on this model once per power-of-two row '
                'count, on the rows of the first such call (%d rows at most, scaled by '
                'rows): 1 warm-up, then the median of 3 runs, not while our one-time work '
                'runs on another thread (for %d calls at most); timed again at the end of '
                "the site's sample, the lower figure kept" % (PLAIN_MAX_ROWS, PLAIN_WAIT_CALLS))


def clear():
    _cache.clear()


def add(site, rows, wrapped, instance, args, kwargs, x):
    """A served call's plain cost, added to its site (timed first where it was not)."""
    site.rows += rows
    if rows == site.plain_rows:
        site.same_rows += 1
        site.rows -= rows
        return
    bucket = rows.bit_length()
    key = (site.stats, bucket)      # (a model's or a cached state's own counters)
    plain = _cache.get(key)
    if plain is None and not settings.report:
        plain = NOT_SHOWN           # auto-batch alone samples sites: no extra run for it
    if plain is None:
        plain = _measure_plain(site, key, rows, wrapped, instance, args, kwargs, x)
    if type(plain) is tuple:
        per_call = plain[0] * rows / plain[1] if plain[1] else plain[0]    # (0 rows)
        if site.plain_rows is None:       # from now on counted in same_rows
            site.rows -= rows
            site.same_rows += 1
            site.plain_rows, site.plain_per_call = rows, per_call
        else:
            site.plain_s += per_call
        waited = site.waiting.pop(bucket, None) if site.waiting else None
        if waited is not None:  # calls that waited for our one-time work: counted now
            _count_waited(site, plain, rows, waited)
    else:
        site.unmeasured += 1
        site.plain_note = plain
        if plain is NOT_SHOWN and site.plain_rows is None:
            site.plain_rows = rows  # (the rows a steady site's usual call is checked for)
        if plain is _WAITING:   # (by row bucket: each is counted at its own bucket's cost)
            waited = site.waiting.setdefault(bucket, [0, 0])
            waited[0] += 1
            waited[1] += rows


def _count_waited(site, plain, rows, waited):
    calls, waited_rows = waited
    site.unmeasured -= calls
    if rows == site.plain_rows and waited_rows == calls * rows:    # (the usual: all alike)
        site.rows -= waited_rows
        site.same_rows += calls
    else:
        site.plain_s += (plain[0] * waited_rows / plain[1] if plain[1] else plain[0] * calls)


def _head(x, n):
    kind = type(x)
    if kind is list or kind is tuple:
        return kind(_head(v, n) for v in x)
    if kind is dict:
        return {k: _head(v, n) for k, v in x.items()}
    return x[:n]


def _all_plain(x):
    kind = type(x)
    if kind is list or kind is tuple:
        return all(type(v) is _ndarray for v in x)
    if kind is dict:
        return all(type(v) is _ndarray for v in x.values())
    return kind is _ndarray


def _why_not_timed(entry):
    """Why a model's plain cost may not be timed by running it again, or None."""
    if entry.updates is not None or entry.stateful:
        return 'not timed: a stateful model (an extra run would change its state)'
    if not entry.rerun_on_error:
        return ('not timed: the model draws random numbers or writes variables (an extra '
                'run would change what it returns)')
    return None


def _measure_plain(site, key, rows, wrapped, instance, args, kwargs, x):
    """Time the original method (see the module docs); returns (seconds, rows) or, where
    it was not timed, why (a str; retried where it may work later)."""
    from ..engine import compiled
    if not (settings.report and passing.gating):   # (the entries leave a plain run
        return NOT_SHOWN                              # alone only while so wrapped)
    state = site.state() if site.state is not None else None
    if site.state is not None and state is None:
        return 'not timed: the signature is gone'
    graph = None
    if state is None:
        entry = compiled.get(instance)
        if entry is None:
            return 'not timed: the model has no fast-path entry'
        if entry.refused:
            return 'calls are left to Keras and timed as they run'
        reason = _why_not_timed(entry)
        if reason is not None:
            _cache[key] = reason
            return reason
        if not _all_plain(x):
            return 'not timed yet: inputs that are not plain arrays'
        try:
            if entry.adapter.current_session() is not entry.session:
                return 'not timed yet: Keras uses another session here'
        except Exception:
            return 'not timed yet: no session'
        graph = entry.graph
        if _busy():
            if site.plain_waits < PLAIN_WAIT_CALLS:
                site.plain_waits += 1
                return _WAITING
            site.retime_left = RETIME_CALLS     # timed anyway: again once our work is over
        n = min(rows, PLAIN_MAX_ROWS)
        if n < rows:
            xs = _head(x, n)
            args = (xs,) + tuple(args[1:]) if args else args
            if not args:
                kwargs = dict(kwargs, x=xs)
    else:
        # The original Session.run or K.function, run again: only where nothing changes.
        ce = getattr(state, 'compiled', None)
        reason = _why_not_timed(ce) if ce is not None else None
        # (the learning phase may be fed 1 in this call: pure either way, or not timed)
        if reason is None and not (state.is_pure(False) and state.is_pure(True)):
            reason = ('not timed: the run has side effects (an extra run would change what '
                      'the program sees)')
        if reason is None and rows > PLAIN_MAX_ROWS:
            reason = 'not timed: more than %d rows' % PLAIN_MAX_ROWS
        if reason is not None:
            _cache[key] = reason
            return reason
        if _busy():
            if site.plain_waits < PLAIN_WAIT_CALLS:
                site.plain_waits += 1
                return _WAITING
            site.retime_left = RETIME_CALLS     # timed anyway: again once our work is over
        n = rows
    try:
        if graph is not None:
            with graph.as_default():
                times = _time(wrapped, args, kwargs)
        else:
            times = _time(wrapped, args, kwargs)
    except Exception as exc:
        reason = 'not timed: the original raised %s' % type(exc).__name__
        _cache[key] = reason
        return reason
    result = _cache[key] = (sorted(times)[1], n)
    return result


NOT_SHOWN = 'not timed: the report was off (auto-batch alone)'
_WAITING = 'not timed yet: our one-time work ran on another thread'


def _busy():
    """Whether our own one-time work runs on another thread now: plain calls timed then
    share the cores with it, and would inflate the estimate (seen: 2.6 ms a call for an
    LSTM that runs in 1.5)."""
    from ..engine import compiled, warmup
    return compiled.making() or warmup.running()


def retime(site, rows, wrapped, instance, args, kwargs, x):
    """Time plain Keras again at the end of the site's sample, or once our one-time work
    is over where plain was timed while it ran (``retime_left`` calls at most), and keep
    the lower figure: the estimate never claims a gain that a moment of contention made."""
    key = (site.stats, rows.bit_length())
    old = _cache.get(key)
    if type(old) is not tuple:
        site.retime_left = 0
        return
    if _busy():
        site.retime_left = max(0, site.retime_left - 1)
        return
    site.retime_left = 0
    new = _measure_plain(site, key, rows, wrapped, instance, args, kwargs, x)
    if type(new) is not tuple:
        _cache[key] = old
        return
    if new[0] * old[1] > old[0] * new[1]:
        _cache[key] = new = old
    per_call = new[0] * rows / new[1] if new[1] else new[0]
    site.plain_per_call = min(site.plain_per_call, per_call)


def count_waiting(site):
    """Calls of the site that waited for our one-time work, counted where their row
    bucket has been timed since (by another site of the same model, say)."""
    for bucket in list(site.waiting):
        plain = _cache.get((site.stats, bucket))
        if type(plain) is tuple:
            calls, rows = site.waiting.pop(bucket)
            site.unmeasured -= calls
            site.plain_s += plain[0] * rows / plain[1] if plain[1] else plain[0] * calls


def _time(wrapped, args, kwargs):
    # The original as it runs unpatched: the patched entries it calls (Keras' predict
    # function, TensorFlow's session run) pass this thread's calls to theirs.
    return passing.run_plain(_runs, wrapped, args, kwargs)


def _runs(wrapped, args, kwargs):
    wrapped(*args, **kwargs)
    times = []
    for _ in range(3):
        t0 = _perf()
        wrapped(*args, **kwargs)
        times.append(_perf() - t0)
    return times
