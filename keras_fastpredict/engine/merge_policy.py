"""Whether concurrent calls of one model are merged, chosen by measurement.

When more callers are inside a model's predict than it has run slots (see
``concurrent_batcher``), a call can go one of two ways: DIRECT, its own session run at
once in its own thread (more runs in flight than cores), or MERGE, it queues and the next
free caller runs all queued calls as one batch. Which is faster depends on the model (a
run of many rows may cost about what one row costs, or many times it), on the machine and
on the load, so it is measured, per model and per load level: the number of callers
inside at once, in powers of two above the slots (3-4, 5-8, 9-16... on 2 slots).

A level goes the way that measured faster (its first way is a guess, ``prior``), and now
and then checks the other: an epoch of the way in use (the reference), then an epoch of
the other (the trial); the trial's way is kept if its mean latency was lower. Calls are
timed from arrival to return, queueing, hand-offs and runs included; with n callers
inside, the mean latency is the cost per call (Little's law: calls served per second =
n / latency), so the way with the lower mean also serves more calls. An epoch times the
first calls that arrive in it and ends when all of them have returned, so slow calls
weigh as much as fast ones; its mean leaves out the slowest eighth (one-time work such
as a first run of a new batch size, a garbage collection, the machine's other load). After
a change of way no call is timed until the other way's calls have had time to return
(three times the mean of the epoch before): just after a switch from merging, most
callers still wait in the queue and leave the cores to the first direct runs, which
would look fast. A way that keeps losing is checked less and
less often (the gap between checks doubles, up to GAP_MAX epochs' worth of calls), and a
trial that can no longer win ends at once, so checking costs at most about one epoch of
the better way per check. Between checks calls are not timed: the usual call costs a
dictionary lookup and a counter.

Pure bookkeeping: callers take the way without a lock (``way``) and hand latencies back
under their lock (``record``); the clock is a parameter, so it is tested with made-up
latencies and time.
"""
import itertools
import time

DIRECT, MERGE = 'direct', 'merge'
OTHER = {DIRECT: MERGE, MERGE: DIRECT}

GAP_FIRST = 1        # epochs' worth of calls of the better way before the next check: a
                     # wrong first guess costs one epoch
GAP_MAX = 128        # the gap doubles each time the other way loses, up to this
MIN_CALLS = 16       # timed calls per epoch, at least (more for higher levels)
MAX_CALLS = 256
DRAIN = 3.0          # after a switch, no call is timed for this many mean latencies
TRIM = 8             # an epoch's mean leaves out its slowest 1/TRIM calls

# Phases of a level: untimed calls of the best way; a timed epoch of it; a timed trial
# of the other way.
GAP, REFERENCE, TRIAL = 'gap', 'reference', 'trial'
_TURN = 'turn'       # the ticket of the call that ends a gap


class Level(object):
    """One load level's measurements and choice."""
    __slots__ = ('key', 'current', 'best', 'best_mean', 'latencies', 'kept', 'gap',
                 'calls', 'checks', 'switches', 'means', 'epochs', 'resume')

    def __init__(self, key, slots, first):
        self.key = key
        self.calls = max(MIN_CALLS, min(MAX_CALLS, 2 * (slots << key)))  # timed per epoch
        self.best = first
        self.best_mean = None
        self.kept = self.calls - self.calls // TRIM     # the fastest, counted in a mean
        self.latencies = []         # of the timed calls returned
        self.gap = GAP_FIRST
        self.checks = 0
        self.switches = 0
        self.epochs = 0
        self.means = {DIRECT: None, MERGE: None}     # the last epoch's mean of each way
        self.resume = None          # a lost trial's calls may be out until then
        # (way, phase, arrivals, timed, start, turn): read by callers without a lock; a
        # new tuple for each phase, so a ticket names its phase by its counter. next() on
        # a counter is atomic: each arrival gets its own number. ``start``: no call is
        # timed before this time (a switch's drain), or None; ``turn``: the arrival that
        # ends a gap.
        self.current = (first, REFERENCE, itertools.count(), itertools.count(), None, -1)


class Policy(object):
    """Per model. ``slots``: runs in flight before callers may queue; ``prior()``: the way
    a new level starts with (a guess from the model's run time, see concurrent_batcher)."""

    def __init__(self, slots, prior, clock=time.perf_counter):
        self.slots = slots
        self.prior = prior
        self.clock = clock
        self.levels = {}

    def level(self, callers):
        """The load level of ``callers`` inside at once (above the slots: 1, 2, 3...)."""
        return ((callers - 1) // self.slots).bit_length()

    def way(self, key):
        """(way, ticket) for a call at level ``key``. A ticket (not None) asks for the
        call's latency: pass it back to ``record``, whatever became of the call."""
        level = self.levels.get(key)
        if level is None:
            level = self.levels.setdefault(key, Level(key, self.slots, self.prior()))
        way, phase, arrivals, timed, start, turn = level.current
        if phase is GAP:            # (the usual call: untimed)
            if next(arrivals) != turn:
                return way, None
            return way, (key, arrivals, _TURN)
        next(arrivals)
        if start is not None:
            if self.clock() < start:
                return way, None            # the other way's calls may still be out
        if next(timed) < level.calls:
            return way, (key, arrivals, phase)
        return way, None

    def record(self, ticket, latency):
        """The latency (seconds) of the call ``way`` gave ``ticket``. Call under a lock:
        phases change here."""
        key, arrivals, phase = ticket
        level = self.levels[key]
        if level.current[2] is not arrivals:
            return                          # a phase ended meanwhile (a lost trial)
        if phase is _TURN:
            self._begin(level, REFERENCE, level.best, level.resume)
            return
        latencies = level.latencies
        latencies.append(latency)
        n = len(latencies)
        if n >= level.calls:
            self._end(level, _mean(latencies, level.kept))
        elif phase is TRIAL:
            # Lost already? The calls still to come can take the place of as many of
            # these among the fastest, no more: what is left is its smallest possible
            # sum.
            least = level.kept - (level.calls - n)
            if least > 0 and sum(sorted(latencies)[:least]) > level.best_mean * level.kept:
                self._end(level, None)

    def _end(self, level, mean):
        """End the epoch: ``mean``, its latency, or None for a trial that lost early."""
        way, phase = level.current[:2]
        lost = mean is None
        if lost:
            mean = sum(level.latencies) / len(level.latencies)
        level.means[way] = mean
        level.epochs += 1
        drain = self.clock() + DRAIN * mean
        if phase is REFERENCE:
            level.best_mean = mean          # the latest: load changes over time
            level.checks += 1
            self._begin(level, TRIAL, OTHER[way], drain)
            return
        if not lost and mean < level.best_mean:
            level.best, level.best_mean = way, mean
            level.gap = GAP_FIRST
            level.switches += 1
            level.resume = None
        else:
            level.gap = min(2 * level.gap, GAP_MAX)
            level.resume = drain            # (back to the best way: the next reference
        self._begin(level, GAP, level.best, None)   # waits for the trial's calls)

    def _begin(self, level, phase, way, start):
        level.latencies = []
        level.current = (way, phase, itertools.count(), itertools.count(), start,
                         level.gap * level.calls)

    def describe(self):
        """Per level: callers, way in use, the last epoch's mean latency of each way (ms),
        checks and switches so far."""
        out = []
        for key in sorted(self.levels):
            level = self.levels[key]
            low = self.slots * (1 << (key - 1)) + 1 if key else 1
            out.append({
                'callers': '%d-%d' % (low, self.slots << key),
                'way': level.best,
                'direct_ms': _ms(level.means[DIRECT]),
                'merge_ms': _ms(level.means[MERGE]),
                'epochs': level.epochs,
                'checks': level.checks,
                'switches': level.switches,
            })
        return out


def _mean(latencies, kept):
    return sum(sorted(latencies)[:kept]) / kept


def _ms(seconds):
    return None if seconds is None else round(1e3 * seconds, 4)
