"""The call-site report: which line of the user's code makes the predict calls, which way
each call took, what it cost against plain Keras, and advice where it was measured.

On with ``patch(report=True)``, ``KERAS_FASTPREDICT_REPORT=1``, or the runner's ``--stats``
and ``--stats-json FILE``. Off, nothing is wrapped and no frame is ever looked at.

How it works, generic over adapters: when the report is on, ``patching`` wraps each call
entry point's wrapper (``wrap``) with a recorder. Call entries are ``Model.predict`` and
``predict_on_batch`` (``CALL_PATHS``: the model is the call's instance) and wrappers marked
``announcing`` (``Session.run``, ``K.function``: the adapter announces which of its cached
states serves the call, and that state's counters are read). Per call the recorder

* attributes the call to the first frame outside Keras, TensorFlow, numpy, wrapt and this
  package (``file:line in function``), found by walking ``sys._getframe`` with a per-code
  cache; a call made inside another recorded call (Keras' own session run) is not counted
  again;
* reads one counter before and after (``fast_calls``): a call the adapter did not serve is
  "left to Keras" (or TF) with the reason whose count grew. Which way the served calls
  went (read-ahead, deferred, merged across threads, else the fast path alone) is read
  from the model's counters once per run of calls from one site, not per call (see
  ``_take``). Other threads' calls move the same counters, so paths of calls that overlap
  in time are approximate;
* times the call, and estimates what plain Keras would have spent: calls left to Keras
  are their own measure; otherwise the original (unpatched) method is timed once per
  model (or cached signature) and power-of-two row count, on the rows of the first such
  call (1024 at most, scaled by rows), 1 warm-up then the median of 3 runs, outside the
  call's own timing. Where an extra run would change what the program sees (stateful
  models, random draws or variable writes, runs with side effects) nothing is timed, and
  the report says so.

Measured advice, on a sample of each site's first calls (``WATCH_CALLS`` results watched;
the sample ends after ``SAMPLE_CALLS`` calls whatever the loop, then the site's calls take
the usual path: the steps inlined at the top of each recorder's ``rest``, looked up in
``by_line`` (``_hot``) or, for announced calls, ``by_lasti`` (``_steady_at``). The
extension ``_steady`` runs these steps in C and leaves every other call to ``rest``;
without it, the same Python runs them):

* Whether results are read before the next call: a returned plain array is handed back as
  a view of itself of an ndarray subclass that records its first use (numpy functions,
  ufuncs, methods, conversions, iteration, printing, pickling, indexing and slicing;
  shape, dtype and len are not uses, as a deferred result answers them without running).
  ``np.asarray(y)`` of the result itself is not seen (numpy makes the plain array without
  a call the subclass sees); of a view it cannot happen, as taking the view is a use. Values,
  dtype, shape and memory are the array's own; anything computed from it is a plain
  ndarray; it pickles as a plain ndarray; only ``type(y) is np.ndarray`` is false (as for
  deferred results). Not done where deferral is on. "Batch size it would reach": calls
  made between a result and the first use that would have flushed it.
* Which function spans consecutive calls (the one ``@fast_predict`` would batch): frames
  of the previous sampled call are held until the next one; the innermost frame present
  in both that is a named function (not a comprehension or lambda).
* Whether one-row inputs that read-ahead could not serve are fresh copies of consecutive
  rows of one array: arrays of that row shape are looked up in the locals of the site
  and its two callers, and their rows compared.
"""
import collections
import json
import operator
import os
import sys
import threading
import time
import types
import weakref

import numpy as np

from . import counters as _stats
from .config import settings
from .engine.deferred import map_nested

try:                        # the usual call in C, where the extension is built
    from ._steady import Announce as _Announce, AnnouncedRecorder as _AnnouncedRecorder
    from ._steady import Calls as _CCalls, Recorder as _Recorder
except ImportError:         # (the same logic in Python: one call layer more)
    _Recorder = _AnnouncedRecorder = _Announce = _CCalls = None

# Every frame inspection of the report goes through this name (tests count its calls).
_getframe = sys._getframe
_perf = time.perf_counter
# The counters a call's path is read from (one C call for all, before and after).
# The counters a model's fast calls' ways are read from (one C call).
_paths = operator.attrgetter('deferred', 'readahead_hits', 'readahead_windows', 'queued')
_ndarray = np.ndarray

# Entry points attributed as calls (by ``class.attribute`` path) unless a wrapper says so
# itself with ``_kfp_call``.
CALL_PATHS = frozenset(('Model.predict', 'Model.predict_on_batch'))
WATCH_CALLS = 64        # results watched per site (the sample advice is measured on)
SAMPLE_CALLS = 2 * WATCH_CALLS   # a site's sample ends after this many calls, whatever
                                 # its samplers saw (each counts only calls it can use)
SPAN_CALLS = 16         # consecutive calls per site whose frames are compared
FRESH_CALLS = 16        # one-row inputs per site checked against arrays in scope
PLAIN_MAX_ROWS = 1024
PLAIN_WAIT_CALLS = 256  # calls a site waits for our one-time work before timing plain anyway
_UNNAMED = frozenset(('<listcomp>', '<genexpr>', '<dictcomp>', '<setcomp>', '<lambda>'))

_lock = threading.Lock()
_sampling = 0                       # sites still sampling (their results may be watched)
# id(code) -> True when its frame is not the user's. By id: a code object's hash is not
# cached (it hashes its bytecode and constants each time); the code is kept in _codes so
# that its id stays its own.
_skip = {}
_codes = []
_site_tables = {}                  # entry path -> its sites
_retired_sites = []
_skip_dirs = None
_plain = {}                        # (stats, row bucket) -> (seconds, rows) or reason str
_reasons_seen = weakref.WeakKeyDictionary()   # stats -> copy of its fallback reasons

PLAIN_METHOD = ('calls left to Keras are their own measure; otherwise the original '
                '(unpatched) method was timed on this model once per power-of-two row '
                'count, on the rows of the first such call (%d rows at most, scaled by '
                'rows): 1 warm-up, then the median of 3 runs, not while our one-time work '
                'runs on another thread (for %d calls at most); timed again at the end of '
                "the site's sample, the lower figure kept" % (PLAIN_MAX_ROWS, PLAIN_WAIT_CALLS))


# -- which frame is the user's -------------------------------------------------------------

def _dirs():
    global _skip_dirs
    if _skip_dirs is None:
        import importlib.util
        found = [os.path.dirname(os.path.abspath(__file__))]
        for name in ('keras', 'tensorflow', 'tensorflow_core', 'tensorflow_estimator',
                     'numpy', 'wrapt'):
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                spec = None
            if spec is not None and spec.submodule_search_locations:
                found += list(spec.submodule_search_locations)
        _skip_dirs = tuple(os.path.join(os.path.realpath(d), '') for d in found) + tuple(
            os.path.join(os.path.abspath(d), '') for d in found)
    return _skip_dirs


def _classify(code):
    name = code.co_filename
    skip = name.startswith(_dirs()) or os.path.abspath(name).startswith(_dirs())
    with _lock:
        _codes.append(code)
        _skip[id(code)] = skip
    return skip


# -- sites -----------------------------------------------------------------------------------

class Site(object):
    __slots__ = ('code', 'file', 'line', 'function', 'entry', 'stats', 'path', 'mark',
                 'instance_ref', 'model_ref', 'rows', 'same_rows',
                 'acc', 'served', 'readahead', 'deferred', 'merged', 'keras', 'reasons',
                 'plain_s', 'unmeasured', 'plain_note', 'plain_rows', 'plain_per_call',
                 'plain_waits', 'waiting', 'waited_rows',
                 'sampling', 'sample_left', 'watch_left', 'watched', 'epoch',
                 'epoch_start', 'open_watch', 'batches', 'span_left', 'held', 'enclosing',
                 'fresh_left', 'fresh', 'last_shape', 'dataset', 'walk', 'errors', 'state')

    def __init__(self, code, line, stats, entry, instance, path=None, model=None, state=None,
                 sampling=True):
        self.code = code
        self.file = code.co_filename if code is not None else '?'
        self.line = line
        self.function = code.co_name if code is not None else '?'
        self.entry = entry
        self.stats = stats          # its fast_calls tell a fast call from one passed on
        self.path = path or stats   # read-ahead, deferred and merged are counted here
        self.mark = None            # self.path's counters when this site last took it over
        self.instance_ref = _weak(instance)
        self.model_ref = _weak(model if model is not None else instance)
        # An announcing adapter's state (K.function, Session.run), weakly: it holds the
        # graph, the session and their callables.
        self.state = None if state is None else _weak(state)
        self.rows = self.same_rows = self.served = self.readahead = self.deferred = 0
        self.merged = self.keras = self.unmeasured = self.errors = 0
        self.acc = [0.0, 0]         # time spent, usual calls (a list: see _hot)
        self.plain_s = self.plain_per_call = 0.0
        self.plain_rows = None      # the row count plain_per_call was estimated for
        self.plain_waits = 0        # calls not timed while our one-time work ran
        self.waiting = self.waited_rows = 0     # of them, not yet counted at plain's cost
        self.sampling = sampling    # (made under _lock)
        self.sample_left = SAMPLE_CALLS
        if sampling:
            global _sampling
            _sampling += 1
        self.plain_note = None
        self.reasons = collections.Counter()
        if stats not in _reasons_seen:      # (reasons from before the report are not its)
            _note_reasons(stats)
        self.watch_left = WATCH_CALLS
        self.watched = 0
        self.epoch = 0
        self.epoch_start = 0
        self.open_watch = False
        self.batches = []
        self.span_left = SPAN_CALLS
        self.held = {}             # thread id -> frames of its previous sampled call
        self.enclosing = collections.Counter()
        self.fresh_left = FRESH_CALLS
        self.fresh = 0             # one-row fresh inputs of the previous call's shape
        self.last_shape = None
        self.dataset = None        # (weakref to the array, its name, last row matched)
        self.walk = 0              # consecutive rows of that array seen

    @property
    def time_s(self):
        return self.acc[0]

    @time_s.setter
    def time_s(self, value):
        self.acc[0] = value

    @property
    def hot(self):
        """Calls counted on the usual path: served, with the rows plain Keras was timed
        for."""
        return self.acc[1]

    @hot.setter
    def hot(self, value):
        self.acc[1] = value

    @property
    def calls(self):
        return self.served + self.hot + self.keras + self.errors

    @property
    def fast(self):
        return max(0, self.served + self.hot - self.readahead - self.deferred - self.merged)

    def total_rows(self):
        return self.rows + (self.same_rows + self.hot) * (self.plain_rows or 0)

    def plain_total(self):
        return self.plain_s + (self.same_rows + self.hot) * self.plain_per_call

    def where(self):
        return '%s:%d in %s' % (self.file, self.line, self.function)


def _weak(obj):
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: None


# -- which way calls went: read once per run of calls, not per call ---------------------------
#
# A fast call's way (read-ahead, deferred, merged, else the fast path alone) is counted in
# its model's counters. The site that last called a model "owns" those counters
# (``ModelStats.report_owner``); while it does, nothing is read per call. When another site
# calls the model (or the report is read), the owner's share since it took over is added to
# it: the counters' growth over its run of calls. Calls of other threads in that time count
# for the owner (the report says paths of calls that overlap in time are approximate).

def _take(path, site):
    owner = path.report_owner
    if owner is not None:
        _settle(owner)
    path.report_owner = site
    site.path = path
    site.mark = _paths(path)


def _settle(site):
    path, mark = site.path, site.mark
    if mark is None:
        return
    now = _paths(path)
    site.mark = now
    # (never below zero: reset_stats() clears the counters under a mark)
    site.deferred += max(0, now[0] - mark[0])
    site.readahead += max(0, now[1] - mark[1]) + max(0, now[2] - mark[2])
    site.merged += max(0, now[3] - mark[3])


def _mark_call(fn):
    fn._kfp_call = True
    return fn


def announcing(fn):
    """Marks an adapter's entry wrapper whose calls the report attributes through the
    adapter's ``announce`` (``Session.run``, ``K.function``): the adapter calls
    ``self.announce(state, x)`` once it knows which of its states (with ``stats``, and a
    ``compiled`` model entry where the call goes to a model) serves the call, before it
    serves it. ``announce`` is None while the report is off (one attribute test)."""
    fn._kfp_call = 'announced'
    return fn


def is_call_entry(path, wrapper):
    return bool(getattr(wrapper, '_kfp_call', False)) or path in CALL_PATHS


def wrap(path, wrapper):
    """The recorder around a call entry's wrapper (``wrapper`` itself for other entries)."""
    if not is_call_entry(path, wrapper):
        return wrapper
    entry_name = path.rsplit('.', 1)[-1]
    with _lock:      # kept across patch cycles
        sites, by_line = _site_tables.setdefault(path, ({}, {}))
    if getattr(wrapper, '_kfp_call', None) == 'announced':
        return _announced(wrapper, sites, by_line, entry_name)

    # sites: (id(code), line, id(model)) of the user's frame -> Site; by_line: the
    # instruction of the calling frame (f_lasti: read as it is, where f_lineno is computed)
    # -> its site's _hot tuple, once the site's sample is taken and where that frame is
    # the user's own. The usual call: one lookup, two identity checks, the input's type and
    # rows, one counter read before and after, the clock. (Names used per call are bound
    # in this closure: a cell is read faster than a global or a builtin, and default
    # arguments would take a function call off CPython's fast path.)
    perf, ndarray, type_, len_ = _perf, _ndarray, type, len

    def rest(f, wrapped, instance, args, kwargs):
        """A call from frame ``f`` (the C recorder's calls other than its usual one)."""
        try:
            hot = by_line[f.f_lasti]       # (a subscript: cheaper than .get's call)
        except KeyError:
            hot = None
        if hot is not None:
            code, ref, rows, s, acc, site = hot
            if code is f.f_code and ref() is instance:
                x = args[0] if args else None
                if type_(x) is ndarray and x.ndim and len_(x) == rows:
                    # _record's steps, inlined for the usual call.
                    if s.report_owner is not site:
                        _take(s, site)
                    fc = s.fast_calls
                    t0 = perf()
                    try:
                        out = wrapper(wrapped, instance, args, kwargs)
                    except BaseException:
                        acc[0] += perf() - t0
                        _error(site, s)
                        raise
                    elapsed = perf() - t0
                    acc[0] += elapsed
                    if s.fast_calls != fc:
                        acc[1] += 1
                    else:
                        _passed_on(site, s, rows, elapsed)
                    return out
                return _record(site, f, wrapper, wrapped, instance, args, kwargs)
        site, direct = _find_site(sites, f, instance, entry_name)
        if site is None:                        # inside a recorded call: not again
            return wrapper(wrapped, instance, args, kwargs)
        out = _record(site, f, wrapper, wrapped, instance, args, kwargs)
        if direct and not site.sampling:
            by_line[f.f_lasti] = _hot(site, site.stats)
        return out

    if _Recorder is not None:
        return _Recorder(by_line, wrapper, rest, _through, _ndarray, _take, _passed_on, _error)
    return _in_python(wrapper, rest)


def _in_python(wrapper, rest):
    """The recorder where the C extension is not built: the calling frame, then rest."""
    getframe = _getframe

    def recorded(wrapped, instance, args, kwargs):
        try:
            f = getframe(1)
        except ValueError:          # (a thread with no Python frame: no call site)
            return wrapper(wrapped, instance, args, kwargs)
        return rest(f, wrapped, instance, args, kwargs)
    recorded._kfp_recorder = wrapper
    return recorded


def _through(wrapper, wrapped, instance, args, kwargs):
    """The C recorder's usual call of the entry (this frame marks a recorded call)."""
    return wrapper(wrapped, instance, args, kwargs)


def _hot(site, counters):
    """What a site's usual call reads, in one tuple (unpacked at once, where each
    attribute read costs about as much as a lookup): the user's code, the instance (or
    state) weakly, the row count plain Keras was timed for, the counters whose fast_calls
    tell a served call, the site's accumulators, the site."""
    return (site.code, site.instance_ref if site.state is None else site.state,
            site.plain_rows, counters, site.acc, site)


def _record(site, f, wrapper, wrapped, instance, args, kwargs):
    """A call, every part of it looked at (a site's first calls, other input shapes)."""
    x = args[0] if args else kwargs.get('x')
    kind = type(x)
    if kind is _ndarray:
        rows = x.shape[0] if x.ndim else 1
    else:
        if kind is Watched or kind is list or kind is tuple or kind is dict:
            x, args, kwargs = _unwatch_call(x, args, kwargs)
        rows = _rows(x)
    s = site.stats
    if s.report_owner is not site:
        _take(s, site)
    fc = s.fast_calls
    t0 = _perf()
    try:
        out = wrapper(wrapped, instance, args, kwargs)
    except BaseException:
        site.time_s += _perf() - t0
        _error(site, s)
        raise
    elapsed = _perf() - t0
    site.time_s += elapsed
    return _after(site, s, fc, out, elapsed, f, x, rows, wrapped, instance, args, kwargs)


def _after(site, s, fc, out, elapsed, f, x, rows, wrapped, instance, args, kwargs):
    if s.fast_calls == fc:
        _passed_on(site, s, rows, elapsed)
        if site.sampling:
            _sampled(site)
        return out
    site.served += 1
    # Calls of the row count plain Keras was timed for are counted; others add up.
    if rows == site.plain_rows:
        site.same_rows += 1
    else:
        _add_plain(site, rows, wrapped, instance, args, kwargs, x)
    if site.sampling:
        ahead = site.readahead
        if site.path.report_owner is site:
            _settle(site)
        out = _sample(site, f, out, x, rows, site.readahead != ahead)
        if not site.sampling and rows == site.plain_rows:
            _retime_plain(site, rows, wrapped, instance, args, kwargs, x)
    return out


def _passed_on(site, s, rows, elapsed):
    """A call the adapter did not serve itself: left to Keras (or TF) with a reason, or
    passed on as it was (uncounted)."""
    reason = _new_reason(s)
    _keras_call(site, rows, elapsed, reason or 'arguments passed on to Keras as they are')


def _error(site, s):
    """A call that raised: counted apart, its reason (if the adapter noted one) taken, so
    that it is not the next call's."""
    site.errors += 1
    _new_reason(s)


# The frames of a recorded call in progress: a call made inside it is not recorded again.
_NESTED = object()
_RECORDER_CODES = {id(c) for c in wrap.__code__.co_consts
                   if isinstance(c, types.CodeType) and c.co_name == 'rest'}
_RECORDER_CODES.add(id(_through.__code__))


def _user(f):
    """The first frame from ``f`` out that is the user's, or the recorder's own code if
    one comes first (a call made inside a recorded call), or None."""
    while f is not None:
        code = f.f_code
        if id(code) in _RECORDER_CODES:
            return _NESTED
        skip = _skip.get(id(code))
        if skip is None:
            skip = _classify(code)
        if not skip:
            return f
        f = f.f_back
    return None


def _find_site(sites, f, instance, entry_name):
    """The site of a call (slow path: a site still sampling, a new site, or a call from a
    skipped frame), and whether its user frame is ``f`` itself."""
    user = _user(f)
    if user is _NESTED:
        return None, False
    code = user.f_code if user is not None else None
    line = user.f_lineno if user is not None else 0
    user_key = (id(code), line, id(instance))
    with _lock:
        site = sites.get(user_key)
        if site is None or site.instance_ref() is not instance:
            if site is not None:
                _retired_sites.append(site)       # a freed model's site, kept for the report
            site = sites[user_key] = Site(code, line, _stats.for_model(instance), entry_name,
                                          instance)
    return site, user is f


# -- announced calls (Session.run, K.function) -------------------------------------------------

class _Calls(threading.local):
    # This thread's announced call in flight (a list: made per call): for a call looked at
    # whole [user frame, sites, entry name, instance, site, the state's fast_calls before,
    # the call's first input]; for a steady site's usual call [its _steady tuple, the
    # state's fast_calls before (-1: not announced yet, -2: announced otherwise), user
    # frame, the whole call's list where it was announced otherwise].
    current = None


_calls = _Calls() if _Recorder is None else _CCalls()     # (the C recorders read it)
_announcers = []                    # adapters whose announce this module set
_USER, _SITES, _ENTRY, _INSTANCE, _SITE, _FC, _X = range(7)
# A steady announced site (_steady_at): (code, instance weakly, plain rows, state weakly,
# the site's accumulators, the site, the state's counters, the counters its paths are read
# from, the recorder's sites, its entry name).


def _announcer():
    """The adapters' ``announce`` (a closure: see ``recorded``)."""
    calls, ndarray, type_, len_ = _calls, _ndarray, type, len

    def announce(state, x):
        call = calls.current
        if call is None:
            return                      # not a recorded call
        steady = call[0]
        if type_(steady) is tuple:
            if call[1] != -1:
                return                  # announced already (a nested call)
            # (unpacked: an index by a named constant costs a global lookup)
            _, instance_ref, rows, state_ref, _, site, stats, path, sites, entry = steady
            # As the site's calls go (its state, its rows, its paths' counters still its
            # own): the fast_calls to compare with after the call, and nothing else.
            if (state_ref() is state and type_(x) is ndarray and x.ndim and len_(x) == rows
                    and path.report_owner is site):
                call[1] = stats.fast_calls
                return
            call[1] = -2
            general = call[3] = [call[2], sites, entry, instance_ref(), None, 0, None]
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
                    site.model_ref = _weak(model)
            _take(path, site)
        call[_SITE] = site
        call[_FC] = state.stats.fast_calls
        call[_X] = x

    return announce


_announce = _announcer()


def _announced_site(call, key, state):
    user = call[_USER]
    with _lock:
        sites = call[_SITES]
        site = sites.get(key)
        if site is None or site.state() is not state:
            if site is not None:
                _retired_sites.append(site)
            site = sites[key] = Site(user.f_code, user.f_lineno, state.stats, call[_ENTRY],
                                     call[_INSTANCE], state=state)
    return site


def _steady_at(by_lasti, f, site, sites, entry_name):
    """The site served at ``f``'s instruction, once its sample is taken, is the one its
    next calls there are checked against (the layout above)."""
    if site is not None and not site.sampling:
        by_lasti[f.f_lasti] = (site.code, site.instance_ref, site.plain_rows, site.state,
                               site.acc, site, site.stats, site.path, sites, entry_name)


def _announced(wrapper, sites, by_lasti, entry_name):
    adapter = getattr(wrapper, '__self__', None)
    if adapter is not None:
        adapter.announce = _announce if _Recorder is None else _Announce(_announce, _ndarray)
        _announcers.append(adapter)

    # by_lasti: the calling instruction -> the _steady tuple of the site last served there,
    # once its sample is taken and where that frame is the user's own. Its usual call: one
    # lookup, two identity checks, a small list for announce, the clock; announce checks
    # the state and the input's rows and reads one counter.
    perf, calls = _perf, _calls      # (a closure: see wrap's rest)

    def rest(f, wrapped, instance, args, kwargs):
        """A call from frame ``f`` (the C recorder's calls other than its usual one)."""
        try:
            steady = by_lasti[f.f_lasti]
        except KeyError:
            steady = None
        if steady is not None:
            code, instance_ref, rows, _, acc, site, stats, _, _, _ = steady
        if steady is not None and code is f.f_code and instance_ref() is instance:
            if _sampling:           # (some site's results may be watched: fed back here)
                args, kwargs = _unwatch_feeds(args, kwargs)
            call = calls.current = [steady, -1, f, None]
            t0 = perf()
            try:
                out = wrapper(wrapped, instance, args, kwargs)
            except BaseException:
                calls.current = None
                _steady_error(call, perf() - t0)
                raise
            elapsed = perf() - t0
            calls.current = None
            fc = call[1]
            if fc >= 0:
                acc[0] += elapsed
                if stats.fast_calls != fc:
                    acc[1] += 1     # served, with the rows plain TF was timed for
                else:
                    _passed_on(site, stats, rows, elapsed)
                return out
            return unsteady(call, f, out, elapsed, wrapped, instance, args, kwargs)
        user = f
        if _skip.get(id(f.f_code)) is not False:
            user = _user(f)
            if user is None or user is _NESTED:
                return wrapper(wrapped, instance, args, kwargs)
        if _sampling:               # (only sampled calls give watched results)
            args, kwargs = _unwatch_feeds(args, kwargs)
        previous = calls.current
        call = calls.current = [user, sites, entry_name, instance, None, 0, None]
        t0 = perf()
        try:
            out = wrapper(wrapped, instance, args, kwargs)
        except BaseException:
            calls.current = previous
            _announced_error(call, perf() - t0)
            raise
        elapsed = perf() - t0
        calls.current = previous
        out = _announced_after(call, out, elapsed, wrapped, instance, args, kwargs)
        if user is f:
            _steady_at(by_lasti, f, call[_SITE], sites, entry_name)
        return out

    def unsteady(call, f, out, elapsed, wrapped, instance, args, kwargs):
        """A steady site's call that the adapter left as it was, or announced as
        another state's: looked at whole."""
        if call[1] == -1:           # the adapter left the call as it was
            return _announced_after([f, sites, entry_name, instance, None, 0, None],
                                    out, elapsed, wrapped, instance, args, kwargs)
        call = call[3]
        out = _announced_after(call, out, elapsed, wrapped, instance, args, kwargs)
        _steady_at(by_lasti, f, call[_SITE], sites, entry_name)
        return out

    if _Recorder is not None:
        return _AnnouncedRecorder(by_lasti, wrapper, rest, _through, Watched, None,
                                  _passed_on, _steady_error, unsteady)
    return _in_python(wrapper, rest)


def _announced_after(call, out, elapsed, wrapped, instance, args, kwargs):
    """A call looked at whole, once it returned: its site's counts, samples, plain cost."""
    site = call[_SITE]
    if site is None:                # the adapter left the call as it was
        site = _unannounced(call)
        site.time_s += elapsed
        _keras_call(site, _passed_rows(call[_ENTRY], args, kwargs), elapsed,
                    'not a call the adapter serves (left as it is)')
        return out
    site.time_s += elapsed
    x = call[_X]
    if (not site.sampling and site.stats.fast_calls != call[_FC] and type(x) is _ndarray
            and x.ndim and len(x) == site.plain_rows):
        site.hot += 1               # served, with the rows plain TF was timed for
        return out
    return _after(site, site.stats, call[_FC], out, elapsed, call[_USER], x, _rows(x),
                  wrapped, instance, args, kwargs)


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
    return _rows(x)


def _announced_error(call, elapsed):
    site = call[_SITE] or _unannounced(call)
    site.time_s += elapsed
    _error(site, site.stats)


def _steady_error(call, elapsed):
    _, instance_ref, _, _, _, site, stats, _, sites, entry = call[0]
    fc = call[1]
    if fc >= 0:
        site.time_s += elapsed
        _error(site, stats)
    elif fc == -2:
        _announced_error(call[3], elapsed)
    else:
        _announced_error([call[2], sites, entry, instance_ref(), None, 0, None], elapsed)


def _unwatch_feeds(args, kwargs):
    """Watched results passed back in (a feed dict's values, a K.function input list): a
    use, and plain arrays go on, so the call takes the path it takes without the report.
    Containers without one are passed as they are."""
    changed = False
    new = []
    for a in args:
        kind = type(a)
        if kind is dict and any(type(v) is Watched for v in a.values()):
            a = {k: _plain_of(v) for k, v in a.items()}
            changed = True
        elif (kind is list or kind is tuple) and any(type(v) is Watched for v in a):
            a = kind(_plain_of(v) for v in a)
            changed = True
        new.append(a)
    fd = kwargs.get('feed_dict')
    if type(fd) is dict and any(type(v) is Watched for v in fd.values()):
        kwargs = dict(kwargs, feed_dict={k: _plain_of(v) for k, v in fd.items()})
    return (tuple(new) if changed else args), kwargs


def _unannounced(call):
    """The site of calls the adapter passed on before announcing any state."""
    user, instance = call[_USER], call[_INSTANCE]
    key = (id(user.f_code), user.f_lasti, id(instance), None)
    with _lock:
        site = call[_SITES].get(key)
        if site is None or site.instance_ref() is not instance:
            site = call[_SITES][key] = Site(user.f_code, user.f_lineno,
                                            _stats.ModelStats('-'), call[_ENTRY], instance,
                                            sampling=False)     # (nothing to sample)
            site.model_ref = lambda: None
    return site


_RECORDER_CODES.update(id(c) for c in _announced.__code__.co_consts
                       if isinstance(c, types.CodeType) and c.co_name == 'rest')


def stop_announcing():
    """Adapters stop announcing (the report's wrappers are gone)."""
    while _announcers:
        _announcers.pop().announce = None


def _keras_call(site, rows, elapsed, reason):
    site.keras += 1
    site.reasons[reason] += 1
    site.rows += rows
    site.plain_s += elapsed       # plain Keras ran: the call is its own measure


def _add_plain(site, rows, wrapped, instance, args, kwargs, x):
    site.rows += rows
    if rows == site.plain_rows:
        site.same_rows += 1
        site.rows -= rows
        return
    bucket = rows.bit_length()
    key = (site.stats, bucket)      # (a model's or a cached state's own counters)
    plain = _plain.get(key)
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
        if site.waiting:        # calls that waited for our one-time work: counted now
            _count_waited(site, plain)
    else:
        site.unmeasured += 1
        site.plain_note = plain
        if plain is _WAITING:
            site.waiting += 1
            site.waited_rows += rows


def _count_waited(site, plain):
    site.unmeasured -= site.waiting
    if site.waited_rows == site.waiting * site.plain_rows:     # (the usual: all alike)
        site.rows -= site.waited_rows
        site.same_rows += site.waiting
    else:
        site.plain_s += (plain[0] * site.waited_rows / plain[1] if plain[1]
                         else plain[0] * site.waiting)
    site.waiting = site.waited_rows = 0


def _rows(x):
    kind = type(x)
    if kind is list or kind is tuple:
        x = x[0] if x else None
    elif kind is dict:
        x = next(iter(x.values()), None)
    shape = getattr(x, 'shape', None)
    try:
        return int(shape[0]) if shape else 1
    except (TypeError, ValueError):
        return 1


def _note_reasons(s):
    try:
        _reasons_seen[s] = dict(s.fallback_reasons)
    except RuntimeError:                        # (another thread added one meanwhile)
        pass


def _new_reason(s):
    """The fallback reason whose count grew since the last look (None: none did)."""
    try:
        reasons = dict(s.fallback_reasons)      # (another thread may add one meanwhile)
    except RuntimeError:
        return None
    seen = _reasons_seen.get(s)
    found = None
    if seen is not None:
        for reason, n in reasons.items():
            if n > seen.get(reason, 0):
                found = reason
                break
    elif reasons:
        found = max(reasons.items(), key=lambda kv: kv[1])[0]
    if found is not None:
        _reasons_seen[s] = reasons
    return found


# -- plain Keras' cost -----------------------------------------------------------------------

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
    from .engine import compiled
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
            _plain[key] = reason
            return reason
        if not _all_plain(x):
            return 'not timed yet: inputs that are not plain arrays'
        try:
            if entry.adapter.current_session() is not entry.session:
                return 'not timed yet: Keras uses another session here'
        except Exception:
            return 'not timed yet: no session'
        graph = entry.graph
        if _busy() and site.plain_waits < PLAIN_WAIT_CALLS:
            site.plain_waits += 1
            return _WAITING
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
            _plain[key] = reason
            return reason
        if _busy() and site.plain_waits < PLAIN_WAIT_CALLS:
            site.plain_waits += 1
            return _WAITING
        n = rows
    try:
        if graph is not None:
            with graph.as_default():
                times = _time(wrapped, args, kwargs)
        else:
            times = _time(wrapped, args, kwargs)
    except Exception as exc:
        reason = 'not timed: the original raised %s' % type(exc).__name__
        _plain[key] = reason
        return reason
    result = _plain[key] = (sorted(times)[1], n)
    return result


_WAITING = 'not timed yet: our one-time work ran on another thread'


def _busy():
    """Whether our own one-time work runs on another thread now: plain calls timed then
    share the cores with it, and would inflate the estimate (seen: 2.6 ms a call for an
    LSTM that runs in 1.5)."""
    from .engine import compiled, warmup
    return compiled.making() or warmup.running()


def _retime_plain(site, rows, wrapped, instance, args, kwargs, x):
    """Time plain Keras again at the end of the site's sample, when the first calls'
    one-time work is over, and keep the lower figure: the estimate never claims a gain
    that a moment of contention made."""
    key = (site.stats, rows.bit_length())
    old = _plain.get(key)
    if type(old) is not tuple or _busy():
        return
    new = _measure_plain(site, key, rows, wrapped, instance, args, kwargs, x)
    if type(new) is not tuple:
        _plain[key] = old
        return
    if new[0] * old[1] > old[0] * new[1]:
        _plain[key] = new = old
    per_call = new[0] * rows / new[1] if new[1] else new[0]
    site.plain_per_call = min(site.plain_per_call, per_call)


def _time(wrapped, args, kwargs):
    wrapped(*args, **kwargs)
    times = []
    for _ in range(3):
        t0 = _perf()
        wrapped(*args, **kwargs)
        times.append(_perf() - t0)
    return times


# -- sampling: results read, the spanning function, fresh rows --------------------------------

class _Use(object):
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


def _sampled(site):
    """One more call of the site's sample; the last one once every sampler is done or
    SAMPLE_CALLS calls were sampled (a sampler counts down only on calls it can use: a
    loop that gives it none must not keep its site on the slow path)."""
    global _sampling
    site.sample_left -= 1
    if site.sample_left <= 0 or not (site.watch_left or site.span_left or site.fresh_left):
        with _lock:
            if site.sampling:
                site.sampling = False
                site.held = {}      # frames of the span check: let them go
                _sampling -= 1


def _sample(site, f, out, x, rows, served_ahead):
    _sampled(site)
    if site.span_left and f is not None and rows <= 64:
        _span(site, f)
    if (site.fresh_left and rows == 1 and type(x) is _ndarray and x.ndim
            and not served_ahead):
        _fresh(site, f, x)
    if site.watch_left:
        kind = type(out)
        if kind is _ndarray or (kind is list and out and all(type(o) is _ndarray
                                                             for o in out)):
            from .engine import deferred
            if not settings.defer and deferred.current() is None:
                site.watch_left -= 1
                site.watched += 1
                rec = _Use(site, site.epoch)
                site.open_watch = True
                if kind is list:
                    return [_watch(o, rec) for o in out]
                return _watch(out, rec)
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
        inputs = tuple(_plain_of(v) for v in inputs)
        out = kwargs.get('out')
        if out:
            kwargs['out'] = tuple(_plain_of(v) for v in out)
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        return func(*_plain_deep(args), **_plain_deep(kwargs))

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
                    '__getitem__', 'base', 'view'))


def _forward(name):
    def method(self, *args):
        _mark(self)
        return getattr(_ndarray.view(self, _ndarray), name)(*args)
    method.__name__ = name
    return method


for _name in ('float int index complex bool iter repr str format contains setitem '
              'delitem copy deepcopy').split():
    setattr(Watched, '__%s__' % _name, _forward('__%s__' % _name))


def _basic(key):
    if type(key) is tuple:
        return all(type(k) in (int, slice) or k is None or k is Ellipsis for k in key)
    return type(key) in (int, slice)


def _mark(w):
    rec = _ndarray.__getattribute__(w, '__dict__').pop('_kfp_use', None)
    if rec is not None and rec.epoch != -1:
        _used(rec)


def _watch(array, rec):
    w = _ndarray.view(array, Watched)
    w._kfp_use = rec
    return w


def _plain_of(v):
    if type(v) is Watched:
        _mark(v)
        return _ndarray.view(v, _ndarray)
    return v


def _plain_deep(v):
    return map_nested(v, _plain_of)


def _unwatch_call(x, args, kwargs):
    """A watched result passed back in (the next step of a loop): a use, and the plain
    array goes on, so the call takes the path it takes without the report."""
    new = _plain_deep(x)
    if args:
        args = (new,) + tuple(args[1:])
    else:
        kwargs = dict(kwargs, x=new)
    return new, args, kwargs


# -- the report ------------------------------------------------------------------------------

def _advice(site, d):
    advice = []
    model = site.model_ref()
    entry = None
    if model is not None:
        from .engine import compiled
        entry = compiled.get(model)
    if site.keras:
        advice.append({'kind': 'left_to_keras', 'text': 'left to %s: %s' % (
            'TensorFlow' if site.entry == 'run' else 'Keras', ', '.join(
                '%s (%d calls)' % kv for kv in site.reasons.most_common()))})
    if entry is None or entry.refused:
        return advice
    batches = list(site.batches)
    if site.open_watch:
        batches.append(site.calls - site.epoch_start)
    if entry.batch_safe is False or entry.excluded:
        reason = 'excluded by keras_fastpredict.exclude()' if entry.excluded else \
            entry.batching_reason
        advice.append({'kind': 'not_batchable', 'reason': reason,
                       'text': 'the model cannot be batched (%s): only the fast path '
                               'applies' % reason})
        return advice
    if site.deferred or site.readahead * 2 > site.calls:
        return advice            # already batched: deferral or read-ahead serves it
    limit = settings.max_batch_size
    if batches and site.watched >= 2:
        reach = int(min(np.median(batches), limit))
        d['results_read']['batch_it_would_reach'] = reach
        if reach >= 2:
            where = _enclosing(site)
            if where is None:
                text = ('results are first read %d calls later (median of %d measured): '
                        'deferring the calls (with keras_fastpredict.batching() around the '
                        'loop) would run them in batches of %d' % (
                            int(np.median(batches)), len(batches), reach))
                advice.append({'kind': 'fast_predict', 'batch_size': reach,
                               'function': None, 'text': text})
            else:
                name, file, first, line = where
                if name == '<module>':
                    how = ('with keras_fastpredict.batching(): around the loop at %s:%d'
                           % (file, line))
                else:
                    how = '@keras_fastpredict.fast_predict on %s (%s:%d)' % (name, file, first)
                text = ('results are not read before the next call (first read %d calls '
                        'later, median of %d measured): %s would run these calls in '
                        'batches of %d' % (int(np.median(batches)), len(batches), how,
                                           reach))
                advice.append({'kind': 'fast_predict', 'batch_size': reach,
                               'function': None if name == '<module>' else name,
                               'file': file, 'line': first if name != '<module>' else line,
                               'text': text})
            return advice
    used_at_once = bool(batches) and site.watched >= 2
    if site.dataset is not None and site.walk >= 2 and site.readahead * 2 < site.calls:
        name = site.dataset[1]
        advice.append({'kind': 'index_rows', 'array': name, 'text': (
            'the one-row inputs are fresh copies of consecutive rows of %r (%d of %d '
            'sampled calls): passing %s[i:i+1] instead lets read-ahead predict the rows '
            'ahead in one run' % (name, site.fresh, FRESH_CALLS - site.fresh_left or 1,
                                  name))})
    elif used_at_once:
        advice.append({'kind': 'used_at_once', 'text': (
            'each result is read before the next call (%d of %d watched): deferral would '
            'not batch these calls, and their inputs are not rows of one array in scope '
            'for read-ahead; the fast path is what applies' % (
                len(site.batches), site.watched))})
    return advice


def _enclosing(site):
    if not site.enclosing:
        return None
    return site.enclosing.most_common(1)[0][0]


def _site_dict(site):
    stats = site.stats
    batches = list(site.batches)
    if site.open_watch:
        batches.append(site.calls - site.epoch_start)
    calls = site.calls
    measured = calls - site.unmeasured - site.errors
    d = collections.OrderedDict([
        ('site', site.where()), ('file', site.file), ('line', site.line),
        ('function', site.function), ('entry', site.entry),
        ('model', (site.path or stats).name),
        ('calls', calls), ('rows', site.total_rows()),
        ('paths', collections.OrderedDict([
            ('fast', site.fast), ('readahead', site.readahead), ('deferred', site.deferred),
            ('merged', site.merged), ('keras', site.keras)])),
        ('keras_reasons', dict(site.reasons)),
        ('errors', site.errors),
        ('time_s', site.time_s),
        ('plain_estimate_s', (site.plain_total() * calls / measured) if measured else None),
        ('plain_estimate_calls', measured),
        ('plain_estimate', site.plain_note if site.unmeasured else 'measured'),
        ('results_read', collections.OrderedDict([
            ('watched', site.watched), ('batches', batches[:64]),
            ('batch_it_would_reach', None)])),
    ])
    d['advice'] = _advice(site, d)
    return d


def _all_sites():
    # Not blocking for ever: this may run in a signal handler (SIGTERM) of a child.
    locked = _lock.acquire(timeout=1.0)
    try:
        sites = list(_retired_sites)
        seen = set()
        for table, _ in list(_site_tables.values()):
            for site in list(table.values()):
                if id(site) not in seen:
                    seen.add(id(site))
                    sites.append(site)
    finally:
        if locked:
            _lock.release()
    return sites


def report():
    """The call-site report of this process: a dict (``sites`` sorted by time spent), the
    data of the table and the JSON file (schema in the README)."""
    sites = _all_sites()
    for site in sites:
        site.held = {}                   # frames held for the span check: let them go
        if site.path is not None and site.path.report_owner is site:
            _settle(site)
    rows = [_site_dict(s) for s in sites if s.calls]
    rows.sort(key=lambda d: -d['time_s'])
    return collections.OrderedDict([
        ('version', 1), ('pid', os.getpid()), ('argv', list(sys.argv)),
        ('report', bool(settings.report)), ('plain_estimate_method', PLAIN_METHOD),
        ('sites', rows)])


def reset():
    global _sampling
    with _lock:
        _sampling = 0
        for site in _retired_sites + [s for t, _ in _site_tables.values() for s in t.values()]:
            if site.path is not None and site.path.report_owner is site:
                site.path.report_owner = None
        for table, by_line in _site_tables.values():
            table.clear()
            by_line.clear()
        del _retired_sites[:]
        _plain.clear()
        _reasons_seen.clear()


def _ms(seconds):
    return '%10.1f' % (1e3 * seconds) if seconds is not None else '%10s' % '-'


def format_table(data=None):
    data = report() if data is None else data
    if not data['sites']:
        return 'keras_fastpredict: call sites: no predict calls seen with the report on'
    lines = ['keras_fastpredict: call sites (paths: fast / read-ahead / deferred / merged / '
             'left to Keras; plain: estimated, see --stats-json)',
             '  %-44s %-12s %7s %8s %-24s %10s %10s' % (
                 'site', 'model', 'calls', 'rows', 'fast/ra/def/mrg/keras', 'time ms',
                 'plain ms')]
    for d in data['sites']:
        p = d['paths']
        site = d['site']
        if len(site) > 44:
            site = '...' + site[-41:]
        lines.append('  %-44s %-12s %7d %8d %-24s %s %s' % (
            site, (d['model'] or '-')[:12], d['calls'], d['rows'],
            '%d/%d/%d/%d/%d' % (p['fast'], p['readahead'], p['deferred'], p['merged'],
                                p['keras']),
            _ms(d['time_s']), _ms(d['plain_estimate_s'])))
        if d['plain_estimate_s'] is None and d['plain_estimate'] != 'measured':
            lines.append('      plain: %s' % d['plain_estimate'])
        for a in d['advice']:
            lines.append('      advice: %s' % a['text'])
    return '\n'.join(lines)


def write_json(path, data=None):
    data = report() if data is None else data
    tmp = '%s.tmp%d' % (path, os.getpid())
    with open(tmp, 'w') as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
    return path


JSON_ENV = 'KERAS_FASTPREDICT_STATS_JSON'


def at_exit(show, path):
    """The runner's own process: the table on stderr, the JSON file."""
    data = report()
    if show:
        sys.stderr.write(format_table(data) + '\n')
    if path:
        try:
            write_json(path, data)
        except OSError as exc:
            sys.stderr.write('keras_fastpredict: cannot write %s: %s\n' % (path, exc))


def in_child(pid_prefix, write_stderr):
    """A child process of the runner's job (``processes.report``): its own table (to
    ``write_stderr``, prefixed with its pid) and its JSON file, named by its pid."""
    if not settings.report:
        return None
    data = report()
    if not data['sites']:
        return data
    path = os.environ.get(JSON_ENV)
    if path:
        try:
            write_json(child_path(path), data)
        except OSError:
            pass
    if write_stderr is not None:
        write_stderr(format_table(data).replace('keras_fastpredict:', pid_prefix, 1) + '\n')
    return data


def child_path(path, pid=None):
    """Where a child process writes its report: ``FILE`` named by its pid."""
    root, ext = os.path.splitext(path)
    return '%s.%d%s' % (root, os.getpid() if pid is None else pid, ext or '.json')


def _forget_parent():
    global _lock, _sampling
    _lock = threading.Lock()
    _sampling = 0
    for table, by_line in _site_tables.values():
        table.clear()
        by_line.clear()
    del _retired_sites[:]
    _reasons_seen.clear()


os.register_at_fork(after_in_child=_forget_parent)
