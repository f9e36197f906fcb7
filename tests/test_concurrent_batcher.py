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
from keras_fastpredict import concurrent_batcher
from keras_fastpredict.adapters import keras as keras_adapter
from conftest import assert_same, unpatched_predict


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
    gated = layers.Lambda(lambda t: tf.reshape(tf.py_func(step, [t], tf.float32), [-1, 4]))(inp)
    return keras.models.Model(inp, layers.Dense(3)(gated))


def run_threads(n, target):
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def hold_then_queue(model, gate, work, n, queued):
    """work(0) runs and holds the model at the gate; work(1..n-1) start and ``queued`` of
    them wait in the batcher's queue; then the gate opens and all finish."""
    first = run_threads(1, work)
    assert gate.entered.wait(30)
    rest = [threading.Thread(target=work, args=(i,)) for i in range(1, n)]
    for t in rest:
        t.start()
    batcher = keras_adapter.lookup(model).batcher
    deadline = time.monotonic() + 30
    while len(batcher.queue) < queued and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(batcher.queue) == queued
    gate.set()
    join(first + rest)


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


def test_concurrent_calls_form_batches_and_bad_input_fails_alone():
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


def test_failed_batch_is_retried_so_only_the_culprit_fails():
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


def test_queue_full_and_timeout():
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
    assert s['fallbacks'] == 20 and s['batches'] == 0


def test_idle_worker_keeps_nothing_of_a_dropped_model():
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
