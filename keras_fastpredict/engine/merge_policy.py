"""Whether concurrent calls of one model are merged, chosen by measurement.

When more callers are inside a model's predict than it has run slots (see
``concurrent_batcher``), a call can go one of two ways: DIRECT, its own session run at
once in its own thread (more runs in flight than cores), or MERGE, it queues and the next
free caller runs all queued calls as one batch. Which is faster depends on the model (a
run of many rows may cost about what one row costs, or many times it), on the machine and
on the load, so it is measured, per model and per load level: the number of callers
inside at once, in powers of two above the slots (3-4, 5-8, 9-16... on 2 slots).

A level goes the way that measured faster (its first way is its nearest measured
neighbour's, or a guess from the model, ``prior``, read after half an epoch run direct,
not measured while its callers arrive), and now and then checks the other:
an epoch of the way in use (the reference), then an epoch of the other (the trial); the
trial's way is kept if its calls took clearly less time (MARGIN). What an epoch measures
is the mean time a call spends inside, by Little's law: W = L / lambda, with lambda the
calls arriving per second over the epoch and L the mean number of callers inside (seen
by each arrival). No call is timed: every call of the epoch counts, so a few very slow
calls (16 threads on 2 cores make some wait for a core for many milliseconds) weigh
exactly their share, and one-time work (a new batch size's first runs) costs its own
duration, not a multiple. With a fixed number of callers (threads that call again and again) a lower W
is more calls served; with calls arriving at a fixed rate (a server below capacity) it
is less time per call.

After a change of way the epoch starts once the other way's calls have had time to return
(three of its mean times): just after a switch from merging, most callers still wait in
the queue and leave the cores to the first direct runs, which would look fast. A trial of
merging also waits until the direct runs in flight at the switch have returned
(``pending``, up to DRAIN_MAX mean times): oversubscribed, their slowest take several
times their mean; and it begins only once a merged run is one (``ready``). A way that
keeps losing is checked less and less often (the gap between checks doubles, up to
GAP_MAX epochs' worth of calls, or grows with how badly it lost; a switch counts as a
loss of the way left). Between checks nothing is recorded: the usual call costs a
dictionary lookup and a counter.

Pure bookkeeping: callers take the way without a lock (``way``), and the caller that ends
a phase turns it under its lock (``turn``); the clock is a parameter, so it is tested
with made-up arrivals and time.
"""
import itertools
import math
import time

DIRECT, MERGE = 'direct', 'merge'
OTHER = {DIRECT: MERGE, MERGE: DIRECT}

GAP_FIRST = 1        # epochs' worth of calls of the better way before the next check: a
                     # wrong first guess costs one epoch
GAP_MAX = 128        # the gap doubles each time the other way loses, up to this
# ... and is at least GAP_PER_LOSS x (its time / the best's time - 1) x the trial's calls
# (its drain's included), in epochs, up to GAP_LOSS_MAX: each of the trial's calls cost
# that fraction of a call more than the best way's would have, so a check and the gap after
# it spend at most 1 / GAP_PER_LOSS of their time on the check, however badly the other
# way lost. A trial's drain runs its way unmeasured (3 reference times: 10 to 30 calls at
# 8 callers), so a trial is charged its calls, the drain's included, an epoch's at least
# (a trial cut early is judged on a few arrivals; merging Dense(64)x2 at 4 threads
# measured 10 ms a call against 0.08 ms direct under load: a trial cut after two arrivals
# still cost about 10 ms, an estimated tenth of the time of GAP_MAX epochs of direct
# calls).
GAP_PER_LOSS = 32
GAP_LOSS_MAX = 4096
# A switch is a check the way left lost: it is checked again as after a lost trial (its
# reference epoch charged as the trial's calls), GAP_SWITCH_MAX epochs later at most: the
# switch rests on one epoch of each way, and one reference inflated by a spike of load
# would otherwise keep the slower way up to GAP_MAX epochs (8,000 calls at 16 threads).
# Checked again one epoch after a switch, the way left cost a cold 1,000-call run of
# Dense(2048)x2 on 16 threads 10-30 ms, 5-14% of it: its trial lost at 2-7 times
# merging's time.
GAP_SWITCH_MAX = 16
MIN_CALLS = 32       # arrivals per epoch, at least (more for higher levels)
MAX_CALLS = 512
# A new level's first epoch, not measured (its callers are arriving), is this fraction of
# an epoch's calls: two calls of each caller at the level's most. A whole epoch kept a
# cold 1,000-call run of 16 threads direct 20-27 ms before its reference began.
WARM_UP = 0.5
DRAIN = 3.0          # after a switch, the epoch starts after this many mean times
# ... and a trial of merging, once the direct runs begun before the switch have returned
# (``pending``), up to this many: 16 oversubscribed one-row runs of Dense(2048)x2 took
# 10-57 ms where their mean time inside was 12.3 ms, and a trial begun 3 mean times
# (37 ms) after the switch was judged on their stragglers: lost at 89 ms a call, where
# merging ran at 4-8.
DRAIN_MAX = 20.0
# A trial's way is kept if its time is lower by this fraction: a reference is measured in
# its way's steady state, a trial just after a switch (direct runs oversubscribing the
# cores take longer than a trial lasts to reach their slowest: a trial saw 9.5 ms where
# the steady state is 20 ms), so close results stay with the way in use.
MARGIN = 0.1

# An epoch restarts when an arrival comes later than this after the one before (and than
# 8 of its mean intervals): a level that callers reach now and then is not measured
# across the time they spent at other levels (a trial ends, inconclusive).
SPARSE_S = 0.02

# Phases of a level: calls of the best way not measured; an epoch of it; a trial of the
# other way.
GAP, REFERENCE, TRIAL = 'gap', 'reference', 'trial'
_RESTART, _LOST = 'restart', 'lost'     # what a ticket asks of turn()


class Level(object):
    """One load level's measurements and choice."""
    __slots__ = ('key', 'current', 'best', 'best_time', 'gap', 'calls', 'checks',
                 'switches', 'times', 'epochs', 'resume', 'began', 'last', 'touched',
                 'guess', 'hold', 'hold_end')

    def __init__(self, key, slots, first):
        self.key = key
        self.calls = max(MIN_CALLS, min(MAX_CALLS, 4 * (slots << key)))  # per epoch
        self.best = first
        self.best_time = None
        self.gap = GAP_FIRST
        self.checks = 0
        self.switches = 0
        self.epochs = 0
        self.times = {DIRECT: None, MERGE: None}     # the last epoch's W of each way
        self.resume = None          # a lost trial's calls may be out until then
        self.began = 0.0            # the epoch's first counted arrival
        self.last = 0.0             # its last counted arrival
        self.touched = False        # a call arrived (cleared by whoever reads it)
        self.guess = False          # the model's guess is read at the warm-up's end
        self.hold = None            # a trial's drain lasts while this says calls are out
        self.hold_end = 0.0         # ... until then at most
        # (way, phase, arrivals, loads, start, end, drained): read by callers without a
        # lock, a new tuple for each phase. next() on a counter is atomic (each arrival
        # gets its own number), and so is list.append. ``start``: arrivals before it (a
        # switch's drain) are not measured, or None, and are counted in ``drained`` (a
        # trial's cost them too); ``end``: the arrival that ends the phase.
        self.current = None


class Policy(object):
    """Per model. ``slots``: runs in flight before callers may queue; ``prior(key)``:
    (the way a new level starts with when no level is measured yet, epochs before its
    first check): a guess from the model's run time, see concurrent_batcher."""

    def __init__(self, slots, prior, clock=time.perf_counter, pending=None, ready=None):
        self.slots = slots
        self.prior = prior
        self.clock = clock
        # ready(), asked as a trial of merging would begin: False while a merged run
        # would not be one (TF's multi-row kernels still being made: merged calls run
        # alone meanwhile, see engine/merge.py). The reference is measured again
        # instead: a fresh process's first trial, judged on calls run alone in a queue
        # beside the kernels' making, lost 3 times in 3 (25-71 ms a call against 4-5
        # direct) and kept 16 threads direct for the rest of the run.
        self.ready = ready
        # pending(way), called (under the caller's lock) as a trial begins after the
        # reference of ``way``: None, or a test that is true while the calls made that
        # way before the switch are still out (the trial's drain then lasts while it is).
        self.pending = pending
        self.levels = {}

    def level(self, callers):
        """The load level of ``callers`` inside at once (above the slots: 1, 2, 3...)."""
        return ((callers - 1) // self.slots).bit_length()

    def way(self, key, callers):
        """(way, ticket) for a call arriving at level ``key`` with ``callers`` inside (it
        included). A ticket (not None): this call ends a phase; pass it to ``turn``."""
        level = self.levels.get(key)
        if level is None:
            level = self._open(key)
        level.touched = True
        way, phase, arrivals, loads, start, end, drained = current = level.current
        if phase is GAP:            # (the usual call)
            if next(arrivals) != end:
                return way, None
            return way, (key, current, None)
        now = self.clock()
        if start is not None and (now < start or (level.hold is not None and self._held(
                level, now))):
            next(drained)
            return way, None        # the other way's calls may still be out
        i = next(arrivals)
        if i < end:
            loads.append(callers)
            if not i:
                level.began = now           # (the one arrival numbered 0 writes it)
            elif now - level.last > max(SPARSE_S, 8 * (now - level.began) / i):
                # Arrivals this sparse are not this level's steady state: the time
                # between them went to other levels (or to nobody).
                return way, (key, current, _RESTART)
            level.last = now
            if phase is TRIAL and (i < 16 or not i % 4) and self._losing(level, loads):
                return way, (key, current, _LOST)
            return way, None
        return way, ((key, current, None) if i == end else None)

    def _held(self, level, now):
        # (A trial's drain, past its DRAIN mean times.) Once the calls made the other
        # way are back, or DRAIN_MAX has passed, it is over for good.
        hold = level.hold
        if hold is not None and now < level.hold_end and hold():
            return True
        if level.hold is hold:      # (not a later trial's, set meanwhile)
            level.hold = None
        return False

    def _losing(self, level, loads):
        # A trial whose mean time so far is well above the reference's will not win: it
        # ends at once. Merging a model as fast as a thread hand-off measured 20 to 100
        # times slower (a woken caller waits for the GIL, up to a switch interval each):
        # its arrivals then come slowly, so it is judged from its second arrival, against
        # a bar that comes down as arrivals add up: 10 times the reference at 2, 4 at 8,
        # 2.5 at 32.
        n = len(loads)
        if n < 2:
            return False
        elapsed = self.clock() - level.began      # (n - 1 intervals between n arrivals)
        return sum(loads) * elapsed > 2.0 * (1 + 8.0 / n) * level.best_time * n * (n - 1)

    def turn(self, ticket):
        """End the phase ``ticket`` names, unless it ended already. Call under a lock."""
        key, current, what = ticket
        level = self.levels[key]
        if level.current is not current:
            return
        way, phase, arrivals, loads, _, _, drained = current
        if phase is GAP:
            if level.guess:
                # The warm-up ran direct (as concurrent=False does); now that the model
                # has run a while, its guess is worth reading.
                level.guess = False
                level.best, wait = self.prior(level.key)
                if wait:
                    self._begin(level, GAP, level.best, None, wait * level.calls)
                    return
            self._begin(level, REFERENCE, level.best, level.resume)
            return
        if what is _RESTART:
            if phase is TRIAL:
                # Inconclusive: back to the best way, checked again after the same gap.
                self._begin(level, GAP, level.best, None)
            else:
                self._begin(level, REFERENCE, way, None)
            return
        lost = what is _LOST
        # W = L / lambda: mean callers inside, over arrivals per second.
        n = len(loads)
        elapsed = max(self.clock() - level.began, 1e-9)
        w = sum(loads) * elapsed / (n * n) if n else float('inf')
        level.times[way] = w
        level.epochs += 1
        resume = self.clock() + DRAIN * w
        if phase is REFERENCE:
            level.best_time = w         # the latest: load changes over time
            if OTHER[way] is MERGE and self.ready is not None and not self.ready():
                self._begin(level, REFERENCE, way, None)
                return
            level.checks += 1
            # (Set before the trial is: callers read it without a lock.)
            level.hold = self.pending(way) if self.pending is not None else None
            level.hold_end = self.clock() + DRAIN_MAX * w
            self._begin(level, TRIAL, OTHER[way], resume)
            return
        if not lost and w < level.best_time * (1 - MARGIN):
            level.gap = max(GAP_FIRST, min(GAP_SWITCH_MAX, loss_gap(
                level.best_time / w, level.calls, level.calls)))
            level.best, level.best_time = way, w
            level.switches += 1
            level.resume = None
        else:
            # The trial's calls, its way's all: the drain's, those measured, the one that
            # ended it (a losing one is among those measured).
            ran = next(drained) + n + (0 if lost else 1)
            level.gap = max(min(2 * level.gap, GAP_MAX),
                            loss_gap(w / level.best_time, ran, level.calls))
            level.resume = resume       # back to the best way: its next epoch waits
        self._begin(level, GAP, level.best, None)

    def restart(self):
        """Begin again every epoch under way (counting stopped for a while: see
        concurrent_batcher's bypass). Call under a lock."""
        for level in list(self.levels.values()):
            way, phase = level.current[:2]
            if phase is REFERENCE:
                self._begin(level, REFERENCE, way, None)
            elif phase is TRIAL:
                self._begin(level, REFERENCE, level.best, None)

    def _open(self, key):
        # A new level starts the way its nearest measured neighbour goes (load levels
        # next to each other mostly agree, and callers cross between them). With none,
        # it starts direct, and takes the model's guess at the end of its warm-up:
        # the guess rests on the model's fastest run, and when a level first opens the
        # model may have run once or twice, cold.
        known = [k for k, level in list(self.levels.items()) if level.epochs]
        first = (self.levels[min(known, key=lambda k: (abs(k - key), -k))].best
                 if known else DIRECT)
        level = self.levels.setdefault(key, Level(key, self.slots, first))
        if level.current is None:
            # A load level's warm-up is not measured: its callers have just arrived
            # (threads starting, first runs of new batch sizes), and a reference taken
            # then (4 ms where the steady state is 0.3 ms) lets any trial win.
            level.guess = not known
            self._begin(level, GAP, level.best, None, int(WARM_UP * level.calls))
        return level

    def _begin(self, level, phase, way, start, end=None):
        if phase is not TRIAL:
            level.hold = None           # (a trial's: set just before it begins)
        now = self.clock()
        if start is not None and start <= now:
            start = None
        level.began = level.last = now     # (the epoch's first arrival sets them again)
        if end is None:
            end = level.gap * level.calls if phase is GAP else level.calls
        level.current = (way, phase, itertools.count(), [], start, end, itertools.count())

    def describe(self):
        """Per level: callers, way in use, the last epoch's mean time inside of each way
        (ms), checks and switches so far."""
        out = []
        for key in sorted(self.levels):
            level = self.levels[key]
            low = self.slots * (1 << (key - 1)) + 1 if key else 1
            out.append({
                'callers': '%d-%d' % (low, self.slots << key),
                'way': level.best,
                'direct_ms': _ms(level.times[DIRECT]),
                'merge_ms': _ms(level.times[MERGE]),
                'epochs': level.epochs,
                'checks': level.checks,
                'switches': level.switches,
            })
        return out


def loss_gap(ratio, ran, calls):
    """Epochs (of ``calls`` calls) of the best way after a trial of ``ran`` calls that took
    ``ratio`` times the best way's mean time, so that the trial cost at most
    1 / GAP_PER_LOSS of the gap's time (an epoch's calls charged at least), up to
    GAP_LOSS_MAX."""
    gap = GAP_PER_LOSS * (ratio - 1) * max(ran, calls) / calls
    return GAP_LOSS_MAX if gap >= GAP_LOSS_MAX else int(math.ceil(gap))


def _ms(seconds):
    return None if seconds is None else round(1e3 * seconds, 4)
