"""Keras 2.2.5 backend functions (K.function) on the fast path, against plain Keras.

Each scenario calls the function with the original (unwrapped) ``Function.__call__`` and
patched, several times (the first patched call is Keras' own, later ones cached): same
results, same exceptions, the same variable updates.
"""
import gc

import numpy as np
import pytest
import tensorflow as tf
import keras
from keras import backend as K
from keras import layers
from keras.backend import tensorflow_backend as tfb

import keras_fastpredict as kfp
from keras_fastpredict.adapters import keras_function
from keras_fastpredict.engine import hooks
from conftest import (counting_embedding_model, inputs_for, raised, run_in_threads,
                      unpatched_predict)

tf1 = tf.compat.v1
_call = tfb.Function.__dict__['__call__']
PLAIN_CALL = getattr(_call, '__wrapped__', _call)


def plain(fn, inputs):
    """Plain Keras' answer, whatever the patch state."""
    return PLAIN_CALL(fn, inputs)


def outcome(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - exceptions are compared too
        return ('raised', type(exc), str(exc))


def assert_same_outcomes(got, expected):
    """Each call's outcome as plain's: the same exception (type and message), or equal
    outputs (within the README's tolerance)."""
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        if type(e) is tuple:
            assert g == e
        else:
            assert_equal(g, e, exact=False)


def assert_equal(got, expected, exact=True):
    assert type(got) is type(expected), (type(got), type(expected))
    if isinstance(expected, (list, tuple)):
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert_equal(g, e, exact)
    elif isinstance(expected, np.ndarray):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        if exact:
            np.testing.assert_array_equal(got, expected)
        else:
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    else:
        assert got == expected


def differential(fn, inputs_list, exact=True, times=3):
    """Every input through plain Keras, then patched ``times`` times each."""
    expected = [outcome(plain, fn, x) for x in inputs_list]
    with kfp.patched():
        for _ in range(times):
            for x, e in zip(inputs_list, expected):
                assert_equal(outcome(fn, x), e, exact)
    return expected


def test_model_functions_use_the_engine(models):
    model = models['dense']
    f = K.function([model.input], [model.output])
    fp = K.function([model.input, K.learning_phase()], [model.output])
    x = inputs_for('dense', 200)
    expected = unpatched_predict(model, x)
    with kfp.patched():
        got = np.concatenate([f([x[i:i + 1]])[0] for i in range(200)])
        got_phase = np.concatenate([fp([x[i:i + 1], 0])[0] for i in range(200)])
        got_tuple = np.concatenate([fp((x[i:i + 1], 0.0))[0] for i in range(200)])
    for result in (got, got_phase, got_tuple):
        np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)
    stats = kfp.stats(model)
    assert stats['fast_calls'] >= 590 and stats['readahead_hits'] > 400


def test_model_outputs_reordered_and_deferred(models):
    model = models['multi_out']
    o1, o2 = model.outputs
    f = K.function(model.inputs, [o2, o1, o2])
    x = inputs_for('multi_out', 30)
    differential(f, [[x[i:i + 1].copy()] for i in range(30)], exact=False)
    with kfp.patched():
        with kfp.batching():
            pending = [f([x[i:i + 1].copy()]) for i in range(30)]
            assert type(pending[-1][0]) is kfp.DeferredArray
        got = [np.concatenate([np.asarray(p[k]) for p in pending]) for k in range(3)]
    plain_out = plain(f, [x])
    for g, e in zip(got, plain_out):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_other_functions_cached_exactly(models):
    model = models['conv']
    hidden = model.layers[1].output            # an intermediate layer: no model's output
    f = K.function([model.input, K.learning_phase()], [hidden, model.layers[2].output])
    x = inputs_for('conv', 6)
    differential(f, [[x[i:i + 1], 0] for i in range(6)] + [[x[:3], False]])
    assert kfp.stats(model)['calls'] == 0


def test_input_forms_and_errors_as_keras(models):
    model = models['dense']
    f = K.function([model.input, K.learning_phase()], [model.layers[0].output])
    x = inputs_for('dense', 4)
    cases = [
        [x[:1], 0], (x[:2], 0), [x[:1].astype('float64'), 0], [x[:1].tolist(), 0],
        [(x[:1] * 100).astype('int32'), np.int64(0)], [x[:1], False], [x[:1], np.bool_(0)],
        # errors: Keras' and TF's own
        [x[:1, :31], 0], [x[:1, :, None], 0], [x[:1], 0, 1], [x[:1]], x[:1], 'abc',
        [None, 0], [x[:1], None], [np.array([['a'] * 32]), 0], [x[:1], [0, 1]],
    ]
    expected = differential(f, cases)
    assert sum(type(e) is tuple and e[0] == 'raised' for e in expected) >= 6


def _counting_callables(monkeypatch):
    from tensorflow.python.client import session as tf_session
    made = []
    original = tf_session.BaseSession._make_callable_from_options

    def counting(self, options):
        made.append(list(options.fetch))
        return original(self, options)
    monkeypatch.setattr(tf_session.BaseSession, '_make_callable_from_options', counting)
    return made


def _fresh_model(seed):
    np.random.seed(seed)
    return keras.models.Sequential([layers.Dense(16, activation='relu', input_shape=(6,)),
                                    layers.Dense(3)])


def test_first_call_of_a_model_function_makes_one_callable(monkeypatch):
    # The first calls of a model's function, its variables not yet initialised: served on
    # the model's path, without Keras' own callable (one callable made in all, not two),
    # the variables initialised as Keras' call does; results as plain Keras'.
    model = _fresh_model(7)
    f = K.function([model.input], [model.output])
    x = np.random.RandomState(8).rand(9, 6).astype('float32')
    made = _counting_callables(monkeypatch)
    with kfp.patched():
        got = [f([x[i:i + 1]]) for i in range(5)] + [f([x[5:]])]
    assert len(made) == 1
    monkeypatch.undo()
    g = K.function([model.input], [model.output])     # plain Keras, the same variables
    expected = [plain(g, [x[i:i + 1]]) for i in range(5)] + [plain(g, [x[5:]])]
    for a, e in zip(got, expected):
        assert_equal(a, e, exact=False)
    assert kfp.stats(model)['fast_calls'] == 6


def test_bad_inputs_of_a_model_function_raise_what_keras_raises():
    # On a first call (no callable of Keras' yet), after a good one, with the learning
    # phase: shapes, ranks and dtypes Keras' own call rejects raise its own errors.
    model = _fresh_model(9)
    K.get_session()
    x = np.random.RandomState(10).rand(3, 6).astype('float32')
    cases = [[x[:1, :5]], [x[None]], ['abc'], [x[:1]], [np.ones((1, 7))],
             [np.array([['a'] * 6])], [x[:2].astype('float64')], [x[:1, :, None]], [x[:1]]]
    for inputs in ([model.input], [model.input, K.learning_phase()]):
        extra = [] if len(inputs) == 1 else [0]
        calls = [c + extra for c in cases]
        f, g = K.function(inputs, [model.output]), K.function(inputs, [model.output])
        expected = [outcome(plain, g, c) for c in calls]
        with kfp.patched():
            got = [outcome(f, c) for c in calls]
        assert sum(type(e) is tuple for e in expected) >= 4
        assert_same_outcomes(got, expected)


def test_a_run_error_on_the_first_call_of_a_model_function_is_keras_own():
    model = keras.models.Sequential([layers.Embedding(10, 4, input_length=3),
                                     layers.Flatten(), layers.Dense(2)])
    K.get_session()
    bad, good = np.array([[1, 2, 12]]), np.array([[1, 2, 3]])
    f, g = K.function([model.input], [model.output]), K.function([model.input], [model.output])
    expected = [outcome(plain, g, [v]) for v in (bad, good, bad)]
    with kfp.patched():
        got = [outcome(f, [v]) for v in (bad, good, bad)]
    assert type(expected[0]) is tuple and expected[0][1].__name__ == 'InvalidArgumentError'
    assert got[0] == expected[0] and got[2] == expected[2]
    assert_equal(got[1], expected[1], exact=False)


def _initialised(model):
    """Which of the model's variables Keras' session holds values for (read without
    ``get_session()``, which would initialise them)."""
    session = tfb._SESSION
    return session.run([tf1.is_variable_initialized(v) for v in model.weights])


def test_inputs_that_fail_conversion_initialise_variables_as_keras_does():
    # Keras' call runs get_session() (initialising new variables) before it converts its
    # inputs: an input numpy cannot convert raises numpy's error after that, first call
    # or later, on the model path or not.
    K.get_session()
    cases = [[np.array([['a', 'b', 'c']])], [[['a', 'b', 'c']]], [[[1., 2.], [1., 2., 3.]]]]
    for inputs in cases:
        results = []
        for patched in (False, True):
            model = _fresh_model(11)            # new variables, not yet initialised
            f = K.function([model.input], [model.output])
            if patched:
                with kfp.patched():
                    got = outcome(f, inputs)
            else:
                got = outcome(plain, f, inputs)
            results.append((got, _initialised(model)))
        assert results[0][0][0] == 'raised'
        assert results[1] == results[0]


def test_tensor_inputs_go_to_keras(models):
    model = models['dense']
    f = K.function([model.input], [model.layers[0].output])
    const = tf.constant(inputs_for('dense', 2))
    with kfp.patched():
        for _ in range(2):
            assert_equal(f([const]), plain(f, [const]))


def test_updates_run_once_per_call_and_settle():
    v = K.variable(0.0)
    inc = K.placeholder(shape=())
    f = K.function([inc], [v * 1.0], updates=[(v, v + inc)])
    K.get_session()
    keras_function_state = None
    values_plain = [plain(f, [1.0])[0] for _ in range(5)]
    gen = hooks.state.generation
    with kfp.patched():
        values = [f([1.0])[0] for _ in range(5)]
        keras_function_state = f.__dict__.get(keras_function._ATTR)
    assert hooks.state.generation >= gen + 5        # every update call settled first
    assert keras_function_state is not None and keras_function_state.updates
    # Each call read, then added once: the patched calls continue the plain sequence.
    assert [float(a) for a in values] == [float(b) + 5 for b in values_plain]
    assert float(K.get_value(v)) == 10.0


def test_pure_calls_settle_nothing(models):
    model = models['dense']
    f = K.function([model.input], [model.layers[0].output])
    x = inputs_for('dense', 3)
    with kfp.patched():
        f([x]), f([x])
        gen = hooks.state.generation
        for _ in range(5):
            f([x])
        assert hooks.state.generation == gen


def test_function_options_left_to_keras(models):
    model = models['dense']
    x = inputs_for('dense', 2)
    meta = tf1.RunMetadata()
    with_meta = K.function([model.input], [model.output], run_metadata=meta)
    extra = K.placeholder(shape=())
    with_feed = K.function([model.input], [model.output * extra], feed_dict={extra: 2.0})
    with_fetches = K.function([model.input], [model.output],
                              fetches=[tf.reduce_sum(model.output)])
    for fn in (with_meta, with_feed, with_fetches):
        differential(fn, [[x]], exact=False)
    assert with_meta.__dict__[keras_function._ATTR].refused
    assert with_fetches.__dict__[keras_function._ATTR].updates


def test_new_variables_are_initialised_as_keras_does():
    inp = K.placeholder(shape=(None, 3))
    f = K.function([inp], [inp * 2.0])
    with kfp.patched():
        for _ in range(3):
            f([np.ones((1, 3))])
        late = K.variable(np.ones(2))         # a variable made after: Keras initialises it
        assert not getattr(late, '_keras_initialized', False)
        f([np.ones((1, 3))])
        assert late._keras_initialized
        np.testing.assert_array_equal(K.get_session().run(late), np.ones(2))


def test_sessions_replaced_and_closed():
    previous = K.get_session()
    graph = tf.Graph()
    try:
        K.set_session(tf1.Session(graph=graph))
        with graph.as_default():
            model = keras.models.Sequential([layers.Dense(3, input_shape=(4,))])
            f = K.function([model.input], [model.output * 2.0])
            weights = model.get_weights()
        x = np.random.RandomState(2).rand(5, 4).astype('float32')
        with kfp.patched():
            for _ in range(3):
                first = f([x])
            second_session = tf1.Session(graph=graph)
            K.set_session(second_session)
            with graph.as_default():
                model.set_weights([w * 0 for w in weights])  # a different session's weights
            zeros = [f([x]) for _ in range(3)]
            for z in zeros:
                np.testing.assert_array_equal(z[0], np.zeros((5, 3), 'float32'))
            assert np.abs(first[0]).sum() > 0
            second_session.close()
            expected = raised(plain, f, [x])
            for _ in range(2):
                assert raised(f, [x]) == expected
    finally:
        K.set_session(previous)


def test_threads_calling_one_function(models):
    model = models['lstm']
    f = K.function([model.input], [model.layers[0].output])
    x = inputs_for('lstm', 8 * 30)
    expected = [plain(f, [x[i:i + 1]])[0] for i in range(len(x))]
    got = {}

    def work(t):
        for i in range(t * 30, t * 30 + 30):
            got[i] = f([x[i:i + 1]])[0]

    with kfp.patched():
        errors = run_in_threads(8, work)
    assert not errors
    for i, e in enumerate(expected):
        np.testing.assert_allclose(got[i], e, rtol=1e-6)


def test_keras_fallbacks_and_training_through_the_adapter(models):
    # Keras' own predict (a fallback: verbose=1) and fit run their backend functions
    # through this adapter: same predictions, the same trained weights.
    model = models['dense']
    x = inputs_for('dense', 64)
    with kfp.patched():
        for _ in range(2):
            np.testing.assert_allclose(model.predict(x, verbose=1), unpatched_predict(model, x),
                                       rtol=1e-5, atol=1e-6)
    np.random.seed(4)
    y = np.random.rand(64, 2).astype('float32')
    start = None
    trained = []
    for patch in (False, True):
        net = keras.models.Sequential([layers.Dense(2, input_shape=(32,))])
        net.compile('sgd', 'mse')
        if start is None:
            start = net.get_weights()
        net.set_weights(start)
        if patch:
            with kfp.patched():
                net.fit(x, y, epochs=3, batch_size=16, shuffle=False, verbose=0)
        else:
            net.fit(x, y, epochs=3, batch_size=16, shuffle=False, verbose=0)
        trained.append(net.get_weights())
    for a, b in zip(*trained):
        np.testing.assert_array_equal(a, b)


def test_memory_flat_over_many_cached_calls(models):
    model = models['dense']
    f = K.function([model.input, K.learning_phase()], [model.layers[1].output])
    x = inputs_for('dense', 500)

    def rss_mb():
        with open('/proc/self/status') as status:
            for line in status:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1]) / 1024.0

    graph = model.input.graph
    with kfp.patched():
        for i in range(10000):
            f([x[i % 500][None].copy(), 0])
        gc.collect()
        ops, start = len(graph.get_operations()), rss_mb()
        for i in range(50000):
            f([x[i % 500][None].copy(), 0])
        gc.collect()
        grown = rss_mb() - start
    assert grown < 8, 'RSS grew %.1f MB over 50,000 cached calls' % grown
    assert len(graph.get_operations()) == ops


@pytest.mark.parametrize('name', ['multi_in', 'lstm'])
def test_model_functions_per_row_equal_keras(models, name):
    model = models[name]
    f = K.function(model.inputs + [K.learning_phase()], model.outputs)
    x = inputs_for(name, 40)
    rows = [([a[i:i + 1] for a in x] if isinstance(x, list) else [x[i:i + 1]]) + [0]
            for i in range(40)]
    differential(f, rows, exact=False, times=2)
    assert kfp.stats(model)['fast_calls'] >= 70


def test_a_thread_calling_while_another_binds_the_model_entry(monkeypatch):
    """A second thread's call arriving while the first binds the function to its model's
    compiled entry gets plain Keras' answer (it once read a half-bound state and raised
    AttributeError: model_pure)."""
    import sys
    model = keras.Sequential([layers.Dense(4, input_shape=(3,))])
    f = K.function([model.input], [model.output])
    x = np.random.RandomState(2).rand(3, 3).astype('float32')
    expected = [plain(f, [x[i:i + 1]]) for i in range(3)]
    seen = {}
    is_pure = keras_function._State.is_pure

    def binding(st, phase_fed_true):
        # The first model-path call of this function: another thread calls meanwhile.
        if not seen and sys._getframe(1).f_code.co_name == '_model_entry':
            seen['started'] = True
            run_in_threads(1, lambda _: seen.__setitem__('other', outcome(f, [x[2:3]])))
        return is_pure(st, phase_fed_true)

    monkeypatch.setattr(keras_function._State, 'is_pure', binding)
    with kfp.patched():
        got = [f([x[i:i + 1]]) for i in range(2)]
    assert seen.get('started'), 'the model path was not taken'
    assert_equal(seen['other'], expected[2], exact=False)
    for a, e in zip(got, expected):
        assert_equal(a, e, exact=False)


def test_first_calls_of_model_functions_in_every_form_as_keras():
    # Each call the first of a new function (no callable of Keras' yet): inputs reordered,
    # outputs reordered and repeated, the learning phase fed 0 in any position, tuples,
    # int lists, float64, NaN, batch 0, rows that differ, lists too short or too long,
    # scalars, None and tensors: the same results and errors as plain Keras'.
    np.random.seed(14)
    a, b = layers.Input((6,), name='ka'), layers.Input((4,), name='kb')
    h = layers.Dropout(0.5)(layers.concatenate([layers.Dense(8)(a), layers.Dense(8)(b)]))
    model = keras.models.Model([a, b], [layers.Dense(2)(h), layers.Dense(3)(h)])
    (o1, o2), lp = model.outputs, K.learning_phase()
    K.get_session()
    rs = np.random.RandomState(15)
    xa, xb = rs.rand(4, 6).astype('float32'), rs.rand(4, 4).astype('float32')
    cases = [([b, a], [o2, o1, o2], [xb[:1], xa[:1]]), ([lp, a, b], [o1], [0, xa[:2], xb[:2]]),
             ([a, b, lp], [o1], [xa[:2], xb[:2], np.bool_(False)]),
             ([a, b], [o1], (xa[:1], xb[:1])), ([a, b], [o1], [[[1] * 6], [[2] * 4]]),
             ([a, b], [o2], [xa[:1].astype('float64'), xb[:1].astype('float64')]),
             ([a, b], [o1], [np.full((1, 6), np.nan, 'float32'), xb[:1]]),
             ([a, b], [o1, o2], [xa[:0], xb[:0]]), ([a, b], [o1], [xa[:1], xb[:2]]),
             ([a, b], [o1], [xa[:1]]), ([a, b], [o1], [xa[:1], xb[:1], xb[:1]]),
             ([a, b], [o1], [3.0, xb[:1]]), ([a, b], [o1], [None, xb[:1]]),
             ([a, b], [o1], [tf.constant(xa[:1]), xb[:1]])]
    expected = [outcome(plain, K.function(i, o), x) for i, o, x in cases]
    functions = [K.function(i, o) for i, o, _ in cases]
    with kfp.patched():
        got = [outcome(f, x) for f, (_, _, x) in zip(functions, cases)]
    assert sum(type(e) is tuple for e in expected) == 4
    assert_same_outcomes(got, expected)
    assert kfp.stats(model)['fast_calls'] == 7         # (first calls on the model path)


def test_first_calls_of_a_model_function_in_a_thread_run_side_effects_as_keras():
    # A model with an op that counts its runs (before an Embedding that fails on an index
    # out of range), on a graph of its own with its session as the default one: first calls
    # of new functions from another thread (its default graph not the model's), with the
    # variables not yet initialised: results, errors, runs and initialisation as Keras'.
    def build():
        graph, counter, model = counting_embedding_model(
            keras.initializers.Constant(np.arange(20.).reshape(10, 2)))
        with graph.as_default():
            functions = [K.function([model.input], [model.output]) for _ in range(4)]
        return model, counter, functions, tf1.Session(graph=graph)
    calls = [np.array([[1, 2, 12]]), np.array([[1, 2, 3], [4, 5, 6]]), np.array([[7, 8, 9]]),
             np.array([[1, 2, 12]])]

    def loop(call, model, counter, functions, sess):
        results = []
        with sess.as_default():
            for f, v in zip(functions, calls):
                results.append(outcome(call, f, [v]))
                results.append(sess.run(counter))
            results.append(sess.run([tf1.is_variable_initialized(w) for w in model.weights]))
        return results

    def in_thread(call):
        parts = build()
        out = []
        assert not run_in_threads(1, lambda t: out.append(loop(call, *parts)))
        parts[3].close()
        return out[0], parts[0]
    expected, _ = in_thread(plain)
    with kfp.patched():
        got, model = in_thread(lambda f, x: f(x))
    assert type(expected[0]) is tuple and expected[1] == 1 and expected[-1] == [True]
    assert_same_outcomes(got, expected)
    assert kfp.stats(model)['fast_calls'] == 4         # (all four on the model path)
