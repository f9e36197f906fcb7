"""The concurrent batcher: predict calls from many threads at once share session runs.

Semantics follow TF Serving's batching: when the model is idle a call runs at once in
its own thread (no waiting when there is nothing to wait for); calls that arrive while
runs are in flight queue up and form the next batch, taken by a worker thread
(``num_batch_threads`` at most in flight per model). ``batch_timeout_micros`` lets a
worker wait that long for a batch to fill; the queue is unbounded (as plain Keras never
refuses a call) unless the user sets ``max_enqueued_batches``: past that many batches of
queued rows a caller gets ``QueueFullError`` at once; a caller waits ``timeout`` seconds
at most. Stopping (unpatch, interpreter exit) never fails a call: what is queued, then
or later, is served. A Python batcher over the cached callable is used rather than TF's
``nondifferentiable_batch_function`` op: it adds no graph ops, fails only the callers
whose rows fail, honours per-call time-outs, and costs nothing when only one thread calls.
Queueing only pays where one run of one row costs more than a thread hand-off: models
faster than that (measured once per model) run each call directly instead.
"""
import atexit
import collections
import threading
import time
import weakref

from ..config import settings
from . import merge as engine
from . import warmup

_all = weakref.WeakSet()
_all_lock = threading.Lock()
_IDLE_EXIT_S = 5.0
_QUEUE_COST_S = 50e-6


class QueueFullError(RuntimeError):
    """The model's batch queue holds ``max_enqueued_batches`` batches already (only when
    the user set that bound)."""


class PredictTimeoutError(TimeoutError):
    """A queued predict call was not served within its time-out."""


class Batcher(object):
    def __init__(self, entry):
        self.entry_ref = weakref.ref(entry)
        self.stats = entry.stats
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.queue = collections.deque()
        self.queued_rows = 0
        self.running = 0
        self.workers = 0
        self.idle_workers = 0     # workers waiting for work: only they need a notify

        # Set by stop(): workers leave as soon as the queue is empty instead of idling.
        # Never a reason to fail a call: a stopped batcher still serves what comes.
        self.stopping = False
        with _all_lock:
            _all.add(self)

    def submit(self, entry, arrays, rows, batch_size):
        lock = self.lock
        with lock:
            idle = self.running < settings.num_batch_threads and not self.queue
            if idle:
                self.running += 1
        if idle:
            try:
                return entry.run(arrays, batch_size)
            finally:
                with lock:
                    self.running -= 1
                    if self.queue and self.idle_workers:
                        self.cond.notify()
        return self._enqueue(entry, arrays, rows)

    def _enqueue(self, entry, arrays, rows):
        warmup.start()          # merged runs of several rows need TF's multi-row kernels
        req = engine.Request(entry, arrays, rows)
        # A held lock as the "done" signal: cheaper than an Event; the worker releases it.
        req.event = threading.Lock()
        req.event.acquire()
        bound = settings.max_enqueued_batches
        with self.cond:
            if (bound is not None and self.queue
                    and self.queued_rows + rows > bound * settings.max_batch_size):
                self.stats.rejected += 1
                raise QueueFullError(
                    'keras_fastpredict: queue full for model %r: %d rows already wait '
                    '(max_enqueued_batches=%d x max_batch_size=%d)'
                    % (self.stats.name, self.queued_rows, settings.max_enqueued_batches,
                       settings.max_batch_size))
            req.enqueued = time.perf_counter()
            self.queue.append(req)
            self.queued_rows += rows
            if len(self.queue) > self.stats.max_queue_len:
                self.stats.max_queue_len = len(self.queue)
            if self.workers < settings.num_batch_threads:
                self.workers += 1
                threading.Thread(target=self._work, name='keras_fastpredict-batcher',
                                 daemon=True).start()
            elif self.idle_workers:
                self.cond.notify()
        timeout = settings.timeout
        if not req.event.acquire(True, -1 if timeout is None else timeout):
            with self.cond:
                if req in self.queue:
                    self.queue.remove(req)
                    self.queued_rows -= rows
                served = req.outputs is not None or req.error is not None
            if not served:
                self.stats.timeouts += 1
                raise PredictTimeoutError(
                    'keras_fastpredict: predict on model %r not served within %.3f s'
                    % (self.stats.name, timeout))
        if req.error is not None:
            raise req.error
        return req.outputs

    def _take(self):
        """Wait for work and a free run slot; return the next batch, or None when this
        worker exits: only with the queue empty (after idling a while, or at once when
        the batcher is stopped), so no queued call is ever left behind."""
        cond = self.cond
        with cond:
            deadline = time.monotonic() + _IDLE_EXIT_S
            while not self.queue or self.running >= settings.num_batch_threads:
                remaining = deadline - time.monotonic()
                if not self.queue and (self.stopping or remaining <= 0):
                    self.workers -= 1
                    cond.notify_all()          # stop_all() waits for workers to leave
                    return None
                self.idle_workers += 1
                try:
                    cond.wait(max(remaining, 0.05))
                finally:
                    self.idle_workers -= 1
            wait_s = settings.batch_timeout_micros / 1e6
            if wait_s > 0:
                end = time.monotonic() + wait_s
                while self.queued_rows < settings.max_batch_size and not self.stopping:
                    remaining = end - time.monotonic()
                    if remaining <= 0:
                        break
                    cond.wait(remaining)
            batch = []
            rows = 0
            while self.queue and (not batch or rows + self.queue[0].rows
                                  <= settings.max_batch_size):
                req = self.queue.popleft()
                rows += req.rows
                batch.append(req)
            self.queued_rows -= rows
            self.running += 1
        return batch

    def _work(self):
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._run(batch)
            finally:
                batch = None
                with self.cond:
                    self.running -= 1
                    self.cond.notify_all()

    def _run(self, batch):
        now = time.perf_counter()
        for req in batch:
            self.stats.queue_wait_s += now - req.enqueued
        self.stats.queued += len(batch)
        entry = self.entry_ref()
        try:
            if entry is None:
                raise RuntimeError('keras_fastpredict: model was freed')
            engine.run_requests(entry, batch)
        except Exception as exc:
            for req in batch:
                if req.outputs is None and req.error is None:
                    req.error = exc
        finally:
            with self.cond:
                for req in batch:
                    # Nothing of the model may stay referenced by an idle worker.
                    req.arrays = req.entry = None
                    req.event.release()

    def stop(self):
        with self.cond:
            self.stopping = True
            self.cond.notify_all()


def submit(entry, arrays, rows, batch_size):
    # Queueing costs each call some tens of microseconds of thread hand-offs: worth it
    # only where a run costs more (a large model), else calls run directly.
    if entry.fastest_run_s < _QUEUE_COST_S:
        return entry.run(arrays, batch_size)
    batcher = entry.batcher
    if batcher is None:
        batcher = entry.batcher = Batcher(entry)
    return batcher.submit(entry, arrays, rows, batch_size)


def stop_all(wait=2.0):
    """Stop every worker thread (unpatch, interpreter exit) once it has served what is
    queued, waiting ``wait`` seconds at most. No call is failed: one queued later is
    served by a worker that again leaves as soon as the queue is empty."""
    with _all_lock:
        batchers = list(_all)
    for batcher in batchers:
        batcher.stop()
    deadline = time.monotonic() + wait
    for batcher in batchers:
        with batcher.cond:
            batcher.cond.wait_for(lambda: not batcher.workers,
                                  max(0.0, deadline - time.monotonic()))


def worker_count():
    with _all_lock:
        return sum(b.workers for b in _all)


atexit.register(stop_all)
