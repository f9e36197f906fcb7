"""Call sites: one per line of the user's code, model (or cached state) and entry point,
with its calls' counts, time, rows and samples; the tables that hold them; and which way
calls went, read from the model's counters once per run of calls, not per call."""
import collections
import operator
import os
import threading
import weakref

from ..config import settings

# The counters a model's fast calls' ways are read from (one C call).
_paths = operator.attrgetter('deferred', 'readahead_hits', 'readahead_windows', 'queued')

WATCH_CALLS = 64        # results watched per site (the sample advice is measured on)
AUTO_WATCH_CALLS = 16   # with auto-batch alone (no report shown): results watched, and
                        # nothing else sampled (the span and fresh rows are for advice)
SAMPLE_CALLS = 2 * WATCH_CALLS   # a site's sample ends after this many calls, whatever
                                 # its samplers saw (each counts only calls it can use)
SPAN_CALLS = 16         # consecutive calls per site whose frames are compared
FRESH_CALLS = 16        # one-row inputs per site checked against arrays in scope

lock = threading.Lock()
sampling_count = 0                 # sites still sampling (their results may be watched)

tables = {}                        # entry path -> (its sites, its steady calls by line)
retired = []                       # sites of freed models, kept for the report
reasons_seen = weakref.WeakKeyDictionary()   # stats -> copy of its fallback reasons


class Site(object):
    __slots__ = ('code', 'file', 'line', 'function', 'entry', 'stats', 'path', 'mark',
                 'instance_ref', 'model_ref', 'rows', 'same_rows',
                 'acc', 'served', 'readahead', 'deferred', 'merged', 'keras', 'reasons',
                 'plain_s', 'unmeasured', 'plain_note', 'plain_rows', 'plain_per_call',
                 'plain_waits', 'waiting', 'retime_left',
                 'sampling', 'sample_left', 'watch_left', 'watched', 'threads',
                 'batches', 'span_left', 'held', 'enclosing',
                 'fresh_left', 'fresh', 'last_shape', 'dataset', 'walk', 'errors', 'state',
                 'auto', 'auto_note', 'other_s')

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
        self.instance_ref = weak(instance)
        self.model_ref = weak(model if model is not None else instance)
        # An announcing adapter's state (K.function, Session.run), weakly: it holds the
        # graph, the session and their callables.
        self.state = None if state is None else weak(state)
        self.rows = self.same_rows = self.served = self.readahead = self.deferred = 0
        self.merged = self.keras = self.unmeasured = self.errors = 0
        self.acc = [0.0, 0]         # time spent, usual calls (a list: see hot_tuple)
        self.other_s = 0.0          # of that time, the calls not counted usual (the
                                    # sample's, others passed on): usual time apart
        self.plain_s = self.plain_per_call = 0.0
        self.plain_rows = None      # the row count plain_per_call was estimated for
        self.plain_waits = 0        # calls not timed while our one-time work ran
        self.waiting = {}           # of them, not yet counted: row bucket -> [calls, rows]
        self.retime_left = 0        # calls that may yet time plain again (kept off the
                                    # usual path meanwhile)
        self.sampling = sampling    # (made under lock)
        self.sample_left = SAMPLE_CALLS
        if sampling:
            global sampling_count
            sampling_count += 1
        self.plain_note = None
        self.reasons = collections.Counter()
        if stats not in reasons_seen:      # (reasons from before the report are not its)
            note_reasons(stats)
        self.watch_left = WATCH_CALLS
        self.watched = 0
        self.threads = {}          # thread id -> its watch.Thread (threads of the sample)
        self.batches = []          # calls each first read would have batched (watch.py)
        self.span_left = SPAN_CALLS
        self.held = {}             # thread id -> frames of its previous sampled call
        self.enclosing = collections.Counter()
        self.fresh_left = FRESH_CALLS
        if not settings.report:    # (auto-batch alone: only what it decides on)
            self.watch_left, self.span_left, self.fresh_left = AUTO_WATCH_CALLS, 0, 0
        self.fresh = 0             # one-row fresh inputs of the previous call's shape
        self.last_shape = None
        self.dataset = None        # (weakref to the array, its name, last row matched)
        self.walk = 0              # consecutive rows of that array seen
        self.auto = None           # auto-batch: the site's Auto once its calls are deferred
        self.auto_note = None      # auto-batch: why its calls are not (report/auto.py)

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


def weak(obj):
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: None


#
# A fast call's way (read-ahead, deferred, merged, else the fast path alone) is counted in
# its model's counters. The site that last called a model "owns" those counters
# (``ModelStats.report_owner``); while it does, nothing is read per call. When another site
# calls the model (or the report is read), the owner's share since it took over is added to
# it: the counters' growth over its run of calls. Calls of other threads in that time count
# for the owner (the report says paths of calls that overlap in time are approximate).

def take(path, site):
    owner = path.report_owner
    if owner is not None:
        settle(owner)
    path.report_owner = site
    site.path = path
    site.mark = _paths(path)


def settle(site):
    path, mark = site.path, site.mark
    if mark is None:
        return
    now = _paths(path)
    site.mark = now
    # (never below zero: reset_stats() clears the counters under a mark)
    site.deferred += max(0, now[0] - mark[0])
    site.readahead += max(0, now[1] - mark[1]) + max(0, now[2] - mark[2])
    site.merged += max(0, now[3] - mark[3])


def keras_call(site, rows, elapsed, reason):
    site.keras += 1
    site.reasons[reason] += 1
    site.rows += rows
    site.plain_s += elapsed       # plain Keras ran: the call is its own measure


def passed_on(site, s, rows, elapsed):
    """A call the adapter did not serve itself: left to Keras (or TF) with a reason, or
    passed on as it was (uncounted)."""
    site.other_s += elapsed
    reason = new_reason(s)
    keras_call(site, rows, elapsed, reason or 'arguments passed on to Keras as they are')


def error(site, s):
    """A call that raised: counted apart, its reason (if the adapter noted one) taken, so
    that it is not the next call's."""
    site.errors += 1
    new_reason(s)


def error_in_call(site, elapsed):
    """A call of the site's that raised, its time (added to the site's) spent: none of
    it usual time."""
    site.other_s += elapsed
    error(site, site.stats)


def rows_of(x):
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


def note_reasons(s):
    try:
        reasons_seen[s] = dict(s.fallback_reasons)
    except RuntimeError:                        # (another thread added one meanwhile)
        pass


def new_reason(s):
    """The fallback reason whose count grew since the last look (None: none did)."""
    try:
        reasons = dict(s.fallback_reasons)      # (another thread may add one meanwhile)
    except RuntimeError:
        return None
    seen = reasons_seen.get(s)
    found = None
    if seen is not None:
        for reason, n in reasons.items():
            if n > seen.get(reason, 0):
                found = reason
                break
    elif reasons:
        found = max(reasons.items(), key=lambda kv: kv[1])[0]
    if found is not None:
        reasons_seen[s] = reasons
    return found


def all_sites():
    # Not blocking for ever: this may run in a signal handler (SIGTERM) of a child.
    locked = lock.acquire(timeout=1.0)
    try:
        sites = list(retired)
        seen = set()
        for table, _ in list(tables.values()):
            for site in list(table.values()):
                if id(site) not in seen:
                    seen.add(id(site))
                    sites.append(site)
    finally:
        if locked:
            lock.release()
    return sites


def end_sample(site):
    """The site's sample is taken: its calls take the usual path from now on."""
    global sampling_count
    with lock:
        if site.sampling:
            site.sampling = False
            site.held = {}      # frames of the span check: let them go
            sampling_count -= 1


def clear():
    """Forget every site (under the lock: calls may be recording)."""
    global sampling_count
    with lock:
        sampling_count = 0
        for site in retired + [s for t, _ in tables.values() for s in t.values()]:
            if site.path is not None and site.path.report_owner is site:
                site.path.report_owner = None
        _clear_tables()


def _clear_tables():
    for table, by_line in tables.values():
        table.clear()
        by_line.clear()
    del retired[:]
    reasons_seen.clear()


def _forget_parent():
    global lock, sampling_count
    lock = threading.Lock()
    sampling_count = 0
    _clear_tables()


os.register_at_fork(after_in_child=_forget_parent)
