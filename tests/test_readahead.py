"""Read-ahead over the rows of one array: plain arrays back, equal to Keras, safe on change."""
import numpy as np
import pytest
import keras
from keras import layers

import keras_fastpredict as kfp
from conftest import assert_same, inputs_for, unpatched_predict


def ra(model):
    s = kfp.stats(model)
    return s['readahead_hits'], s['readahead_misses']


@pytest.mark.parametrize('view', ['slice', 'none_axis', 'expand_dims', 'reversed', 'strided'])
def test_use_immediately_over_rows(models, view):
    model = models['dense']
    x = inputs_for('dense', 400)
    take = {
        'slice': lambda i: x[i:i + 1],
        'none_axis': lambda i: x[i][None],
        'expand_dims': lambda i: np.expand_dims(x[i], 0),
        'reversed': lambda i: x[399 - i:400 - i],
        'strided': lambda i: x[2 * (i % 200):2 * (i % 200) + 1],
    }[view]
    expected = [unpatched_predict(model, take(i)) for i in range(400)]
    with kfp.patched():
        got = [model.predict(take(i)) for i in range(400)]
    for g, e in zip(got, expected):
        assert type(g) is np.ndarray
        assert_same(g, e)
    hits, _ = ra(model)
    assert hits > 300


def test_rows_changed_after_prediction_are_recomputed(models):
    model = models['dense']
    x = inputs_for('dense', 100)
    with kfp.patched():
        got = []
        for i in range(99):
            y = model.predict(x[i:i + 1])
            got.append(y)
            x[i + 1] += y[0, :1]            # next input depends on this output
    expected_x = inputs_for('dense', 100)
    ref = []
    for i in range(99):
        y = unpatched_predict(model, expected_x[i:i + 1])
        ref.append(y)
        expected_x[i + 1] += y[0, :1]
    assert_same(np.concatenate(got), np.concatenate(ref))
    assert ra(model)[1] >= 1


def test_weights_changed_between_calls(models):
    model = keras.models.Sequential([layers.Dense(3, input_shape=(4,))])
    x = np.random.RandomState(0).rand(50, 4).astype('float32')
    with kfp.patched():
        got = []
        for i in range(50):
            got.append(model.predict(x[i:i + 1]))
            if i == 20:
                model.set_weights([w + 1 for w in model.get_weights()])
    later = unpatched_predict(model, x[21:])
    assert_same(np.concatenate(got[21:]), later)
    assert ra(model)[0] > 20


def test_random_access_is_not_read_ahead(models):
    model = models['dense']
    x = inputs_for('dense', 300)
    order = np.random.RandomState(0).permutation(300)
    with kfp.patched():
        got = [model.predict(x[i:i + 1]) for i in order]
    assert_same(np.concatenate(got), unpatched_predict(model, x[order]))
    assert kfp.stats(model)['readahead_rows'] < 50


def test_readahead_off(models):
    model = models['dense']
    x = inputs_for('dense', 50)
    with kfp.patched(readahead=False):
        [model.predict(x[i:i + 1]) for i in range(50)]
    assert ra(model) == (0, 0)


def test_loop_ending_early_and_new_array(models):
    model = models['dense']
    x = inputs_for('dense', 100)
    x2 = inputs_for('dense', 100, seed=5)
    with kfp.patched():
        first = [model.predict(x[i:i + 1]) for i in range(30)]
        second = [model.predict(x2[i:i + 1]) for i in range(100)]
    assert_same(np.concatenate(first), unpatched_predict(model, x[:30]))
    assert_same(np.concatenate(second), unpatched_predict(model, x2))


@pytest.mark.parametrize('container', ['list', 'dict'])
def test_multi_input_rows_read_ahead(models, container):
    model = models['multi_in']
    a, b = inputs_for('multi_in', 300)
    take = {
        'list': lambda i: [a[i:i + 1], b[i:i + 1]],
        'dict': lambda i: {'a': a[i:i + 1], 'b': b[i:i + 1]},
    }[container]
    with kfp.patched():
        got = []
        for i in range(300):
            if i == 101:
                b[101] += 1               # one input changed after its row was predicted
            got.append(model.predict(take(i)))
    assert all(type(g) is np.ndarray for g in got)
    assert_same(np.concatenate(got), unpatched_predict(model, [a, b]))
    hits, misses = ra(model)
    assert hits > 250 and misses >= 1, sorted(kfp.stats(model).items())


def test_memory_mapped_dataset(models, tmp_path):
    model = models['dense']
    path = str(tmp_path / 'rows.dat')
    data = np.memmap(path, dtype='float32', mode='w+', shape=(200, 32))
    data[:] = inputs_for('dense', 200)
    data.flush()
    data = np.memmap(path, dtype='float32', mode='r', shape=(200, 32))
    expected = unpatched_predict(model, np.asarray(data))
    with kfp.patched():
        got = [model.predict(data[i:i + 1]) for i in range(200)]
    assert_same(np.concatenate(got), expected)
    s = kfp.stats(model)
    assert s['fallbacks'] == 0 and s['readahead_hits'] > 150


def test_results_are_the_callers_own_arrays(models):
    """Issue 9 item 5: editing one result must not change a later call's result."""
    model = models['dense']
    x = inputs_for('dense', 40)
    expected = [unpatched_predict(model, x[i:i + 1]) for i in range(40)]
    expected_again = unpatched_predict(model, x[3:4])
    kfp.patch()
    got = []
    for i in range(40):
        y = model.predict(x[i:i + 1])
        got.append(y.copy())
        y[y < 0.5] = 0                       # the caller edits its result in place
    assert_same(np.concatenate(got), np.concatenate(expected))
    assert_same(model.predict(x[3:4]), expected_again)
    assert kfp.stats(model)['readahead_hits'] > 0


def test_a_bad_row_ahead_fails_only_its_own_call():
    """Issue 9 item 8: an Embedding index out of range in row 12 fails row 12 alone."""
    model = keras.models.Sequential([layers.Embedding(50, 4, input_length=3),
                                     layers.Flatten(), layers.Dense(2)])
    X = np.random.RandomState(0).randint(0, 50, (30, 3)).astype('int32')
    X[12, 1] = 99

    def outcomes(predict):
        found = []
        for i in range(30):
            try:
                found.append(predict(X[i:i + 1]))
            except Exception as exc:  # noqa: BLE001 - compare whatever plain Keras raises
                found.append((type(exc), str(exc)))
        return found

    expected = outcomes(lambda x: unpatched_predict(model, x))
    kfp.patch()
    got = outcomes(model.predict)
    for g, e in zip(got, expected):
        if isinstance(e, tuple):
            assert g == e
        else:
            assert_same(g, e)
    assert isinstance(expected[12], tuple) and not isinstance(expected[11], tuple)
    assert kfp.stats(model)['readahead_hits'] > 0


def test_windows_are_bounded_in_bytes():
    """Issue 9 item 17: a wide decoder's rows are large; windows hold at most
    readahead_bytes of inputs and outputs, whatever the row count."""
    model = keras.models.Sequential([layers.Dense(32768, input_shape=(16,))])
    X = np.random.RandomState(1).rand(120, 16).astype('float32')
    expected = [unpatched_predict(model, X[i:i + 1]) for i in range(120)]
    kfp.patch(readahead_bytes=1 << 20)
    got = [model.predict(X[i:i + 1]) for i in range(120)]
    for g, e in zip(got, expected):
        assert_same(g, e)
    stats = kfp.stats(model)
    assert stats['readahead_hits'] > 0
    row_bytes = (16 + 32768) * 4
    largest_window = stats['readahead_rows'] and max(stats['batch_size_histogram'])
    assert 2 <= largest_window
    # The histogram is by powers of two: the largest window is below twice the bound.
    assert largest_window < 2 * ((1 << 20) // row_bytes)


def test_weights_changed_through_a_session_callable_are_seen():
    """A variable assigned by a function from Session.make_callable is a graph event:
    read-ahead windows predicted before it are not served after it."""
    import tensorflow as tf
    from keras import backend as K
    model = keras.models.Sequential([layers.Dense(3, input_shape=(4,))])
    X = np.random.RandomState(0).rand(40, 4).astype('float32')
    bump = K.get_session().make_callable(tf.assign_add(model.layers[0].bias, tf.ones(3)))
    start = model.get_weights()

    def loop(predict):
        outs = []
        for i in range(40):
            outs.append(predict(X[i:i + 1]))
            if i % 10 == 9:
                bump()
        return np.concatenate(outs)

    expected = loop(lambda x: unpatched_predict(model, x))
    model.set_weights(start)
    kfp.patch()
    assert_same(loop(model.predict), expected)
    assert kfp.stats(model)['readahead_hits'] > 0


def test_no_window_while_kernels_are_generated(monkeypatch):
    """Until engine.warmup has run TF's first multi-row product (its kernels are made
    once per process), rows are served alone; then windows open. Results as plain."""
    import threading
    from keras import layers as L
    from keras_fastpredict.engine import warmup
    model = keras.models.Sequential([L.Dense(8, input_shape=(4,)), L.Dense(2)])
    X = np.random.RandomState(3).rand(40, 4).astype('float32')
    expected = [unpatched_predict(model, X[i:i + 1]) for i in range(40)]
    pending = threading.Event()
    monkeypatch.setattr(warmup, 'done', pending)
    kfp.patch()
    got = [model.predict(X[i:i + 1]) for i in range(20)]
    assert kfp.stats(model)['readahead_windows'] == 0
    pending.set()
    got += [model.predict(X[i:i + 1]) for i in range(20, 40)]
    assert kfp.stats(model)['readahead_windows'] > 0
    for g, e in zip(got, expected):
        assert_same(g, e)


def test_rows_loaded_one_by_one_keep_no_window():
    """``np.expand_dims(row, 0)`` of a row loaded on its own is a view of a one-row array:
    nothing can be read ahead, so no window is made or kept for it (one was made per
    call). Results as plain Keras."""
    from keras import layers as L
    from keras_fastpredict.engine import readahead
    model = keras.models.Sequential([L.Dense(8, input_shape=(4,)), L.Dense(2)])
    rows = [np.array(r) for r in np.random.RandomState(4).rand(30, 4).astype('float32')]
    expected = [unpatched_predict(model, np.expand_dims(r, 0)) for r in rows]
    kfp.patch()
    readahead.forget()
    got = [model.predict(np.expand_dims(r, 0)) for r in rows]
    for g, e in zip(got, expected):
        assert_same(g, e)
    assert readahead._windows() == {}
    assert kfp.stats(model)['fast_calls'] == 30


WARMUP_SCRIPT = '''
import sys
import numpy as np
import keras_fastpredict as kfp
from keras_fastpredict.engine import warmup
from keras import layers, models
model = models.Sequential([layers.Dense(8, input_shape=(4,)), layers.Dense(2)])
X = np.random.RandomState(0).rand(300, 4).astype('float32')
plain = model.predict(X)
kfp.patch()
fresh = [model.predict(np.expand_dims(np.array(x), 0)) for x in X[:100]]
print('AFTER_FRESH', warmup._started)
walked = [model.predict(X[i:i + 1]) for i in range(300)]
assert warmup.done.wait(60)
walked += [model.predict(X[i:i + 1]) for i in range(300)]
print('AFTER_WALK', warmup._started, kfp.stats(model)['readahead_windows'] > 0)
np.save(sys.argv[1], np.concatenate(fresh + walked))
np.save(sys.argv[2], plain)
'''


def test_kernels_are_made_only_for_a_loop_that_batches(tmp_path):
    """In a fresh process: a loop of rows loaded one by one (never several rows in a run)
    never starts engine.warmup; a loop walking an array starts it, is served row by row
    until it is done, then read ahead. Results as plain Keras in the same process."""
    import os
    import subprocess
    import sys
    script = tmp_path / 'warm.py'
    script.write_text(WARMUP_SCRIPT)
    got, plain = tmp_path / 'got.npy', tmp_path / 'plain.npy'
    out = subprocess.run([sys.executable, str(script), str(got), str(plain)],
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'AFTER_FRESH False' in out.stdout and 'AFTER_WALK True True' in out.stdout
    plain = np.load(str(plain))
    expected = np.concatenate([plain[:100], plain, plain])
    assert_same(np.load(str(got)), expected)
