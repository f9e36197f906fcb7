"""Many threads, one model: calls run at once or are merged into batches led by a caller,
and each caller gets its own rows or its own error."""
import concurrent.futures
import gc
import threading
import time
import weakref

import numpy as np
import pytest
import tensorflow as tf
import keras
from keras import layers

import keras_fastpredict as kfp
from keras_fastpredict import counters
from keras_fastpredict.engine import concurrent_batcher
from keras_fastpredict.adapters import keras as keras_adapter
from keras_fastpredict.config import settings
from keras_fastpredict.engine import merge_policy, warmup
from conftest import assert_same, raised, unpatched_predict


@pytest.fixture
def always_queue():
    """One run slot, and calls queue whenever it is busy (merge=True), however fast the
    model: these tests are about the queue, not about when measurement chooses it."""
    settings.update(merge=True, num_batch_threads=1)


def gated_model(gate, fail_negative=False):
    """A model whose run waits for ``gate`` (so calls can be made to queue up) and, if
    asked, fails for any batch holding a negative input (a failure tied to one caller).
    ``gate.entered`` is set once a run is waiting at the gate."""
    gate.entered = threading.Event()

    def step(t):
        gate.entered.set()
        gate.wait(30)
        if fail_negative and (t < 0).any():
            raise ValueError('negative input')
        return t

    inp = layers.Input((4,))
    # stateful=False: a stateful op would make the model unbatchable (its results could
    # depend on how many runs are made); this one's result is its input.
    gated = layers.Lambda(lambda t: tf.reshape(
        tf.py_func(step, [t], tf.float32, stateful=False), [-1, 4]))(inp)
    return keras.models.Model(inp, layers.Dense(3)(gated))


def run_threads(n, target):
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def warm_up(model, gate):
    """Make the model's fast path with the gate open (making it runs the model), then
    close the gate. Call when patched."""
    gate.set()
    model.predict(np.zeros((1, 4), 'float32'))
    gate.clear()
    gate.entered.clear()


def hold_then_queue(model, gate, work, n, queued):
    """work(0) runs and holds the model at the gate; work(1..n-1) start and ``queued`` of
    them wait in the batcher's queue; then the gate opens and all finish."""
    warm_up(model, gate)
    first = run_threads(1, work)
    assert gate.entered.wait(30)
    rest = [threading.Thread(target=work, args=(i,)) for i in range(1, n)]
    for t in rest:
        t.start()
    wait_queued(keras_adapter.lookup(model).batcher, queued)
    gate.set()
    join(first + rest)


def wait_queued(batcher, n):
    # Nothing signals a call joining the queue (no waiter needs it): poll.
    deadline = time.monotonic() + 30
    while len(batcher.queue) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(batcher.queue) == n


def join(threads):
    for t in threads:
        t.join(60)
        assert not t.is_alive()


def test_sixteen_threads_get_their_own_rows():
    model = keras.models.Sequential([layers.Dense(32, activation='relu', input_shape=(8,)),
                                     layers.Dense(5)])
    n_threads, calls = 16, 200
    # Tag each caller's rows: thread t's inputs all start with t.
    x = np.random.RandomState(0).rand(n_threads, calls, 8).astype('float32')
    x[:, :, 0] = np.arange(n_threads)[:, None]
    expected = [unpatched_predict(model, x[t]) for t in range(n_threads)]
    got = {}
    errors = []

    def work(t):
        try:
            got[t] = [model.predict(x[t, i:i + 1].copy()) for i in range(calls)]
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    with kfp.patched(readahead=False):
        join(run_threads(n_threads, work))
    assert not errors
    for t in range(n_threads):
        assert_same(np.concatenate(got[t]), expected[t])
    s = kfp.stats(model)
    assert s['fast_calls'] == n_threads * calls


def test_concurrent_calls_form_batches_and_bad_input_fails_alone(always_queue):
    gate = threading.Event()
    model = gated_model(gate)
    x = np.random.RandomState(0).rand(9, 4).astype('float32')
    gate.set()
    expected = unpatched_predict(model, x, batch_size=1)
    gate.clear()
    results, failures = {}, {}

    def work(i):
        try:
            arg = np.zeros((1, 5), 'float32') if i == 8 else x[i:i + 1].copy()
            results[i] = model.predict(arg)
        except Exception as exc:  # noqa: BLE001
            failures[i] = exc

    with kfp.patched(readahead=False, verify=False):
        hold_then_queue(model, gate, work, 9, queued=7)     # the bad input never queues
    assert list(failures) == [8]
    # Exactly plain Keras' exception, in that caller only.
    plain = raised(unpatched_predict, model, np.zeros((1, 5), 'float32'))
    assert (type(failures[8]), str(failures[8])) == plain
    for i in range(8):
        assert_same(results[i], expected[i:i + 1])
    s = kfp.stats(model)
    assert s['batch_size_histogram'].get(8, 0) == 1     # the 7 queued calls ran together
    assert s['max_queue_len'] == 7


def test_failed_batch_is_retried_so_only_the_culprit_fails(always_queue):
    gate = threading.Event()
    model = gated_model(gate, fail_negative=True)
    x = np.random.RandomState(1).rand(6, 4).astype('float32')
    x[3] = -1.0
    results, failures = {}, {}

    def work(i):
        try:
            results[i] = model.predict(x[i:i + 1].copy())
        except Exception as exc:  # noqa: BLE001
            failures[i] = exc

    gate.set()
    expected = unpatched_predict(model, np.concatenate([x[:3], x[4:]]), batch_size=1)
    plain = raised(unpatched_predict, model, x[3:4].copy())
    gate.clear()
    with kfp.patched(readahead=False, verify=False):
        hold_then_queue(model, gate, work, 6, queued=5)
        assert list(failures) == [3]
        assert 'negative input' in str(failures[3])
        assert (type(failures[3]), str(failures[3])) == plain
        # The batcher keeps serving after a failure.
        assert_same(model.predict(x[:1].copy()), unpatched_predict(model, x[:1]))
    assert sorted(results) == [0, 1, 2, 4, 5]
    for got, i in zip(expected, [0, 1, 2, 4, 5]):
        assert_same(results[i], got[None])


def test_queue_full_and_timeout(always_queue):
    gate = threading.Event()
    model = gated_model(gate)
    x = np.ones((1, 4), 'float32')
    outcome = {}

    def call(key):
        try:
            outcome[key] = model.predict(x.copy())
        except Exception as exc:  # noqa: BLE001
            outcome[key] = exc

    with kfp.patched(readahead=False, verify=False, max_batch_size=1,
                     max_enqueued_batches=1, timeout=2.0):
        warm_up(model, gate)
        holder = threading.Thread(target=call, args=('holder',))
        holder.start()
        assert gate.entered.wait(30)
        queued = threading.Thread(target=call, args=('queued',))
        queued.start()
        batcher = keras_adapter.lookup(model).batcher
        while not batcher.queue:
            time.sleep(0.005)
        started = time.monotonic()
        with pytest.raises(kfp.QueueFullError, match='queue full'):
            model.predict(x.copy())
        assert time.monotonic() - started < 1.0       # at once, not after the time-out
        queued.join(10)
        assert isinstance(outcome['queued'], kfp.PredictTimeoutError)
        gate.set()
        holder.join(5)
    assert isinstance(outcome['holder'], np.ndarray)
    s = kfp.stats(model)
    assert s['rejected'] == 1 and s['timeouts'] == 1


def test_no_thread_of_ours_outlives_the_calls(always_queue):
    # Leaders are callers: no batch thread is started, so none can be left behind.
    model = keras.models.Sequential([layers.Dense(4, input_shape=(4,))])
    x = np.random.RandomState(0).rand(64, 4).astype('float32')
    baseline = set(threading.enumerate())
    for _ in range(3):
        settings.update(merge=True, num_batch_threads=1)
        with kfp.patched(readahead=False):
            join(run_threads(8, lambda t: [model.predict(x[i:i + 1].copy())
                                           for i in range(50)]))
        assert set(threading.enumerate()) == baseline


def test_stateful_model_calls_are_never_merged():
    model = keras.models.Sequential([
        layers.SimpleRNN(3, stateful=True, batch_input_shape=(1, 2, 2))])
    x = np.ones((1, 2, 2), 'float32')
    errors = []

    def work(t):
        try:
            [model.predict(x) for _ in range(5)]
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    with kfp.patched():
        join(run_threads(4, work))        # plain Keras would fail in these threads
    assert not errors
    s = kfp.stats(model)
    # On the fast path (issue 10), one call per run, never queued or merged.
    assert s['fast_calls'] == 20 and s['fallbacks'] == 0
    assert s['batches'] == 0 and s['queued'] == 0


def test_nothing_keeps_a_dropped_model_after_merged_calls(always_queue):
    gate = threading.Event()
    model = gated_model(gate)
    x = np.random.RandomState(0).rand(4, 4).astype('float32')
    held = [model]

    def work(i):
        held[0].predict(x[i:i + 1].copy())

    with kfp.patched(readahead=False, verify=False):
        hold_then_queue(model, gate, work, 4, queued=3)
        assert kfp.stats(model)['batches'] == 1        # the 3 queued calls ran together
        refs = [weakref.ref(model), weakref.ref(keras_adapter.lookup(model))]
        del model, held[:]
        gc.collect()
        assert [r() for r in refs] == [None, None]


def wait_for(cond, predicate):
    """Wait until ``predicate()`` holds; whoever changes it notifies ``cond``."""
    with cond:
        assert cond.wait_for(predicate, 30)


def test_unpatch_serves_queued_calls(always_queue):
    # Issue 10: unpatch() while calls wait in the queue; they must run, not fail, and so
    # must calls that arrive at the same model afterwards (they go to plain Keras).
    gate = threading.Event()
    model = gated_model(gate)
    x = np.random.RandomState(0).rand(8, 4).astype('float32')
    gate.set()
    expected = unpatched_predict(model, x, batch_size=1)
    gate.clear()
    results, failures = {}, {}

    def work(i):
        try:
            results[i] = model.predict(x[i:i + 1].copy())
        except Exception as exc:  # noqa: BLE001
            failures[i] = exc

    kfp.patch(readahead=False, verify=False)
    warm_up(model, gate)
    first = run_threads(1, work)
    assert gate.entered.wait(30)
    rest = [threading.Thread(target=work, args=(i,)) for i in range(1, 6)]
    for t in rest:
        t.start()
    batcher = keras_adapter.lookup(model).batcher
    wait_queued(batcher, 5)
    kfp.unpatch()
    later = [threading.Thread(target=work, args=(i,)) for i in range(6, 8)]
    for t in later:
        t.start()
    gate.set()
    join(first + rest + later)
    assert not failures
    for i in range(8):
        assert_same(results[i], expected[i:i + 1])


def test_unpatch_while_many_threads_predict(always_queue):
    model = keras.models.Sequential([layers.Dense(256, activation='relu', input_shape=(16,)),
                                     layers.Dense(256), layers.Dense(4)])
    n_threads, calls = 8, 60
    x = np.random.RandomState(3).rand(n_threads, calls, 16).astype('float32')
    expected = [unpatched_predict(model, x[t]) for t in range(n_threads)]
    got = {t: [] for t in range(n_threads)}
    errors = []
    progress = threading.Condition()
    done = [0]

    def work(t):
        try:
            for i in range(calls):
                got[t].append(model.predict(x[t, i:i + 1].copy()))
                with progress:
                    done[0] += 1
                    progress.notify_all()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    kfp.patch()
    threads = run_threads(n_threads, work)
    wait_for(progress, lambda: done[0] >= n_threads * calls // 4)
    kfp.unpatch()
    join(threads)
    assert not errors
    for t in range(n_threads):
        assert_same(np.concatenate(got[t]), expected[t])


def test_interpreter_exit_while_threads_predict():
    # Daemon and non-daemon threads are still predicting when the main thread ends.
    import os
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent('''
        import threading
        import numpy as np
        import keras
        import keras_fastpredict as kfp
        from keras.engine.training import Model
        model = keras.models.Sequential([      # slow enough for calls to wait in the queue
            keras.layers.Dense(2048, activation='relu', input_shape=(64,)),
            keras.layers.Dense(2048), keras.layers.Dense(4)])
        x = np.random.RandomState(0).rand(64, 64).astype('float32')
        expected = Model.predict(model, x)
        kfp.patch(merge=True, num_batch_threads=1)     # every call may queue
        started = threading.Semaphore(0)

        def work(forever):
            i = 0
            try:
                while forever or i < 200:
                    k = i % len(x)
                    y = model.predict(x[k:k + 1].copy())
                    if not np.allclose(y, expected[k:k + 1], rtol=1e-5, atol=1e-6):
                        print('WRONG', flush=True)
                    if i == 3:
                        started.release()
                    i += 1
                print('finished', flush=True)
            finally:
                if i <= 3:          # failed early: the main thread must not wait for it
                    started.release()

        for t in range(8):          # 2 threads make 200 calls, 6 daemon threads never stop
            threading.Thread(target=work, args=(t >= 2,), daemon=t >= 2).start()
        for t in range(8):
            started.acquire()
        print('main ends', flush=True)
    ''')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=root)
    done = subprocess.run([sys.executable, '-c', script], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'Traceback' not in done.stderr and 'Exception' not in done.stderr, done.stderr[-3000:]
    assert 'WRONG' not in done.stdout
    assert done.stdout.count('finished') == 2       # each non-daemon thread, all 200 calls


def test_many_large_calls_are_never_rejected_by_default(always_queue):
    # Issue 11: plain Keras never rejects a call; 8 threads x 20,000 rows queue up.
    gate = threading.Event()
    model = gated_model(gate)
    x = np.random.RandomState(4).rand(8, 20000, 4).astype('float32')
    gate.set()
    expected = [unpatched_predict(model, x[i]) for i in range(8)]
    gate.clear()
    results, failures = {}, {}

    def work(i):
        try:
            results[i] = model.predict(x[i])
        except Exception as exc:  # noqa: BLE001
            failures[i] = exc

    with kfp.patched(verify=False):       # (a model not yet verified is not batched)
        hold_then_queue(model, gate, work, 8, queued=7)
    assert not failures
    for i in range(8):
        assert_same(results[i], expected[i])
    assert kfp.stats(model)['rejected'] == 0


# -- Many callers, each with its own rows -----------------------------------------------------

@pytest.mark.parametrize('merge', [True, 'auto', False])
def test_pools_and_threads_with_their_own_row_counts_get_their_own_rows(merge):
    # Callers from a ThreadPoolExecutor and from plain threads, each call with its own rows
    # (1 to 4, some with a batch_size of their own), one run slot so that calls queue and
    # merge whenever merging is allowed. Results are allclose: a merged run sums in another
    # order than plain Keras' own run of the same rows.
    model = keras.models.Sequential([layers.Dense(16, activation='relu', input_shape=(6,)),
                                     layers.Dense(3)])
    rng = np.random.RandomState(5)
    n_callers, calls = 12, 25
    inputs = [[rng.rand(1 + (c + i) % 4, 6).astype('float32') for i in range(calls)]
              for c in range(n_callers)]
    sizes = [[2 if (c * calls + i) % 7 == 0 else None for i in range(calls)]
             for c in range(n_callers)]
    expected = [[unpatched_predict(model, x, batch_size=b or 32)
                 for x, b in zip(inputs[c], sizes[c])] for c in range(n_callers)]
    got = {}

    def work(c):
        got[c] = [model.predict(x.copy(), batch_size=b)
                  for x, b in zip(inputs[c], sizes[c])]

    with kfp.patched(readahead=False, merge=merge, num_batch_threads=1):
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(work, c) for c in range(8)]
            threads = run_threads(n_callers - 8, lambda t: work(8 + t))
            for f in futures:
                f.result(60)
            join(threads)
    for c in range(n_callers):
        for g, e in zip(got[c], expected[c]):
            assert_same(g, e)
    assert kfp.stats(model)['fast_calls'] == n_callers * calls


def test_batch_fills_up_to_max_batch_size_without_waiting_out_its_timeout(always_queue):
    # batch_timeout_micros: the leader waits for more calls (up to max_batch_size rows),
    # and takes the batch as soon as it is full: a wait of a minute would time the test out.
    gate = threading.Event()
    model = gated_model(gate)
    x = np.random.RandomState(6).rand(4, 4).astype('float32')
    gate.set()
    expected = unpatched_predict(model, x, batch_size=1)
    gate.clear()
    results = {}

    def work(i):
        results[i] = model.predict(x[i:i + 1].copy())

    with kfp.patched(readahead=False, verify=False, batch_timeout_micros=60 * 10 ** 6,
                     max_batch_size=3):
        warm_up(model, gate)
        holder = run_threads(1, work)
        assert gate.entered.wait(30)
        leader = [threading.Thread(target=work, args=(1,))]
        leader[0].start()
        batcher = keras_adapter.lookup(model).batcher
        wait_queued(batcher, 1)
        gate.set()                          # the holder ends; call 1 leads, waits to fill
        wait_until(lambda: batcher.filling)
        others = run_threads(2, lambda t: work(2 + t))
        join(holder + leader + others)
    for i in range(4):
        assert_same(results[i], expected[i:i + 1])
    assert kfp.stats(model)['batch_size_histogram'] == {4: 1}      # calls 1-3 together


def test_lone_queued_call_runs_once_its_batch_timeout_is_over(always_queue):
    gate = threading.Event()
    model = gated_model(gate)
    x = np.random.RandomState(7).rand(2, 4).astype('float32')
    gate.set()
    expected = unpatched_predict(model, x, batch_size=1)
    gate.clear()
    results = {}

    def work(i):
        results[i] = model.predict(x[i:i + 1].copy())

    with kfp.patched(readahead=False, verify=False, batch_timeout_micros=200000):
        hold_then_queue(model, gate, work, 2, queued=1)
    for i in range(2):
        assert_same(results[i], expected[i:i + 1])


def wait_until(predicate):
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.005)


# -- The batcher's own logic, on a stand-in for the engine ----------------------------------

class FakeEntry(object):
    """What the batcher needs of a compiled model, in Python: a run doubles its rows,
    fails for a batch holding a negative row, can be held at ``gate``, and is logged (the
    first column of each row, in ``runs``)."""
    batch_safe = True
    excluded = False
    fixed_rows = True
    feed_names = ('x',)
    large_batch = 64
    n_outputs = 1
    fastest_run_s = 1.0

    def __init__(self):
        self.stats = counters.ModelStats('fake')
        self.batcher = None
        self.runs = []
        self.threads = []               # the thread of each run
        self.gate = threading.Event()
        self.gate.set()
        self.at_gate = threading.Semaphore(0)
        self.interrupt_on = None        # a first-column value: its run raises this once

    def run(self, arrays, batch_size=None):
        x = arrays[0]
        self.runs.append(x[:, 0].tolist())
        self.threads.append(threading.current_thread())
        self.at_gate.release()
        assert self.gate.wait(30)
        if self.interrupt_on is not None and (x[:, 0] == self.interrupt_on).any():
            self.interrupt_on = None
            raise KeyboardInterrupt
        if (x < 0).any():
            raise ValueError('negative row: %r' % float(x[x < 0][0]))
        return [x * 2.0]


def rows_of(*tags):
    """One call's rows: a row per tag, the tag in the first column."""
    return np.array([[t, 0.5] for t in tags], 'float32')


class Caller(threading.Thread):
    """One call of ``batcher.submit`` in a thread of its own: its result or exception."""

    def __init__(self, batcher, entry, x):
        super(Caller, self).__init__()
        self.batcher, self.entry, self.x = batcher, entry, x
        self.result = self.error = None
        self.start()

    def run(self):
        try:
            self.result = concurrent_batcher.submit(self.entry, [self.x], len(self.x), None)
        except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt included
            self.error = exc


def holding(batcher, entry, tag=0.0):
    """A caller whose run waits at the closed gate: the one slot is busy."""
    entry.gate.clear()
    holder = Caller(batcher, entry, rows_of(tag))
    assert entry.at_gate.acquire(timeout=30)
    return holder


def queue_in_order(batcher, entry, xs):
    """Callers that queue one after the other, in the order of ``xs``."""
    callers = []
    for x in xs:
        callers.append(Caller(batcher, entry, x))
        wait_until(lambda: len(batcher.queue) == len(callers))
    return callers


def assert_own(caller):
    assert caller.error is None, caller.error
    assert len(caller.result) == 1
    np.testing.assert_array_equal(caller.result[0], caller.x * 2.0)   # a run of its own rows


def finish(entry, callers):
    entry.gate.set()
    for c in callers:
        c.join(30)
        assert not c.is_alive()


def test_batches_are_taken_in_arrival_order_up_to_max_batch_size(always_queue):
    settings.update(max_batch_size=3)
    entry = FakeEntry()
    batcher = entry.batcher = concurrent_batcher.Batcher(entry)
    holder = holding(batcher, entry)
    queued = queue_in_order(batcher, entry, [rows_of(1), rows_of(2, 3), rows_of(4),
                                             rows_of(5), rows_of(6, 7, 8, 9)])
    finish(entry, [holder] + queued)
    for c in [holder] + queued:
        assert_own(c)
    # The first queued call leads the first 3 rows; the next leader the next batch that
    # fits; a call larger than max_batch_size runs alone.
    assert entry.runs == [[0], [1, 2, 3], [4, 5], [6, 7, 8, 9]]
    assert not batcher.queue and not batcher.running and batcher.waking is None


def test_a_failing_call_fails_alone_with_its_own_error(always_queue):
    entry = FakeEntry()
    batcher = entry.batcher = concurrent_batcher.Batcher(entry)
    holder = holding(batcher, entry)
    queued = queue_in_order(batcher, entry, [rows_of(1), rows_of(-2), rows_of(3, 4)])
    finish(entry, [holder] + queued)
    for c in [holder, queued[0], queued[2]]:
        assert_own(c)
    error = queued[1].error
    plain = raised(entry.run, [queued[1].x])     # the same call run alone
    assert (type(error), str(error)) == plain
    # The merged run failed; each call was then run alone.
    assert entry.runs == [[0], [1, -2, 3, 4], [1], [-2], [3, 4], [-2]]
    assert entry.threads[1:5] == [holder] * 4


def test_the_caller_whose_run_ends_runs_the_next_batch_itself(always_queue):
    # No hand-off to start a batch: the holder's run ends, it serves the queue (one batch
    # past its own call), then the next batch's first caller is woken to lead it.
    settings.update(max_batch_size=2)
    entry = FakeEntry()
    batcher = entry.batcher = concurrent_batcher.Batcher(entry)
    holder = holding(batcher, entry)
    queued = queue_in_order(batcher, entry, [rows_of(1), rows_of(2), rows_of(3),
                                             rows_of(4), rows_of(5), rows_of(6),
                                             rows_of(7)])
    finish(entry, [holder] + queued)
    for c in [holder] + queued:
        assert_own(c)
    assert entry.runs == [[0], [1, 2], [3, 4], [5, 6], [7]]
    # The holder runs [1, 2]; call 3, woken, leads its own batch and one more; call 7
    # is woken for the last.
    assert entry.threads == [holder, holder, queued[2], queued[2], queued[6]]


def test_an_interrupted_leader_hands_its_batch_back(always_queue):
    entry = FakeEntry()
    batcher = entry.batcher = concurrent_batcher.Batcher(entry)
    holder = holding(batcher, entry)
    entry.interrupt_on = 1.0                # the merged run the holder leads, once
    queued = queue_in_order(batcher, entry, [rows_of(1), rows_of(2), rows_of(3)])
    finish(entry, [holder] + queued)
    assert isinstance(holder.error, KeyboardInterrupt)       # only the leader sees it
    for c in queued:
        assert_own(c)
    assert entry.runs == [[0], [1, 2, 3], [1, 2, 3]]
    assert entry.threads[1:] == [holder, queued[0]]
    assert not batcher.queue and not batcher.running and batcher.waking is None


def test_a_caller_timed_out_in_the_queue_leaves_it_and_the_rest_are_served(always_queue):
    settings.update(timeout=0.2)
    entry = FakeEntry()
    batcher = entry.batcher = concurrent_batcher.Batcher(entry)
    holder = holding(batcher, entry)
    late = Caller(batcher, entry, rows_of(1))
    late.join(30)
    assert isinstance(late.error, kfp.PredictTimeoutError)
    assert not batcher.queue and entry.stats.timeouts == 1
    settings.update(timeout=None)
    queued = queue_in_order(batcher, entry, [rows_of(2), rows_of(3)])
    finish(entry, [holder] + queued)
    for c in [holder] + queued:
        assert_own(c)
    assert entry.runs == [[0], [2, 3]]


def test_direct_way_never_queues(always_queue):
    # merge=False: every call runs at once, however many runs are in flight.
    settings.update(merge=False)
    entry = FakeEntry()
    batcher = entry.batcher = concurrent_batcher.Batcher(entry)
    holder = holding(batcher, entry)
    others = [Caller(batcher, entry, rows_of(i)) for i in (1, 2, 3)]
    for _ in others:
        assert entry.at_gate.acquire(timeout=30)       # all three runs are in flight
    assert not batcher.queue and len(batcher.running) == 4
    finish(entry, [holder] + others)
    for c in [holder] + others:
        assert_own(c)
    assert entry.stats.queued == 0


@pytest.mark.parametrize('merge', [False, 'auto', True])
def test_a_call_that_finds_a_slot_freed_meanwhile_runs_directly(merge):
    # submit() saw every slot busy, then, before it counted the callers inside, the
    # other calls returned (a thread switch between the two looks): no caller is waiting
    # and a slot is free, so the call runs at once, as concurrent=False runs it; it does
    # not queue to lead a batch of its own call alone (merge=False never queues).
    settings.update(merge=merge, num_batch_threads=1)
    entry = FakeEntry()
    batcher = entry.batcher = concurrent_batcher.Batcher(entry)
    me = threading.get_ident()
    batcher.inside.add(me)                  # this caller alone is inside now
    x = rows_of(1, 2)
    got = batcher.submit(entry, [x], len(x), None, me)
    batcher.inside.discard(me)
    np.testing.assert_array_equal(got[0], entry.run([x])[0])      # its rows, run alone
    assert entry.stats.queued == 0 and not batcher.queue
    assert not batcher.running and batcher.waking is None


@pytest.mark.parametrize('timeout', [None, 0])
def test_while_merging_a_caller_at_a_free_slot_leads_a_batch_that_fills(monkeypatch, timeout):
    # Merging, with more callers inside than slots (two on their way back, stood in for
    # here by two idents), a caller finding both slots free and nobody queued does not
    # run alone at once: it leads a batch that waits for others, up to the model's
    # fastest run by default (here a minute: the batch is taken when full, at 2 rows).
    # batch_timeout_micros=0: no wait, it runs its own rows at once.
    monkeypatch.setattr(concurrent_batcher, '_FILL_MAX_S', 60.0)
    settings.update(merge=True, num_batch_threads=2, max_batch_size=2,
                    batch_timeout_micros=timeout)
    entry = FakeEntry()
    entry.fastest_run_s = 60.0
    batcher = entry.batcher = concurrent_batcher.Batcher(entry)
    batcher.inside.update((-1, -2))
    first = Caller(batcher, entry, rows_of(1))
    if timeout is None:
        wait_until(lambda: batcher.filling)
        assert not entry.runs
    else:
        first.join(30)
        assert entry.runs == [[1.0]]
    second = Caller(batcher, entry, rows_of(2))
    finish(entry, [first, second])
    for c in (first, second):
        assert_own(c)
    assert entry.runs == ([[1.0, 2.0]] if timeout is None else [[1.0], [2.0]])


def test_a_batch_is_taken_once_every_caller_inside_waits_in_the_queue(monkeypatch):
    # A leader filling its batch stops waiting once every caller inside the model is in
    # the queue (more callers than slots inside): none of them is left to join, and
    # nothing of the model runs meanwhile. Two stand-in idents are callers on their way
    # back: while they are inside the leader waits (here up to a minute); once they have
    # left, the next caller to queue completes the batch, taken at once.
    monkeypatch.setattr(concurrent_batcher, '_FILL_MAX_S', 60.0)
    settings.update(merge=True, num_batch_threads=2)
    entry = FakeEntry()
    entry.fastest_run_s = 60.0
    batcher = entry.batcher = concurrent_batcher.Batcher(entry)
    batcher.inside.update((-1, -2))
    first = Caller(batcher, entry, rows_of(1))
    wait_until(lambda: batcher.filling)
    more = []
    for x in (rows_of(2, 3), rows_of(4)):
        more.append(Caller(batcher, entry, x))
        wait_until(lambda: len(batcher.queue) == 1 + len(more))
    assert batcher.filling and not entry.runs       # two callers inside are not queued
    batcher.inside.difference_update((-1, -2))
    last = Caller(batcher, entry, rows_of(5))
    callers = [first] + more + [last]
    for c in callers:
        c.join(30)
        assert not c.is_alive()
        assert_own(c)
    assert entry.runs == [[1.0, 2.0, 3.0, 4.0, 5.0]]
    assert not batcher.running and not batcher.queue and not batcher.filling


def test_a_leader_interrupted_while_its_batch_fills_hands_the_lead_on(monkeypatch):
    # The caller whose run ends leads the queue, and is interrupted while it waits for
    # the batch to fill: only it sees the interrupt; it holds no slot after it, and the
    # queued call leads (its batch fills with the next caller's rows).
    monkeypatch.setattr(concurrent_batcher, '_FILL_MAX_S', 60.0)
    settings.update(merge=True, num_batch_threads=1, max_batch_size=2)
    entry = FakeEntry()
    entry.fastest_run_s = 60.0
    batcher = entry.batcher = concurrent_batcher.Batcher(entry)
    holder = holding(batcher, entry, tag=0.0)
    second, = queue_in_order(batcher, entry, [rows_of(1)])
    wait = batcher.cond.wait
    interrupts = [KeyboardInterrupt()]

    def interrupted_once(*args):
        if interrupts:
            raise interrupts.pop()
        return wait(*args)
    batcher.cond.wait = interrupted_once
    entry.gate.set()
    holder.join(30)
    assert isinstance(holder.error, KeyboardInterrupt)
    wait_until(lambda: batcher.filling)             # the queued call leads, and waits
    third = Caller(batcher, entry, rows_of(2))
    finish(entry, [second, third])
    for c in (second, third):
        assert_own(c)
    assert entry.runs == [[0.0], [1.0, 2.0]]
    assert not batcher.running and not batcher.queue and not batcher.filling


def test_a_batch_whose_callers_all_gave_up_while_it_filled_is_not_run(monkeypatch):
    # The caller whose run ends leads the queue and waits for the batch to fill; the one
    # queued call times out meanwhile: nothing is left to run, the leader returns its own
    # rows and holds no slot. (Margins: the call times out at 0.3 s, the wait ends at 3;
    # a wait the user set: the automatic one ends within half the time-out.)
    monkeypatch.setattr(concurrent_batcher, '_FILL_MAX_S', 3.0)
    settings.update(merge=True, num_batch_threads=1, max_batch_size=2, timeout=0.3,
                    batch_timeout_micros=3000000)
    entry = FakeEntry()
    entry.fastest_run_s = 3.0
    batcher = entry.batcher = concurrent_batcher.Batcher(entry)
    holder = holding(batcher, entry, tag=0.0)
    second, = queue_in_order(batcher, entry, [rows_of(1)])
    entry.gate.set()
    finish(entry, [holder, second])
    assert_own(holder)
    assert isinstance(second.error, concurrent_batcher.PredictTimeoutError)
    assert entry.runs == [[0.0]]
    assert not batcher.running and not batcher.queue and not batcher.filling


def test_a_merge_trial_waits_for_the_direct_runs_in_flight_at_the_switch():
    # As a trial of merging begins, the batcher tells the policy which runs to wait for:
    # those in flight at the switch, until each has been seen returned (a thread that
    # runs again later, leading a batch say, is not waited for again), none after a
    # reference of merging.
    entry = FakeEntry()
    batcher = concurrent_batcher.Batcher(entry)
    assert batcher._pending(merge_policy.DIRECT) is None        # nothing in flight
    batcher.running.update((1, 2))
    assert batcher._pending(merge_policy.MERGE) is None
    out = batcher._pending(merge_policy.DIRECT)
    assert out()
    batcher.running.discard(1)
    batcher.running.add(3)                  # a run begun after the switch
    assert out()                            # (2 is still out)
    batcher.running.add(1)                  # 1, seen returned, runs again
    assert out()
    batcher.running.discard(2)
    assert not out()
    assert batcher.policy.pending == batcher._pending


def test_merging_is_tried_once_the_kernels_are_made(monkeypatch):
    # A merged run needs TF's multi-row kernels (until they are made, merged calls run
    # alone): the policy asks warmup.ready() before a trial of merging, and a model
    # slow enough to be checked at once begins making them as its guess is read.
    begun = []
    monkeypatch.setattr(warmup, 'done', threading.Event())
    monkeypatch.setattr(warmup, '_started', False)
    monkeypatch.setattr(warmup, 'start', lambda prepare_here=False: begun.append(1))
    entry = FakeEntry()
    batcher = concurrent_batcher.Batcher(entry)
    entry.fastest_run_s = 10e-6                 # faster than a hand-off: checked late
    assert batcher.policy.prior(3) == (merge_policy.DIRECT, merge_policy.GAP_MAX)
    assert not begun
    entry.fastest_run_s = 5e-3                  # checked at once
    assert batcher.policy.prior(3) == (merge_policy.DIRECT, 0)
    assert begun
    assert batcher.policy.ready() is False
    warmup.done.set()
    assert batcher.policy.ready() is True


def test_automatic_fill_is_the_models_fastest_run_capped():
    class Timed(object):
        def __init__(self, s):
            self.fastest_run_s = s
    fill = concurrent_batcher._fill_s
    assert fill(Timed(float('inf'))) == 0.0                 # no run timed yet: no wait
    assert fill(Timed(0.002)) == 0.002
    assert fill(Timed(10.0)) == concurrent_batcher._FILL_MAX_S
    assert fill(None) == 0.0


def test_a_model_call_that_finds_a_slot_freed_meanwhile_gives_plain_keras_rows():
    # The same, through a Keras model's own entry: plain Keras' answer, and no queueing.
    model = keras.models.Sequential([layers.Dense(16, activation='relu', input_shape=(6,)),
                                     layers.Dense(3)])
    x = np.random.RandomState(1).rand(3, 6).astype('float32')
    expected = unpatched_predict(model, x)
    with kfp.patched(merge=False, num_batch_threads=1, readahead=False):
        model.predict(x[:1])                        # the model's fast path is made
        entry = keras_adapter.lookup(model)
        batcher = entry.batcher = concurrent_batcher.Batcher(entry)
        me = threading.get_ident()
        batcher.inside.add(me)
        got = batcher.submit(entry, [x], len(x), None, me)
        batcher.inside.discard(me)
    np.testing.assert_array_equal(got[0], expected)
    assert entry.stats.queued == 0


class ScriptedPolicy(merge_policy.Policy):
    """The policy's levels, with the way given by the test; each call ends a phase."""

    def __init__(self, slots, ways, lock):
        super(ScriptedPolicy, self).__init__(slots, lambda: (merge_policy.DIRECT, 0))
        self.ways = list(ways)
        self.lock = lock
        self.asked = []
        self.turned = []

    def way(self, key, callers):
        self.asked.append((key, callers))
        return self.ways.pop(0), ('ticket', len(self.asked))

    def turn(self, ticket):
        assert self.lock.locked()
        self.turned.append(ticket)


def test_measured_way_is_asked_with_the_callers_inside():
    # merge='auto': a call that finds the slot busy asks the policy for the way of its
    # load level (callers inside, queued ones included) and goes that way; a call whose
    # arrival ends a phase turns it under the lock.
    settings.update(num_batch_threads=1)
    entry = FakeEntry()
    batcher = entry.batcher = concurrent_batcher.Batcher(entry)
    policy = batcher.policy = ScriptedPolicy(1, [merge_policy.DIRECT, merge_policy.MERGE,
                                                 merge_policy.MERGE], batcher.lock)
    holder = holding(batcher, entry)
    direct = Caller(batcher, entry, rows_of(1))          # 2 callers inside: level 1
    assert entry.at_gate.acquire(timeout=30)             # it runs at once
    queued = queue_in_order(batcher, entry, [rows_of(-2), rows_of(3)])    # 3, 4 inside
    finish(entry, [holder, direct] + queued)
    for c in [holder, direct, queued[1]]:
        assert_own(c)
    assert isinstance(queued[0].error, ValueError)
    assert policy.asked == [(1, 2), (2, 3), (2, 4)]
    assert policy.turned == [('ticket', 1), ('ticket', 2), ('ticket', 3)]
    assert entry.runs == [[0], [1], [-2, 3], [-2], [3]]


class InterruptedWhenChosen(concurrent_batcher.Batcher):
    """A caller (the one whose row is tagged 1) is interrupted just as it is woken to
    lead, as KeyboardInterrupt may hit the main thread while it waits."""

    def _wait(self, req, deadline):
        super(InterruptedWhenChosen, self)._wait(req, deadline)
        if req.lead and req.arrays[0][0, 0] == 1:
            raise KeyboardInterrupt


def test_a_caller_interrupted_when_chosen_to_lead_hands_the_lead_on(always_queue):
    entry = FakeEntry()
    batcher = entry.batcher = InterruptedWhenChosen(entry)
    holder = holding(batcher, entry, tag=-1.0)      # its run fails: a queued call is woken
    queued = queue_in_order(batcher, entry, [rows_of(1), rows_of(2), rows_of(3)])
    finish(entry, [holder] + queued)
    assert isinstance(holder.error, ValueError)
    assert isinstance(queued[0].error, KeyboardInterrupt)
    for c in queued[1:]:
        assert_own(c)
    assert entry.runs == [[-1], [2, 3]]         # its call left the queue with it
    assert entry.threads[1] is queued[1]
    assert not batcher.queue and not batcher.running and batcher.waking is None


class BusyEntry(FakeEntry):
    """A stand-in whose run lets go of the GIL for a moment, as a session run does, so
    that calls overlap, queue and merge."""

    def run(self, arrays, batch_size=None):
        time.sleep(0.0002)
        return super(BusyEntry, self).run(arrays, batch_size)


@pytest.mark.parametrize('merge', [True, 'auto', False])
def test_many_callers_each_get_their_own_rows_or_their_own_error(merge):
    # 16 threads (8 of a pool, 8 plain), 120 calls each of 1-3 rows; every 13th call has
    # a failing row; the run holding one given row is interrupted, once (whoever runs
    # it: its caller, or a leader whose batch holds it). Whatever the interleaving, each
    # call gets its own rows doubled or its own error, one caller gets the interrupt,
    # and nothing is left queued, running or chosen to lead.
    settings.update(merge=merge, num_batch_threads=1)
    entry = BusyEntry()
    batcher = entry.batcher = concurrent_batcher.Batcher(entry)
    entry.interrupt_on = 5060.0
    outcomes = {}

    def work(t):
        mine = []
        for i in range(120):
            tag = 1000.0 * t + i
            x = rows_of(*[tag + j / 10.0 for j in range(1 + (t + i) % 3)])
            if i % 13 == 5:
                x[-1, 1] = -1.0
            try:
                mine.append((x, concurrent_batcher.submit(entry, [x], len(x), None)))
            except BaseException as exc:  # noqa: BLE001 - the interrupt included
                mine.append((x, exc))
        outcomes[t] = mine

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(work, t) for t in range(8)]
        join(run_threads(8, lambda t: work(8 + t)))
        for f in futures:
            f.result(60)
    interrupts = 0
    for t in range(16):
        assert len(outcomes[t]) == 120
        for x, got in outcomes[t]:
            if isinstance(got, KeyboardInterrupt):
                interrupts += 1
            elif (x < 0).any():
                assert isinstance(got, ValueError) and str(got) == 'negative row: -1.0'
            else:
                assert len(got) == 1
                np.testing.assert_array_equal(got[0], x * 2.0)
    assert interrupts == 1
    assert not batcher.queue and not batcher.running and not batcher.inside
    assert batcher.waking is None and not batcher.filling
    if merge is False:
        assert entry.stats.queued == 0


class RegisteredEntry(FakeEntry):
    """Logs, for each run, whether its caller was counted among the runs in flight."""

    def __init__(self):
        super(RegisteredEntry, self).__init__()
        self.registered = []

    def run(self, arrays, batch_size=None):
        self.registered.append(threading.get_ident() in self.batcher.running)
        return super(RegisteredEntry, self).run(arrays, batch_size)


class StepClock(object):
    """A clock that moves ``step`` seconds each time it is read."""

    def __init__(self, step):
        self.t, self.step = 0.0, step

    def __call__(self):
        self.t += self.step
        return self.t


def call_alone(entry, n):
    x = rows_of(1)
    for _ in range(n):
        assert concurrent_batcher.submit(entry, [x], 1, None)[0][0, 0] == 2.0


def test_a_model_that_never_merges_skips_the_bookkeeping(monkeypatch):
    # One thread: nothing to merge. Every REVIEW_CALLS-th call counted reviews: the calls
    # after it bypass the batcher, 0.05 s worth of calls at the rate seen, then are
    # counted again until the next review, which bypasses twice as long, up to 1 s.
    clock = StepClock(0.0)
    monkeypatch.setattr(concurrent_batcher, '_clock', clock)
    entry = RegisteredEntry()
    batcher = entry.batcher = concurrent_batcher.Batcher(entry)
    review = concurrent_batcher._REVIEW_CALLS
    call_alone(entry, review)
    assert entry.registered == [True] * review and batcher.bypass_end == 0
    clock.t += review * 1e-5                    # those calls came at 100,000 a second
    call_alone(entry, 1)                        # call number 512 reviews
    assert batcher.bypass_end == review + 1 + 5000
    again = 11 * review                         # the first review after the bypass
    call_alone(entry, again - review - 1)
    assert entry.registered[review + 1:] == [False] * 5000 + [True] * (again - review - 5001)
    assert batcher.bypass_s == 0.1
    clock.t += 1e-2                             # 5120 calls in 10 ms: 512,000 a second
    call_alone(entry, 1)                        # call number 5632 reviews
    assert abs(batcher.bypass_end - (again + 1 + 51200)) <= 1 and batcher.bypass_s == 0.2
    for k in range(4):
        batcher._review(again + (k + 1) * review)
    assert batcher.bypass_s == concurrent_batcher._BYPASS_MAX_S == 1.0


def test_no_bypass_while_calls_merge_or_a_level_is_measured(always_queue):
    entry = RegisteredEntry()
    batcher = entry.batcher = concurrent_batcher.Batcher(entry)
    holder = holding(batcher, entry)
    queued = queue_in_order(batcher, entry, [rows_of(1), rows_of(2)])
    finish(entry, [holder] + queued)
    batcher._review(concurrent_batcher._REVIEW_CALLS)
    assert batcher.bypass_end == 0                      # calls were queued
    settings.update(merge='auto')
    batcher._review(2 * concurrent_batcher._REVIEW_CALLS)
    assert batcher.bypass_end > 0                       # none since: settled
    # A load level reached since the last review whose way is merging, or that tries
    # merging, keeps the bookkeeping on; one no call reached does not count.
    policy = batcher.policy
    for way, phase, touched, bypass in [(merge_policy.MERGE, merge_policy.GAP, True, False),
                                        (merge_policy.MERGE, merge_policy.TRIAL, True, False),
                                        (merge_policy.MERGE, merge_policy.GAP, False, True),
                                        (merge_policy.DIRECT, merge_policy.REFERENCE, True,
                                         True)]:
        batcher.bypass_end = 0
        policy.levels.clear()
        policy.way(2, 4)
        level = policy.levels[2]
        level.best = way if phase is not merge_policy.TRIAL else merge_policy.DIRECT
        level.current = (way,) + (phase,) + level.current[2:]
        level.touched = touched
        batcher._review(3 * concurrent_batcher._REVIEW_CALLS)
        assert (batcher.bypass_end > 0) == bypass, (way, phase, touched)
        if bypass and phase is merge_policy.REFERENCE:
            assert level.current[3] == []           # its epoch begins again afterwards


def test_first_guess_from_the_models_fastest_run():
    # Every level starts direct. Runs slower than a thread hand-off: checked after the
    # warm-up epoch. Faster: first checked GAP_MAX epochs later (nothing to gain from
    # merging: a run saved costs a wake). The hand-off is measured on the model's wakes
    # (50 us until then), times the callers a slot at the level (2**key): a woken caller
    # waits for the GIL behind them.
    entry = FakeEntry()
    batcher = concurrent_batcher.Batcher(entry)
    entry.fastest_run_s = 200e-6
    assert batcher.policy.prior(1) == (merge_policy.DIRECT, 0)              # 3-4 callers
    assert batcher.policy.prior(3) == (merge_policy.DIRECT, merge_policy.GAP_MAX)  # 9-16
    entry.fastest_run_s = 10e-6
    assert batcher.policy.prior(1) == (merge_policy.DIRECT, merge_policy.GAP_MAX)
    batcher.handoff_s = 1e-3                 # a busy machine: wakes take a millisecond
    entry.fastest_run_s = 200e-6
    assert batcher.policy.prior(1) == (merge_policy.DIRECT, merge_policy.GAP_MAX)


def test_the_automatic_fill_leaves_queued_callers_time_within_their_timeout(monkeypatch):
    # The caller whose run ends leads the queue and, by default, waits for the batch to
    # fill, up to the model's fastest run (here 3 s). The queued call has a time-out of
    # 0.3 s: the automatic wait must not outlast it (a slot is free all along), so the
    # call is served. (Before: PredictTimeoutError at 0.3 s, the leader still waiting.)
    monkeypatch.setattr(concurrent_batcher, '_FILL_MAX_S', 3.0)
    settings.update(merge=True, num_batch_threads=1, max_batch_size=4, timeout=0.3)
    entry = FakeEntry()
    entry.fastest_run_s = 3.0
    batcher = entry.batcher = concurrent_batcher.Batcher(entry)
    holder = holding(batcher, entry, tag=0.0)
    second, = queue_in_order(batcher, entry, [rows_of(1)])
    finish(entry, [holder, second])
    for c in (holder, second):
        assert_own(c)
    assert entry.runs == [[0.0], [1.0]]
    assert entry.stats.timeouts == 0
    assert not batcher.running and not batcher.queue and not batcher.filling


def test_a_batch_being_filled_does_not_count_against_max_enqueued_batches(monkeypatch):
    # max_enqueued_batches=1 of 4 rows; the caller whose run ends leads the queued call
    # (3 rows) and waits for its batch to fill. A call of 3 rows arrives: with no wait
    # (batch_timeout_micros=0, the default before) the batch would have been taken and
    # the call queued; the wait must not refuse it (before: QueueFullError while the
    # leader sat waiting, one slot free). It is admitted, and the leader, its queue now
    # holding a batch's worth, runs its batch at once.
    monkeypatch.setattr(concurrent_batcher, '_FILL_MAX_S', 5.0)
    settings.update(merge=True, num_batch_threads=1, max_batch_size=4,
                    max_enqueued_batches=1)
    entry = FakeEntry()
    entry.fastest_run_s = 5.0
    batcher = entry.batcher = concurrent_batcher.Batcher(entry)
    holder = holding(batcher, entry, tag=0.0)
    second, = queue_in_order(batcher, entry, [rows_of(1, 2, 3)])
    entry.gate.set()
    wait_until(lambda: batcher.filling)
    third = Caller(batcher, entry, rows_of(4, 5, 6))
    wait_until(lambda: third.error is not None or entry.runs[1:])
    assert third.error is None, third.error
    wait_until(lambda: batcher.filling)             # the third leads its batch, waits
    fourth = Caller(batcher, entry, rows_of(7))      # ... and it is full
    finish(entry, [holder, second, third, fourth])
    for c in (holder, second, third, fourth):
        assert_own(c)
    assert entry.runs == [[0.0], [1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]]
    assert entry.stats.rejected == 0
    assert not batcher.running and not batcher.queue and not batcher.filling


class DaemonCaller(Caller):
    """A Caller whose thread does not keep the process alive (a test of a hang)."""

    def start(self):
        self.daemon = True
        super(DaemonCaller, self).start()


def test_a_caller_timing_out_while_its_batch_runs_lets_the_leader_finish():
    # A queued call is taken into a batch another caller leads; its time-out passes while
    # that run goes on: it waits for its rows (served within one run), without holding
    # the batcher's lock, so the leader can hand them over when the run ends. (Before: it
    # waited for them holding the lock the leader needs: every caller of the model hung.)
    settings.update(merge=True, num_batch_threads=1, max_batch_size=2, timeout=0.3,
                    batch_timeout_micros=0)
    entry = FakeEntry()
    batcher = entry.batcher = concurrent_batcher.Batcher(entry)
    entry.gate.clear()
    holder = DaemonCaller(batcher, entry, rows_of(0))
    assert entry.at_gate.acquire(timeout=30)
    queued = DaemonCaller(batcher, entry, rows_of(1))
    wait_until(lambda: len(batcher.queue) == 1)
    first_gate, entry.gate = entry.gate, threading.Event()
    first_gate.set()                        # the holder's run ends; it leads [1] ...
    assert entry.at_gate.acquire(timeout=30)     # ... which waits at the new gate
    time.sleep(0.6)                         # (past the queued call's time-out)
    entry.gate.set()
    for c in (holder, queued):
        c.join(10)
        assert not c.is_alive()
    for c in (holder, queued):
        assert_own(c)
    assert entry.runs == [[0.0], [1.0]]
    assert entry.stats.timeouts == 0
    assert not batcher.running and not batcher.queue and batcher.waking is None


def test_first_calls_from_many_threads_at_once_make_one_batcher(monkeypatch):
    # The first calls of a server's first burst arrive together: each made a batcher of
    # its own (the last one kept), whose callers would not see each other's.
    made = []
    init = concurrent_batcher.Batcher.__init__

    def slow_init(self, entry):
        made.append(self)
        time.sleep(0.2)
        init(self, entry)
    monkeypatch.setattr(concurrent_batcher.Batcher, '__init__', slow_init)
    entry = FakeEntry()
    x = np.ones((1, 1), 'float32')
    join(run_threads(8, lambda t: concurrent_batcher.submit(entry, [x], 1, None)))
    assert len(made) == 1 and entry.batcher is made[0]
    assert sum(len(r) for r in entry.runs) == 8     # (each call run once)
