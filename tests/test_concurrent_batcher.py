"""Many threads, one model: batches of concurrent calls, each caller gets its own rows."""
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
from keras_fastpredict.engine import concurrent_batcher
from keras_fastpredict.adapters import keras as keras_adapter
from conftest import assert_same, unpatched_predict


@pytest.fixture
def always_queue(monkeypatch):
    """Calls queue whenever the model is busy, however fast its runs were (as for a large
    model): the tests are about the queue, not about which models use it."""
    monkeypatch.setattr(concurrent_batcher, '_QUEUE_COST_S', 0.0)


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
    assert list(failures) == [8] and isinstance(failures[8], ValueError)
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

    with kfp.patched(readahead=False, verify=False):
        hold_then_queue(model, gate, work, 6, queued=5)
        assert list(failures) == [3]
        assert 'negative input' in str(failures[3])
        # The batcher keeps serving after a failure.
        assert_same(model.predict(x[:1].copy()), unpatched_predict(model, x[:1]))
    assert sorted(results) == [0, 1, 2, 4, 5]


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


def test_unpatch_stops_worker_threads_and_repeated_start_stop_does_not_grow():
    model = keras.models.Sequential([layers.Dense(4, input_shape=(4,))])
    x = np.random.RandomState(0).rand(64, 4).astype('float32')
    baseline = threading.active_count()
    for _ in range(5):
        with kfp.patched(readahead=False):
            join(run_threads(8, lambda t: [model.predict(x[i:i + 1].copy())
                                           for i in range(50)]))
        assert concurrent_batcher.worker_count() == 0
        deadline = time.monotonic() + 5
        while threading.active_count() > baseline and time.monotonic() < deadline:
            time.sleep(0.01)
        assert threading.active_count() == baseline


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


def test_idle_worker_keeps_nothing_of_a_dropped_model(always_queue):
    gate = threading.Event()
    model = gated_model(gate)
    x = np.random.RandomState(0).rand(4, 4).astype('float32')
    held = [model]

    def work(i):
        held[0].predict(x[i:i + 1].copy())

    with kfp.patched(readahead=False, verify=False):
        hold_then_queue(model, gate, work, 4, queued=3)
        assert concurrent_batcher.worker_count() == 1      # idle now, waiting for work
        refs = [weakref.ref(model), weakref.ref(keras_adapter.lookup(model))]
        del model, held[:]
        gc.collect()
        assert [r() for r in refs] == [None, None]
        assert concurrent_batcher.worker_count() == 1


def wait_for(cond, predicate):
    """Wait until ``predicate()`` holds; whoever changes it notifies ``cond``."""
    with cond:
        assert cond.wait_for(predicate, 30)


def test_unpatch_serves_queued_calls(always_queue):
    # Issue 10: unpatch() while calls wait in the queue; they must run, not fail.
    gate = threading.Event()
    model = gated_model(gate)
    x = np.random.RandomState(0).rand(6, 4).astype('float32')
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
    unpatcher = run_threads(1, lambda _: kfp.unpatch())
    wait_for(batcher.cond, lambda: batcher.stopping)
    gate.set()
    join(first + rest + unpatcher)
    assert not failures
    for i in range(6):
        assert_same(results[i], expected[i:i + 1])
    assert concurrent_batcher.worker_count() == 0


def test_calls_arriving_after_stop_are_served(always_queue):
    # What interpreter exit does (stop_all) while threads still predict: later calls queue
    # and run all the same, and the worker leaves once the queue is empty.
    gate = threading.Event()
    model = gated_model(gate)
    x = np.random.RandomState(2).rand(5, 4).astype('float32')
    gate.set()
    expected = unpatched_predict(model, x, batch_size=1)
    gate.clear()
    results, failures = {}, {}

    def work(i):
        try:
            results[i] = model.predict(x[i:i + 1].copy())
        except Exception as exc:  # noqa: BLE001
            failures[i] = exc

    with kfp.patched(readahead=False, verify=False):
        warm_up(model, gate)
        first = run_threads(1, work)
        assert gate.entered.wait(30)
        concurrent_batcher.stop_all(wait=0)
        rest = run_threads(5, lambda i: work(i + 1) if i < 4 else None)
        wait_queued(keras_adapter.lookup(model).batcher, 4)
        gate.set()
        join(first + rest)
        concurrent_batcher.stop_all()
        assert concurrent_batcher.worker_count() == 0
    assert not failures
    for i in range(5):
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
        from keras_fastpredict.engine import concurrent_batcher
        from keras.engine.training import Model
        concurrent_batcher._QUEUE_COST_S = 0.0     # every call may queue
        model = keras.models.Sequential([      # slow enough for calls to wait in the queue
            keras.layers.Dense(2048, activation='relu', input_shape=(64,)),
            keras.layers.Dense(2048), keras.layers.Dense(4)])
        x = np.random.RandomState(0).rand(64, 64).astype('float32')
        expected = Model.predict(model, x)
        kfp.patch()
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
