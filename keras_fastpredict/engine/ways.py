"""Where a graph's session runs go: TF's inter-op pool, or the caller's thread.

Plain TF runs a callable on the session's inter-op pool, which costs a thread hand-off a
run (20-50 us measured here); a callable made with ``inter_op_thread_pool = -1`` runs in
the caller's thread, without it, but cannot run independent ops side by side. Small
graphs are faster inline (Dense(64)x2: 10 us a row against 36-50), some large ones on the
pool (MobileNet 128x128: 10.5 ms a row against 12.5; Keras' BatchNormalization runs its
training branch beside the other). Each way needs a callable of its own, as costly to
make as plain Keras' (4 ms for Dense(64)x2, 150-170 ms for MobileNet), so one is made
first (plain's way, the pool, unless the owner knows better: a graph whose row is
statically tiny, ``engine.work``; an inference graph whose model's own graph settled
inline) and the other only once the runs so far could have saved what it costs (rent, then buy): the most
a run gains inline is the hand-off, on the pool a share of the run less the hand-off
(``saving_bound``). With both made, each run size (about a power of two) alternates them
for a few runs and keeps the faster.
"""
import os
import threading
import time

POOL, INLINE = 0, 1
NAMES = ('pool', 'inline')
# TF's inter-op pool hands a run to its threads: 20-50 us measured here (Dense(64)x2: 15 us
# a run inline, 53 on the pool).
POOL_HANDOFF_S = 50e-6
CORES = os.cpu_count() or 1
# Parallel ops save at most (1 - 1/cores) of a run: a run faster than this cannot gain
# from the pool.
POOL_MIN_RUN_S = POOL_HANDOFF_S * CORES / max(1, CORES - 1) if CORES > 1 else float('inf')
CALIBRATION_RUNS = 3


def saving_bound(way, run_s):
    """The most that ``way`` could have saved on a run that took ``run_s`` the other way."""
    if way == INLINE:
        return min(POOL_HANDOFF_S, run_s)
    if run_s <= POOL_MIN_RUN_S:
        return 0.0
    return run_s * (1.0 - 1.0 / CORES) - POOL_HANDOFF_S


class Ways(object):
    """One graph's callables on one session, each made once it may pay, and the way each
    run size takes. ``make(way)``: a new callable (an object with ``_handle``, or the raw
    handle) for that way; ``paid(name, seconds)``: told
    what each cost (name 'callable' for the first)."""

    def __init__(self, make, paid=None, first=POOL):
        from tensorflow.python import pywrap_tensorflow
        self._tf_run = pywrap_tensorflow.TF_SessionRunCallable
        self._make, self._paid = make, paid
        self._lock = threading.Lock()
        self.first = first
        self.fns = [None, None]         # per way: the callable (kept alive) ...
        self.handles = [None, None]     # ... and its handle, set once made
        # bucket (log2 rows) -> the way settled on (an int), or per way [runs timed,
        # fastest] (a count, not a list: it would grow with every run until a purchase).
        self.choice = {}
        self.rent_s = 0.0               # what the other way could have saved so far
        self.fastest_run_s = float('inf')
        self.make_s = self._made(first, 'callable')

    def _made(self, way, name=None, wait=True):
        """Make ``way``'s callable unless it is made; its cost in seconds (0.0: made
        already). ``wait=False``: None at once if another thread is making one."""
        if not self._lock.acquire(wait):
            return None
        try:
            if self.handles[way] is not None:
                return 0.0
            start = time.perf_counter()
            fn = self._make(way)
            seconds = time.perf_counter() - start
            self.fns[way] = fn
            self.handles[way] = getattr(fn, '_handle', fn)
        finally:
            self._lock.release()
        if self._paid is not None:
            self._paid(name or NAMES[way] + ' callable', seconds)
        return seconds

    def has(self, way):
        return self.handles[way] is not None

    def run(self, session, arrays, pool=False):
        """One run of ``arrays`` on ``session`` (the raw handle); ``pool``: on TF's pool
        (a call made while others run), else the way this size runs faster."""
        if pool:
            return self.run_on(POOL, session, arrays)
        try:        # (_bucket, inlined: every fast call comes here)
            way = self.choice.get(arrays[0].shape[0].bit_length())
        except IndexError:          # no feed, or a 0-d one (a Session.run)
            way = self.choice.get(-1)
        if way.__class__ is not int:
            return self._calibrate(session, arrays)
        return self._tf_run(session, self.handles[way], arrays, None)

    def run_on(self, way, session, arrays):
        """One run on ``way`` (its callable made if it is not yet)."""
        if self.handles[way] is None:
            self._made(way)
        return self._tf_run(session, self.handles[way], arrays, None)

    def way_for(self, arrays):
        """The way a run of ``arrays`` takes now, without trying the other."""
        way = self.choice.get(_bucket(arrays))
        return way if way.__class__ is int else self.first

    def preferred(self):
        """The way settled on where only one was, else the first."""
        pool, inline = bool(self.settled(POOL)), bool(self.settled(INLINE))
        if pool != inline:
            return POOL if pool else INLINE
        return self.first

    def settled(self, way):
        """The sizes settled on ``way``."""
        # (Copied at once: another thread may add a size meanwhile.)
        return [b for b, w in list(self.choice.items()) if w.__class__ is int and w == way]

    def _calibrate(self, session, arrays):
        bucket = _bucket(arrays)
        times = self.choice.get(bucket)
        if times is None:
            times = self.choice.setdefault(bucket, _open())
        if times.__class__ is int:       # settled by another thread meanwhile
            return self._tf_run(session, self.handles[times], arrays, None)
        first = self.first
        other = 1 - first
        both = self.handles[other] is not None
        if both:    # alternate, the one with fewer runs timed first
            way = other if times[other][0] <= times[first][0] else first
        else:
            way = first
        start = time.perf_counter()
        out = self._tf_run(session, self.handles[way], arrays, None)
        elapsed = time.perf_counter() - start
        if elapsed < self.fastest_run_s:
            self.fastest_run_s = elapsed
        timed = times[way]
        timed[0] += 1
        if elapsed < timed[1]:
            timed[1] = elapsed
        if both:
            pool, inline = times
            if pool[0] >= CALIBRATION_RUNS and inline[0] >= CALIBRATION_RUNS:
                self.choice[bucket] = POOL if pool[1] < inline[1] else INLINE
            return out
        if timed[0] >= CALIBRATION_RUNS and not saving_bound(other, timed[1]):
            self.choice[bucket] = first   # too fast a run for the other way to gain
            return out
        bound = saving_bound(other, elapsed)
        if not bound:
            return out
        self.rent_s += bound
        # Never bought on a size's first run alone: it pays one-time work (TF's kernels for
        # that shape), so it can seem to owe anything (a first predict(X) of 3,000 rows of
        # Dense(64)x2: 58 ms, against 3 once warm; its pool callable, 12 ms, was bought
        # right after it, in a script whose only call that was).
        if self.rent_s >= self.make_s and timed[0] > 1:
            try:
                # Not waited for when another thread is buying it: callers of the model
                # in other threads (16 on Dense(2048)x2) would all stall for the
                # purchase, 7-15 ms; they run the way they have meanwhile.
                if self._made(other, wait=False) is None:
                    return out
            except Exception:       # (a session closed meanwhile): this run's result stands
                self.make_s = float('inf')
                return out
            # From now on each size still open tries both, its timings anew.
            for b, t in list(self.choice.items()):
                if t.__class__ is not int:
                    self.choice[b] = _open()
        return out


def _open():
    """A size's record while its way is open: per way, [runs timed, fastest]."""
    return ([0, float('inf')], [0, float('inf')])


def _bucket(arrays):
    """Runs of about the same size (log2 of the rows) share a choice; -1: no rows."""
    try:
        return arrays[0].shape[0].bit_length()
    except IndexError:
        return -1
