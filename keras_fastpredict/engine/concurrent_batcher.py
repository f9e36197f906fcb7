"""The concurrent batcher: predict calls of one model from many threads at once.

A call that finds a free run slot and nobody waiting runs at once, in its own thread: no
hand-off, no lock, a few set operations. A model has as many run slots as the machine has
cores (``num_batch_threads``, read when the model's batcher is made): that many runs in
flight use the machine; more only compete for it. When all slots are busy, a call either
runs at once all the same, or queues, and which is faster is measured per model and load
level (``merge='auto'``, see ``engine/merge_policy.py``; ``merge=True`` always queues,
``False`` never). Queued calls are run as one batch by the next caller that finds a free
slot: a caller arriving to a queue when a slot is free leads at once, taking the queue
(its own call included); else, when a run ends, the first queued caller is woken and
leads. While the model merges, a caller finding a free slot and an empty queue, with
more callers inside than slots, does not run alone at once: it queues and leads a batch
that fills first (the callers just served are on their way back). The leader runs the
batch in its own thread and hands each caller its own rows (leader/follower: there is
no batch thread, so nothing to start, stop or leak, and a batch starts with at most one
hand-off). Batches are taken in arrival order, up to
``max_batch_size`` rows; ``batch_timeout_micros`` lets a leader wait that long from the
oldest queued call for a batch to fill (TF Serving's and Triton's queue delay). By
default (None) that wait is the model's fastest run: waiting costs at most the lone run
it saves (Dense(2048)x2 on 16 threads: 1.53x the throughput of no wait, paired; 0: no
wait; at most half of ``timeout`` when that is set). The wait ends early once every
caller inside the model is queued (more callers than slots inside): none is left to join
(Dense(2048)x2, 16 threads, merge=True: 1.18x the throughput of waiting it out, paired).
So a queued call's batch starts
within that wait plus one run of those in flight (while the queue holds at most
``max_batch_size`` rows per slot).

Each caller gets exactly its own rows, or its own exception: a merged run that fails is
retried one call at a time (engine/merge.py). A leader interrupted (KeyboardInterrupt...)
puts the calls it had taken back at the head of the queue. The queue is unbounded (as
plain Keras never refuses a call) unless ``max_enqueued_batches`` is set: past that many
batches of queued rows a caller gets ``QueueFullError`` at once; a queued caller waits
``timeout`` seconds at most. ``unpatch()`` and interpreter exit fail no call: callers
serve themselves. A Python batcher over the cached callable is used rather than TF's
``nondifferentiable_batch_function`` op: it adds no graph ops, fails only the callers
whose rows fail, honours per-call time-outs, and costs nothing when one thread calls.
"""
import collections
import itertools
import os
import threading
import time
import weakref

from ..config import settings
from . import merge as engine
from . import merge_policy, warmup
from .merge_policy import DIRECT, MERGE, TRIAL

_get_ident = threading.get_ident
_clock = time.perf_counter

# A first guess of one thread hand-off (waking a queued caller), refined per model by the
# wakes measured: a model whose fastest run is shorter has nothing to gain from merging.
_HANDOFF_S = 50e-6
# Epochs before a level's first check, after its warm-up epoch: a model slower than a
# hand-off is checked at once; a faster one as late as a way that lost badly.
_SLOW_MODEL_WAIT = 0
_FAST_MODEL_WAIT = merge_policy.GAP_MAX

# Bypass: while measurement says every call runs directly (see Batcher._review), calls
# skip the batcher's bookkeeping for a while: from BYPASS_FIRST_S of calls, doubling
# while it stays so, up to BYPASS_MAX_S (how late a change of load can be noticed). It is
# reviewed every REVIEW_CALLS calls made through the batcher.
# Batches a caller runs for others after its own call is served (its own return waits
# that many runs): the caller whose run ends starts the next batch with no hand-off.
_EXTRA_BATCHES = 1

_REVIEW_CALLS = 512
_REVIEW_MASK = _REVIEW_CALLS - 1
_BYPASS_FIRST_S = 0.05
_BYPASS_MAX_S = 1.0


_FILL_MAX_S = 0.05


def _fill_s(entry):
    """A leader's automatic wait for its batch to fill: the model's fastest run (a lone
    run would cost that much), at most _FILL_MAX_S; 0 while no run was timed."""
    fastest = entry.fastest_run_s if entry is not None else float('inf')
    return 0.0 if fastest == float('inf') else min(fastest, _FILL_MAX_S)


def cores():
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:          # (not Linux)
        return os.cpu_count() or 1


class QueueFullError(RuntimeError):
    """The model's batch queue holds ``max_enqueued_batches`` batches already (only when
    the user set that bound)."""


class PredictTimeoutError(TimeoutError):
    """A queued predict call was not served within its time-out."""


class Batcher(object):
    def __init__(self, entry):
        self.stats = entry.stats
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)   # a leader filling a batch waits here
        self.queue = collections.deque()
        self.queued_rows = 0
        # Thread idents: set operations are atomic, so the usual call takes no lock.
        self.inside = set()         # callers inside submit: the load level
        self.running = set()        # callers running a session run of this model
        self.waking = None          # the queued request woken (or about) to lead next
        self.filling = False        # a leader waits for its batch to fill
        # Some load level merges (or merge=True): a caller finding a free slot with more
        # callers inside than slots asks the policy instead of running alone at once.
        self.merging = settings.merge is True
        self.slots = settings.num_batch_threads or cores()
        self.handoff_s = _HANDOFF_S
        self.policy = merge_policy.Policy(self.slots, self._prior(entry),
                                          pending=self._pending, ready=warmup.ready)
        # Calls so far (next() is atomic), and the call number up to which calls bypass.
        self.calls = itertools.count()
        self.bypass_end = 0
        self.bypass_s = _BYPASS_FIRST_S
        self.reviewed = (_clock(), 0, 0)    # (time, call number, calls queued so far)

    def _prior(self, entry):
        # Every level starts direct, as concurrent=False runs: merging must be measured
        # faster first. A model whose runs cost more than waking a queued caller does is
        # checked after its warm-up epoch; one whose runs are faster has nothing to gain
        # from merging (a run saved costs a wake: merge trials of Dense(64)x2 measured 3
        # to 120 times slower, 10 ms a call under load) and is first checked GAP_MAX
        # epochs later. (A weak reference: the entry holds us.)
        entry_ref = weakref.ref(entry)

        def prior(key):
            # A woken caller waits for the GIL behind the others: at level ``key``, about
            # 2**key callers a slot (16 threads on 2 cores: wakes of 0.9-3.3 ms measured,
            # against 50 us with few threads). Compared with the bare hand-off, Dense(64)x2,
            # its fastest run timed at 90 us among 16 threads, was checked at once: its
            # merge trial cost a cold 2,000-call run 2.3x its time.
            entry = entry_ref()
            fastest = entry.fastest_run_s if entry is not None else float('inf')
            slow = fastest > self.handoff_s * (1 << key)
            if slow:
                # Its check comes next: merged runs need TF's multi-row kernels, made
                # meanwhile (a trial of merging waits for them, see merge_policy).
                warmup.start()
            return DIRECT, _SLOW_MODEL_WAIT if slow else _FAST_MODEL_WAIT
        return prior

    def _pending(self, way):
        """(Under self.lock, as a trial of merging begins after a reference epoch of
        ``way``.) A test true until each run in flight now has been seen returned: the
        direct runs begun before the switch, whose stragglers (16 oversubscribed runs:
        up to 4.6 times their mean) would be taken for the trial's slowness. A thread
        seen out of its run is not waited for again (it may lead a batch later: merged
        runs are the trial's own). None if nothing runs."""
        if way is not DIRECT:
            return None
        running = self.running
        before = set(running)
        if not before:
            return None

        def out():
            # (Each caller's arrival asks: an arriving caller is out of its last run.)
            before.intersection_update(running)
            return bool(before)
        return out

    def _review(self, i):
        """Every REVIEW_CALLS calls made through the batcher: if none of them queued and
        every load level they reached goes direct (and is not trying the other way), the
        next calls run directly with no bookkeeping at all, for ``bypass_s`` seconds' worth
        of calls at the rate just seen. A model that never has more callers than slots
        (one thread, two) or where merging never pays (a model as fast as a hand-off)
        then costs what concurrent=False costs."""
        with self.lock:
            now = _clock()
            then, first, queued = self.reviewed
            self.reviewed = (now, i, self.stats.queued)
            self.merging = settings.merge is True or any(
                MERGE in (level.best, level.current[0])
                for level in list(self.policy.levels.values()))
            settled = (not self.queue and queued == self.stats.queued
                       and settings.merge is not True)
            for level in list(self.policy.levels.values()):
                # (Levels no call reached since the last review do not count.)
                if level.touched:
                    level.touched = False
                    if level.best is not DIRECT or level.current[1] is TRIAL:
                        settled = False
            if not settled:
                self.bypass_s = _BYPASS_FIRST_S
                return
            self.policy.restart()       # no epoch is measured across a bypass
            rate = (i - first) / max(now - then, 1e-6)
            self.bypass_end = i + 1 + max(_REVIEW_CALLS, int(rate * self.bypass_s))
            self.bypass_s = min(2 * self.bypass_s, _BYPASS_MAX_S)

    # -- the call -------------------------------------------------------------------------

    def submit(self, entry, arrays, rows, batch_size, me):
        """A call that found every slot busy or calls waiting (see ``submit`` below)."""
        merge = settings.merge
        callers = len(self.inside)
        if callers <= self.slots:
            if not self.queue:
                # The calls in flight returned since submit() looked (a thread switch
                # between the looks): a free slot, nobody to lead, so run as the usual
                # call does. (Queueing here made merge=False queue.)
                return self._direct(entry, arrays, batch_size, me)
            way = MERGE                 # calls wait, a slot is free: lead them now
        elif merge == 'auto':
            # The load level: the callers inside, this one included, whichever way they
            # went (runs and queued calls alone would drop each time a batch is taken).
            policy = self.policy
            way, ticket = policy.way(((callers - 1) // policy.slots).bit_length(), callers)
            if ticket is not None:
                with self.lock:
                    policy.turn(ticket)
        else:
            way = MERGE if merge else DIRECT
        if way is DIRECT:
            return self._direct(entry, arrays, batch_size, me)
        self.merging = True
        return self._queued(entry, arrays, rows, batch_size, me)

    def _direct(self, entry, arrays, batch_size, me):
        running = self.running
        running.add(me)
        try:
            out = entry.run(arrays, batch_size)
        except BaseException:
            self._failed(me)
            raise
        running.discard(me)
        # (After the discard: a caller queueing meanwhile either saw the slot free and
        # leads, or queued before this look and is served from here.)
        if self.queue:
            self._lead(None, me)
        return out

    def _failed(self, me):
        self.running.discard(me)
        if self.queue:
            with self.lock:
                self._wake_leader()

    def _queued(self, entry, arrays, rows, batch_size, me):
        warmup.start()          # merged runs of several rows need TF's multi-row kernels
        req = engine.Request(entry, arrays, rows)
        req.batch_size = batch_size
        # A held lock as the wake-up signal: cheaper than an Event. It is released, under
        # self.lock, once per signal: when this call is served, or chosen to lead.
        req.event = threading.Lock()
        req.event.acquire()
        bound = settings.max_enqueued_batches
        with self.lock:
            # (A batch a leader is filling is as good as taken: with no wait it would be
            # out of the queue already; it does not count against the bound.)
            if (bound is not None and self.queue
                    and self.queued_rows + rows
                    > (bound + self.filling) * settings.max_batch_size):
                self.stats.rejected += 1
                raise QueueFullError(
                    'keras_fastpredict: queue full for model %r: %d rows already wait '
                    '(max_enqueued_batches=%d x max_batch_size=%d)'
                    % (self.stats.name, self.queued_rows, settings.max_enqueued_batches,
                       settings.max_batch_size))
            req.enqueued = _clock()
            self.queue.append(req)
            self.queued_rows += rows
            if len(self.queue) > self.stats.max_queue_len:
                self.stats.max_queue_len = len(self.queue)
            if self.filling:
                if (self.queued_rows >= settings.max_batch_size
                        or len(self.queue) >= len(self.inside)):
                    # (Full, or every caller inside waits here: else the leader sleeps
                    # out its wait.)
                    self.cond.notify()
            elif self.waking is None and len(self.running) < self.slots:
                self.waking = req           # a free slot: lead now, nobody to wake
                req.lead = True
        timeout = settings.timeout
        deadline = None if timeout is None else req.enqueued + timeout
        try:
            while True:
                if req.lead:
                    self._lead(req, me)
                if req.outputs is not None or req.error is not None:
                    break
                self._wait(req, deadline)
        except BaseException:
            self._abandon(req)
            raise
        if req.error is not None:
            raise req.error
        return req.outputs

    def _abandon(self, req):
        """This caller leaves (timed out, interrupted while waiting or leading): its call
        leaves the queue, and if it was chosen to lead, another caller is."""
        with self.lock:
            if req in self.queue:
                self.queue.remove(req)
                self.queued_rows -= req.rows
            if self.waking is req:
                self.waking = None
            self._wake_leader()

    def _wait(self, req, deadline):
        """Until ``req`` is served or chosen to lead; PredictTimeoutError past
        ``deadline``."""
        if deadline is None:
            req.event.acquire()
        elif not req.event.acquire(True, max(0.0, deadline - _clock())):
            with self.lock:
                if (not req.lead and req.outputs is None and req.error is None
                        and req in self.queue):
                    self.stats.timeouts += 1
                    raise PredictTimeoutError(
                        'keras_fastpredict: predict on model %r not served within %.3f s'
                        % (self.stats.name, settings.timeout))
            # Signalled meanwhile (released already), or taken by a leader, running now:
            # served within one run (counted as no time-out: the call is not given up).
            # Waited for outside the lock: the leader takes it to hand the rows over.
            req.event.acquire()
        if req.released:
            # One hand-off measured: a level's first guess compares runs with it.
            self.handoff_s += 0.1 * (_clock() - req.released - self.handoff_s)

    # -- leading a batch ------------------------------------------------------------------

    def _wake_leader(self):
        """(Under self.lock.) Wake the first queued caller to lead the next batch, unless
        one is being woken already or a leader is gathering its batch."""
        if self.waking is None and not self.filling and self.queue:
            req = self.waking = self.queue[0]
            req.lead = True
            req.released = _clock()
            req.event.release()

    def _lead(self, own, me):
        """Run batches from the head of the queue in this thread: until its own call
        (``own``; None: a caller whose own run is done) is served, then one more if calls
        wait. The caller whose run ends holds a slot and the GIL: it starts the next batch
        at once, where waking another caller for it costs a hand-off and a wait for the
        GIL behind the callers just served. Its own return waits one run at most (and the
        wait for that batch to fill)."""
        cond = self.cond
        with cond:
            if own is not None:
                own.lead = False
            elif self.waking is not None or self.filling or not self.queue:
                return                      # (a direct run's end: a leader is coming)
            batch = self._next_batch(me)
            if batch is None:
                return
        extra = _EXTRA_BATCHES if own is not None else _EXTRA_BATCHES - 1
        while True:
            try:
                self._run(batch)
            except BaseException:
                # Interrupted (KeyboardInterrupt, SystemExit): the calls not served go
                # back to the head of the queue for the next leader; only this caller
                # sees it.
                with cond:
                    for req in reversed(batch):
                        if req is not own and req.outputs is None and req.error is None:
                            self.queue.appendleft(req)
                            self.queued_rows += req.rows
                    self.running.discard(me)
                    self._wake_leader()
                raise
            with cond:
                now = _clock()
                for req in batch:
                    req.arrays = req.entry = None   # nothing of the model stays referenced
                    if req is not own:
                        req.released = now
                        req.event.release()
                pending = own is not None and own.outputs is None and own.error is None
                if (self.queue and self.waking is None and not self.filling
                        and (pending or extra)):
                    if not pending:
                        extra -= 1
                    batch = self._next_batch(me)
                    if batch is not None:
                        continue
                self.running.discard(me)
                self._wake_leader()
                return

    def _next_batch(self, me):
        """(Under self.lock.) Gather (``batch_timeout_micros``) and take the next batch
        for this caller to run (None: the queue emptied while it gathered); wake another
        leader if a slot is still free."""
        timeout = settings.batch_timeout_micros
        if timeout is None:
            wait_s = _fill_s(self.queue[0].entry)
            if settings.timeout is not None:
                # The automatic wait leaves the queued callers half their time-out: none
                # gives up for a wait it did not ask for while a slot is free.
                wait_s = min(wait_s, settings.timeout / 2)
        else:
            wait_s = timeout / 1e6
        self.waking = None
        if wait_s > 0 and self.queued_rows < settings.max_batch_size:
            try:
                self._fill(self.queue[0].enqueued + wait_s)
            except BaseException:
                # Interrupted: this caller holds no slot; the calls waiting get a leader.
                self.running.discard(me)
                self._wake_leader()
                raise
            if not self.queue:
                return None                 # (every queued caller gave up meanwhile)
        batch = self._take()
        self.running.add(me)
        if self.queue and len(self.running) < self.slots:
            self._wake_leader()             # another free slot: its own leader
        return batch

    def _fill(self, end):
        """(Under self.lock.) Wait until ``end``, or until max_batch_size rows queue, or
        until every caller inside the model waits in the queue while more callers than
        slots are inside: none of them is left to join, and nothing of this model runs
        meanwhile (16 threads on Dense(2048)x2: the wait ended about 150 us to 1 ms
        after the last caller had queued)."""
        self.filling = True
        queue, inside, slots = self.queue, self.inside, self.slots
        try:
            while self.queued_rows < settings.max_batch_size:
                if len(queue) >= len(inside) > slots:
                    break
                remaining = end - _clock()
                if remaining <= 0:
                    break
                self.cond.wait(remaining)
        finally:
            self.filling = False

    def _take(self):
        """(Under self.lock.) The next batch: queued calls in arrival order, up to
        max_batch_size rows (one call at least)."""
        queue = self.queue
        limit = settings.max_batch_size
        batch = [queue.popleft()]
        rows = batch[0].rows
        while queue and rows + queue[0].rows <= limit:
            req = queue.popleft()
            rows += req.rows
            batch.append(req)
        self.queued_rows -= rows
        now = _clock()
        stats = self.stats
        for req in batch:
            stats.queue_wait_s += now - req.enqueued
        stats.queued += len(batch)
        return batch

    def _run(self, batch):
        entry = batch[0].entry
        if len(batch) == 1:
            # One call: run exactly as it would have run directly.
            req = batch[0]
            try:
                req.outputs = entry.run(req.arrays, req.batch_size)
            except Exception as exc:
                req.error = exc
            return
        try:
            engine.run_requests(entry, batch)
        except Exception as exc:    # (not a run's failure: those are each caller's own)
            for req in batch:
                if req.outputs is None and req.error is None:
                    req.error = exc


def submit(entry, arrays, rows, batch_size, i=None):
    """Run one call of ``entry``'s model from any thread; returns its outputs. ``i``: the
    call's number, taken already by a caller that checked the bypass (engine.route)."""
    batcher = entry.batcher
    if batcher is None:
        batcher = _made(entry)
    if i is None:
        i = next(batcher.calls)
        if i < batcher.bypass_end:
            return entry.run(arrays, batch_size)    # settled: see Batcher._review
    if not i & _REVIEW_MASK and i:
        batcher._review(i)
    running = batcher.running
    inside = batcher.inside
    me = _get_ident()
    inside.add(me)
    try:
        if (len(running) < batcher.slots and not batcher.queue
                and (not batcher.merging or len(inside) <= batcher.slots)):
            # A free slot, nobody waiting: run at once. The usual call: set operations,
            # no lock, one frame (this is Batcher._direct, inlined).
            running.add(me)
            try:
                out = entry.run(arrays, batch_size)
            except BaseException:
                batcher._failed(me)
                raise
            running.discard(me)
            if batcher.queue:
                batcher._lead(None, me)
            return out
        return batcher.submit(entry, arrays, rows, batch_size, me)
    finally:
        inside.discard(me)


_making = threading.Lock()


def _made(entry):
    """The entry's batcher, made once: the first calls of a server's first burst arrive
    together, and callers of two batchers would not see each other."""
    with _making:
        if entry.batcher is None:
            entry.batcher = Batcher(entry)
        return entry.batcher


def describe(entry):
    """The merge policy's state for a model's entry (levels, ways, measured means), or
    None before its first concurrent call."""
    batcher = entry.batcher
    if batcher is None:
        return None
    return {'slots': batcher.slots, 'handoff_ms': round(1e3 * batcher.handoff_s, 4),
            'levels': batcher.policy.describe()}


def stop_all(wait=2.0):
    """Nothing to stop: queued calls are led by their own callers, so no thread of ours
    outlives a call (unpatch() calls this; kept for it)."""
