"""Whether concurrent calls of one model are merged, chosen by measurement.

When more callers are inside a model's predict than it has run slots (see
``concurrent_batcher``), a call can go one of two ways: DIRECT, its own session run at
once in its own thread (more runs in flight than cores), or MERGE, it queues and the next
free caller runs all queued calls as one batch. Which is faster depends on the model (a
run of many rows may cost about what one row costs, or many times it), on the machine and
on the load, so it is measured, per model and per load level: the number of callers
inside at once, in powers of two above the slots (3-4, 5-8, 9-16... on 2 slots).

Each level's calls are timed from arrival to return (queueing, hand-offs and runs
included) in epochs of the way in use. An epoch times calls that arrive once every call
of the previous epoch has returned (until then callers still meet the other way: just
after a switch from merging, most of them wait in the queue and leave the cores to the
first direct runs, which would look fast), and ends when all the calls it timed have
returned, so slow calls weigh as much as fast ones. With n callers inside, the mean latency is the
cost per call (Little's law: calls served per second = n / latency), so the way with
the lower mean also serves more calls. Now and then an epoch tries the other way; if its
mean is lower it is kept. A way that keeps losing is tried less and less often (the gap
doubles up to GAP_MAX epochs), and a trial that can no longer win ends at once, so
checking costs at most about one epoch of the better way per trial.

Pure bookkeeping: callers pass latencies in (``record``, under their lock), read the way
to go without a lock (``way``), so it is tested with made-up latencies.
"""

import itertools

DIRECT, MERGE = 'direct', 'merge'
OTHER = {DIRECT: MERGE, MERGE: DIRECT}

GAP_FIRST = 1        # epochs of the better way before the other is tried (again): a
                     # wrong first guess costs one epoch
GAP_MAX = 128        # the gap doubles each time the other way loses, up to this
MIN_CALLS = 16       # timed calls per epoch, at least (more for higher levels)
MAX_CALLS = 256


class Level(object):
    """One load level's measurements and choice."""
    __slots__ = ('key', 'current', 'best', 'best_mean', 'trying', 'n', 'total', 'gap',
                 'since', 'calls', 'trials', 'switches', 'means', 'returned', 'draining')

    def __init__(self, key, slots, first):
        self.key = key
        self.calls = max(MIN_CALLS, min(MAX_CALLS, 2 * (slots << key)))  # timed per epoch
        self.best = first
        self.best_mean = None
        self.trying = False
        self.n = 0                  # timed calls returned, and their latencies' sum
        self.total = 0.0
        self.gap = GAP_FIRST
        self.since = 0
        self.trials = 0
        self.switches = 0
        self.means = {DIRECT: None, MERGE: None}     # the last epoch's mean of each way
        self.returned = 0           # calls of this epoch returned (timed or not)
        self.draining = None        # [calls of the previous epoch not returned yet]
        # (way, epoch, arrivals, timed): read by callers without a lock. next() on a
        # counter is atomic: each arrival gets its own number; ``timed`` counts the
        # arrivals timed, None while the previous epoch drains.
        self.current = (first, 0, itertools.count(), itertools.count())


class Policy(object):
    """Per model. ``slots``: runs in flight before callers may queue; ``prior()``: the way
    a new level starts with (a guess from the model's run time, see concurrent_batcher)."""

    def __init__(self, slots, prior):
        self.slots = slots
        self.prior = prior
        self.levels = {}

    def level(self, callers):
        """The load level of ``callers`` inside at once (above the slots: 1, 2, 3...)."""
        return ((callers - 1) // self.slots).bit_length()

    def way(self, key):
        """(way, ticket) for a call at level ``key``; pass the ticket back to ``record``
        with the call's latency, whatever became of the call."""
        level = self.levels.get(key)
        if level is None:
            level = self.levels.setdefault(key, Level(key, self.slots, self.prior()))
        way, epoch, arrivals, timed = level.current
        next(arrivals)
        return way, (key, epoch, timed is not None and next(timed) < level.calls)

    def record(self, ticket, latency):
        """The latency (seconds) of the call ``way`` gave ``ticket``. Call under a lock:
        epochs begin and end here."""
        key, epoch, timed = ticket
        level = self.levels[key]
        way, current, arrivals, counter = level.current
        if epoch != current:
            draining = level.draining
            if draining is not None and epoch == current - 1:
                draining[0] -= 1
                if draining[0] <= 0:            # the previous way's calls are all back
                    level.draining = None
                    level.current = (way, current, arrivals, itertools.count())
            return
        level.returned += 1
        if not timed:
            return
        level.n += 1
        level.total += latency
        if (level.trying and level.best_mean is not None
                and level.total > level.best_mean * level.calls):
            self._end(level, lost=True)          # cannot end below the best's mean now
        elif level.n >= level.calls:
            self._end(level)

    def _end(self, level, lost=False):
        mean = level.total / level.n
        way, epoch, arrivals, _ = level.current
        level.means[way] = mean
        if level.trying:
            level.trying = False
            level.since = 0
            if not lost and mean < level.best_mean:
                level.best, level.best_mean = way, mean
                level.gap = GAP_FIRST
                level.switches += 1
            else:
                level.gap = min(2 * level.gap, GAP_MAX)
            next_way = level.best
        else:
            level.best_mean = mean         # the latest epoch: load changes over time
            level.since += 1
            next_way = way
            if level.since >= level.gap:
                level.trying = True
                level.trials += 1
                next_way = OTHER[level.best]
        level.n, level.total = 0, 0.0
        # Calls of this epoch still out: next(arrivals) is one past the arrivals so far.
        out = next(arrivals) - 1 - level.returned
        level.returned = 0
        if next_way == way or out <= 0:
            level.draining = None
            level.current = (next_way, epoch + 1, itertools.count(), itertools.count())
        else:
            level.draining = [out]
            level.current = (next_way, epoch + 1, itertools.count(), None)

    def describe(self):
        """Per level: callers, way in use, the last epoch's mean latency of each way (ms),
        trials and switches so far."""
        out = []
        for key in sorted(self.levels):
            level = self.levels[key]
            low = self.slots * (1 << (key - 1)) + 1 if key else 1
            out.append({
                'callers': '%d-%d' % (low, self.slots << key),
                'way': level.best,
                'direct_ms': _ms(level.means[DIRECT]),
                'merge_ms': _ms(level.means[MERGE]),
                'epochs': level.current[1],
                'trials': level.trials,
                'switches': level.switches,
            })
        return out


def _ms(seconds):
    return None if seconds is None else round(1e3 * seconds, 4)
