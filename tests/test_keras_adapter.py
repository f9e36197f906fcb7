"""The fast path against plain Keras: same outputs, same exceptions, fallbacks untouched."""
import threading
import time

import numpy as np
import pytest
import keras
import tensorflow as tf
from keras import backend as K
from keras import layers

import keras_fastpredict as kfp
from conftest import (ORIGINAL, assert_same, inputs_for, raised, run_in_threads,
                      unpatched_predict, unpatched_predict_on_batch)

MODEL_NAMES = ['dense', 'conv', 'lstm', 'multi_in', 'multi_out', 'dropout']


def rows_of(x, i, j):
    return [a[i:j] for a in x] if isinstance(x, list) else x[i:j]


@pytest.mark.parametrize('name', MODEL_NAMES)
def test_single_rows_equal_keras(models, name):
    model = models[name]
    x = inputs_for(name, 40)
    expected = [unpatched_predict(model, rows_of(x, i, i + 1)) for i in range(40)]
    kfp.patch(readahead=False, concurrent=False)
    got = [model.predict(rows_of(x, i, i + 1)) for i in range(40)]
    for g, e in zip(got, expected):
        assert_same(g, e)
    assert kfp.stats(model)['fast_calls'] == 40


@pytest.mark.parametrize('name', MODEL_NAMES)
@pytest.mark.parametrize('batch_size', [None, 7, 5000])
def test_large_arrays_equal_keras(models, name, batch_size):
    model = models[name]
    x = inputs_for(name, 3000 if name != 'conv' else 700)
    expected = unpatched_predict(model, x, batch_size=batch_size)
    with kfp.patched():
        got = model.predict(x, batch_size=batch_size)
        got_on_batch = model.predict_on_batch(rows_of(x, 0, 100))
    assert_same(got, expected)
    assert_same(got_on_batch, unpatched_predict_on_batch(model, rows_of(x, 0, 100)))
    stats = kfp.stats(model)
    assert stats['fallbacks'] == 0, stats['fallback_reasons']


def test_dict_and_list_inputs(models):
    model = models['multi_in']
    a, b = inputs_for('multi_in', 9)
    expected = unpatched_predict(model, [a, b])
    with kfp.patched():
        assert_same(model.predict({'a': a, 'b': b}), expected)
        assert_same(model.predict({'b': b, 'a': a, 'extra': a}), expected)
        assert_same(model.predict([a, b]), expected)
    single = models['dense']
    x = inputs_for('dense', 3)
    with kfp.patched():
        assert_same(single.predict([x]), unpatched_predict(single, [x]))
        assert_same(single.predict({single.input_names[0]: x}), unpatched_predict(single, x))


def test_input_dtypes_cast_as_keras_does(models):
    model = models['dense']
    x = inputs_for('dense', 5)
    for variant in (x.astype('float64'), (x * 10).astype('int64'), x > 0.5,
                    np.asfortranarray(x), x[:, ::-1], x.astype('float16')):
        with kfp.patched():
            got = model.predict(variant)
        assert_same(got, unpatched_predict(model, variant))


def test_sequential_siblings(models):
    model = models['dense']
    x = inputs_for('dense', 300)
    expected_proba = model.predict_proba(x)
    expected_classes = model.predict_classes(x)
    with kfp.patched():
        assert_same(model.predict_proba(x), expected_proba)
        np.testing.assert_array_equal(model.predict_classes(x), expected_classes)
        np.testing.assert_array_equal(model.predict_classes(x, batch_size=5), expected_classes)
    assert kfp.stats(model)['fast_calls'] == 3


BAD_INPUTS = {
    'wrong feature size': lambda: np.zeros((2, 31), 'float32'),
    'wrong rank': lambda: np.zeros((2, 32, 1), 'float32'),
    'rank one': lambda: np.zeros(32, 'float32'),
    'scalar array': lambda: np.float32(3.0),
    'strings': lambda: np.array([['a'] * 32]),
    'numeric strings': lambda: np.array([['0.5'] * 32]),
    'objects': lambda: np.array([[object()] * 32], dtype=object),
    'none': lambda: None,
    'string': lambda: 'not an array',
    'list of lists': lambda: [[0.1] * 32],
    'two arrays for one input': lambda: [np.zeros((1, 32)), np.zeros((1, 32))],
    'tuple': lambda: (np.zeros((1, 32)),),
    'empty batch': lambda: np.zeros((0, 32), 'float32'),
    'nan and inf': lambda: np.array([[np.nan] * 16 + [np.inf] * 16], 'float32'),
    'complex': lambda: np.ones((1, 32), np.complex64),
    'dict missing key': lambda: {'nope': np.zeros((1, 32))},
}


def assert_behaves_as_keras(model, make_input, unpatched=unpatched_predict):
    """Same exception type and message, or the same output; twice, since the second call
    of an input signature takes the cached path."""
    expected_error = raised(unpatched, model, make_input())
    expected = None if expected_error else unpatched(model, make_input())
    for _ in range(2):
        with kfp.patched():
            got_error = raised(model.predict, make_input())
            got = None if got_error else model.predict(make_input())
        assert got_error == expected_error
        if expected_error is None:
            if isinstance(expected, list) and not expected:
                assert got == expected            # Keras returns [] for an empty batch
            else:
                assert_same(got, expected)
    return expected_error


@pytest.mark.parametrize('case', sorted(BAD_INPUTS))
def test_bad_input_behaves_as_keras(flavour, case):
    assert_behaves_as_keras(flavour.models['dense'], BAD_INPUTS[case],
                            flavour.unpatched_predict)


def test_bad_input_for_multi_input_model(flavour):
    model = flavour.models['multi_in']
    a, b = inputs_for('multi_in', 3)
    cases = [[a], [a, b, b], [a, b[:2]], [b, a], {'a': a}, [a.astype(str), b],
             [a[:, :, None], b], (a, b), [a, None], [a[:0], b[:0]]]
    errors = [assert_behaves_as_keras(model, lambda: case, flavour.unpatched_predict)
              for case in cases]
    assert sum(e is not None for e in errors) >= 6


def test_unusual_arguments_go_to_keras(models):
    model = models['dense']
    x = inputs_for('dense', 10)

    def gen():
        while True:
            yield x

    with kfp.patched():
        assert_same(model.predict(x, verbose=0, batch_size=4), unpatched_predict(model, x))
        model.predict(x, verbose=1)
        model.predict(gen(), steps=2)
        assert raised(model.predict, x, batch_size=2.5) == raised(unpatched_predict, model, x,
                                                                   batch_size=2.5)
        assert raised(model.predict, x, nonsense=1) == raised(unpatched_predict, model, x,
                                                               nonsense=1)
        assert raised(model.predict) == raised(ORIGINAL['predict'], model)
    reasons = kfp.stats(model)['fallback_reasons']
    assert reasons['verbose, steps or callbacks'] == 2
    assert reasons['batch_size'] == 1


def test_stateful_and_fixed_batch_models_take_the_fast_path_unmerged():
    stateful = keras.models.Sequential([
        layers.LSTM(4, stateful=True, batch_input_shape=(1, 3, 2)), layers.Dense(1)])
    fixed = keras.models.Sequential([layers.Dense(3, batch_input_shape=(4, 5))])
    xs = np.random.rand(6, 1, 3, 2).astype('float32')
    expected = [unpatched_predict(stateful, x) for x in xs]
    stateful.reset_states()
    xf = np.random.rand(4, 5).astype('float32')
    with kfp.patched():
        got = [stateful.predict(x) for x in xs]      # state carries over call to call
        assert_same(fixed.predict(xf), unpatched_predict(fixed, xf))
    for g, e in zip(got, expected):
        assert_same(g, e)
    assert kfp.stats(stateful)['fast_calls'] == 6 and kfp.stats(stateful)['fallbacks'] == 0
    assert kfp.stats(fixed)['fast_calls'] == 1 and kfp.stats(fixed)['fallbacks'] == 0
    assert kfp.stats(stateful)['batches'] == kfp.stats(fixed)['batches'] == 0


def test_unbuilt_model_goes_to_keras():
    model = keras.models.Sequential([layers.Dense(3)])
    x = np.random.rand(2, 4).astype('float32')
    with kfp.patched():
        first = model.predict(x)          # Keras builds the model on this call
        second = model.predict(x)         # then the fast path serves it
    assert_same(second, first)
    assert kfp.stats(model)['fast_calls'] == 1


def test_learning_phase_is_inference(models):
    model = models['dropout']
    x = inputs_for('dropout', 50)
    with kfp.patched():
        a = model.predict(x)
        b = model.predict(x)
    np.testing.assert_array_equal(a, b)
    assert_same(a, unpatched_predict(model, x))


def test_threads_get_their_own_rows(models):
    model = models['dense']
    x = inputs_for('dense', 8 * 50)
    expected = unpatched_predict(model, x, batch_size=1)
    results = {}

    def work(t):
        results[t] = [model.predict(x[i:i + 1]) for i in range(t * 50, t * 50 + 50)]

    with kfp.patched():
        errors = run_in_threads(8, work)
    assert not errors
    for t in range(8):
        assert_same(np.concatenate(results[t]), expected[t * 50:t * 50 + 50])


def test_new_thread_needs_no_graph_workaround():
    # A model on a graph that is not a new thread's default graph, first predicted in a
    # thread (keras#2397): plain Keras needs `with graph.as_default()` there.
    previous = K.get_session()
    graph = tf.Graph()
    try:
        with graph.as_default():
            K.set_session(tf.Session(graph=graph))
            model = keras.models.Sequential([layers.Dense(3, input_shape=(4,))])
        x = np.random.rand(5, 4).astype('float32')
        out = {}

        def in_thread(key):
            try:
                out[key] = model.predict(x)
            except Exception as exc:  # noqa: BLE001
                out[key] = exc

        th = threading.Thread(target=in_thread, args=('plain',))
        th.start()
        th.join()
        assert isinstance(out['plain'], Exception)
        with kfp.patched():
            th = threading.Thread(target=in_thread, args=('patched',))
            th.start()
            th.join()
        with graph.as_default():
            expected = unpatched_predict(model, x)
        assert_same(out['patched'], expected)
    finally:
        K.set_session(previous)


def test_outputs_are_independent_writable_arrays(models):
    model = models['dense']
    x = inputs_for('dense', 4)
    with kfp.patched():
        a = model.predict(x[:1])
        b = model.predict(x[1:2])
    a[:] = 0
    assert a.flags.writeable and np.all(b != 0)


def test_model_whose_output_is_its_input_is_left_to_keras():
    inp = layers.Input((4,))
    model = keras.models.Model(inp, inp)
    x = np.ones((2, 4), 'float32')
    expected = raised(unpatched_predict, model, x)
    with kfp.patched():
        assert raised(model.predict, x) == expected
    (reason, count), = kfp.stats(model)['fallback_reasons'].items()
    assert reason.startswith('no callable:') and 'both fed and fetched' in reason
    assert count == 1


def test_first_call_in_a_new_thread_with_no_session_yet():
    """keras#2397: TF's default graph is per thread, so a new thread's first call finds
    an empty graph; with no Keras session yet, plain Keras makes it there and fails. The
    patched call makes it on the model's graph, and later calls (main thread, plain
    Keras after unpatch) run on that session as usual. In a fresh process."""
    import os
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent('''
        import threading, numpy as np, keras
        from keras.engine.training import Model
        import keras_fastpredict as kfp
        model = keras.models.Sequential([keras.layers.Dense(3, input_shape=(4,),
                                                            kernel_initializer='ones')])
        x = np.arange(8, dtype='float32').reshape(2, 4)
        kfp.patch()
        out = []
        t = threading.Thread(target=lambda: out.append(model.predict(x)))
        t.start(); t.join()
        kfp.unpatch()
        np.testing.assert_allclose(out[0], Model.predict(model, x), rtol=1e-6)
        print('ok', kfp.stats(model)['fast_calls'])
    ''')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=root)
    done = subprocess.run([sys.executable, '-c', script], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=300,
                          cwd='/')
    assert done.returncode == 0 and done.stdout.strip() == 'ok 1', done.stderr[-3000:]


@pytest.mark.parametrize('flavour', ['keras', 'tf.keras'], indirect=True)
def test_first_calls_from_many_threads_at_once_build_one_entry(flavour, monkeypatch):
    # A server's first burst: 16 threads' first patched calls of one model arrive
    # together. Each found no entry and built its own (a session callable each, 16 for
    # one model: a first burst slower than plain Keras' once, in review); one is built
    # and the others use it. Results as plain Keras'.
    from keras_fastpredict.engine import compiled
    model = flavour.keras.Sequential([flavour.layers.Dense(8, input_shape=(4,)),
                                      flavour.layers.Dense(3)])
    X = np.random.RandomState(0).standard_normal((16, 4)).astype('float32')
    expected = flavour.unpatched_predict(model, X, batch_size=1)
    built = []
    init = compiled.CompiledModel.__init__

    def slow_init(self, *args, **kwargs):
        built.append(1)
        if len(built) == 1:
            time.sleep(0.3)         # the others reach the build meanwhile
        init(self, *args, **kwargs)
    monkeypatch.setattr(compiled.CompiledModel, '__init__', slow_init)
    kfp.patch()
    graph = tf.compat.v1.get_default_graph()
    session = flavour.keras.backend.get_session()
    got = [None] * 16

    def call(i):
        with graph.as_default(), session.as_default():
            got[i] = model.predict(X[i:i + 1])
    assert run_in_threads(16, call) == []
    assert len(built) == 1
    assert_same(np.concatenate(got), expected)
