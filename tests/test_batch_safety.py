"""Batch safety from the graph (issue 9, items 1-4 and 19): models whose rows depend on
each other are never batched, wherever the op hides; every way in gives plain Keras'
answer, compared in the same process."""
import warnings

import numpy as np
import pytest
import tensorflow as tf
from keras import backend as K
from keras import layers as L
from keras.models import Model, Sequential

import keras_fastpredict as kfp
from keras_fastpredict.adapters import keras as keras_adapter
from keras_fastpredict.engine import batch_safety
from conftest import assert_same, unpatched_predict
from conftest import unpatched_predict_on_batch as plain_on_batch


def every_way(model, X):
    """The same predictions through every way in: predict(X), predict_on_batch, a one-row
    loop over views (read-ahead), a collect loop under batching(), defer=True, threads."""
    out = {'predict': model.predict(X), 'on_batch': model.predict_on_batch(X[:20])}
    out['rows'] = np.concatenate([model.predict(X[i:i + 1]) for i in range(len(X))])
    with kfp.batching():
        preds = [model.predict(X[i:i + 1]) for i in range(len(X))]
    out['batching'] = np.concatenate(preds)
    fresh = [np.array(X[i:i + 1]) for i in range(len(X))]    # not views: deferral, not read-ahead
    with kfp.batching(readahead=False):
        preds = [model.predict(x) for x in fresh]
    out['deferred'] = np.concatenate(preds)
    return out


def plain_every_way(model, X):
    rows = np.concatenate([unpatched_predict(model, X[i:i + 1]) for i in range(len(X))])
    return {'predict': unpatched_predict(model, X), 'on_batch': plain_on_batch(model, X[:20]),
            'rows': rows, 'batching': rows, 'deferred': rows}


def check_every_way(model, X):
    expected = plain_every_way(model, X)
    kfp.patch()
    got = every_way(model, X)
    for way in expected:
        assert_same(got[way], expected[way])


def mean_free(t):
    return t - K.mean(t, axis=0, keepdims=True)


def rand(*shape, seed=0):
    return np.random.RandomState(seed).rand(*shape).astype('float32')


def test_batch_norm_in_training_mode_is_never_batched():
    inp = L.Input((4,))
    x = L.BatchNormalization()(L.Dense(8)(inp), training=True)
    model = Model(inp, L.Dense(3)(x))
    X = rand(100, 4)
    check_every_way(model, X)
    assert keras_adapter.lookup(model).batch_safe is False
    # One row alone normalises to zeros, as plain Keras gives it.
    kfp.patch()
    np.testing.assert_allclose(model.predict(X[5:6]), unpatched_predict(model, X[5:6]),
                               atol=1e-6)


def test_batch_norm_built_under_learning_phase_1_predicted_under_0():
    graph = tf.Graph()
    with graph.as_default(), tf.Session(graph=graph).as_default():
        K.set_learning_phase(1)
        model = Sequential([L.Dense(8, input_shape=(4,)), L.BatchNormalization(),
                            L.Dense(3)])
        K.set_learning_phase(0)
        check_every_way(model, rand(70, 4))
        assert keras_adapter.lookup(model).batch_safe is False


def test_batch_norm_at_inference_is_batched():
    model = Sequential([L.Dense(8, input_shape=(4,)), L.BatchNormalization(),
                        L.Dropout(0.5), L.Dense(3)])
    model.layers[1].set_weights([np.full(8, 2.0), np.full(8, 0.5), np.full(8, 0.3),
                                 np.full(8, 4.0)])
    check_every_way(model, rand(50, 4))
    assert keras_adapter.lookup(model).batch_safe is True
    assert kfp.stats(model)['readahead_hits'] > 0


@pytest.mark.parametrize('kind', ['time_distributed', 'nested', 'bidirectional_lambda'])
def test_row_mixing_hidden_in_wrappers_and_nested_models(kind):
    if kind == 'time_distributed':
        model = Sequential([L.TimeDistributed(L.Lambda(mean_free), input_shape=(5, 4)),
                            L.Flatten(), L.Dense(2)])
        X = rand(40, 5, 4)
    elif kind == 'nested':
        inner = Sequential([L.Dense(4, input_shape=(4,)), L.Lambda(mean_free)])
        inp = L.Input((4,))
        model = Model(inp, L.Dense(2)(inner(inp)))
        X = rand(40, 4)
    else:
        inner = Sequential([L.TimeDistributed(L.Dense(3), input_shape=(5, 4)),
                            L.Lambda(mean_free)])
        inp = L.Input((5, 4))
        model = Model(inp, L.Flatten()(inner(inp)))
        X = rand(40, 5, 4)
    check_every_way(model, X)
    assert keras_adapter.lookup(model).batch_safe is False
    assert 'reduces over the batch axis' in keras_adapter.lookup(model).batching_reason


def test_batch_size_dependent_lambda_is_never_batched():
    model = Sequential([L.Dense(4, input_shape=(4,)),
                        L.Lambda(lambda t: t * K.cast(K.shape(t)[0], 'float32'))])
    check_every_way(model, rand(40, 4))
    assert keras_adapter.lookup(model).batch_safe is False


def while_loop_mean_free(t):
    """Mixes rows inside a while loop, which the graph analysis does not model."""
    return tf.while_loop(lambda i, a: i < 1,
                         lambda i, a: (i + 1, a - tf.reduce_mean(a, axis=0, keepdims=True)),
                         [tf.constant(0), t])[1]


def test_verification_is_not_fooled_by_equal_rows():
    model = Sequential([L.Dense(4, input_shape=(4,)), L.Lambda(while_loop_mean_free)])
    X = rand(60, 4)
    X[:12] = 0
    assert keras_adapter.lookup(model).batch_safe is None     # the graph cannot settle it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        check_every_way(model, X)
    assert keras_adapter.lookup(model).batch_safe is False
    assert any('not batched' in str(w.message) for w in caught)


def test_row_wise_while_loop_is_verified_then_batched():
    model = Sequential([L.LSTM(6, input_shape=(5, 4)), L.Dense(2)])
    X = rand(60, 5, 4)
    X[:12] = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        check_every_way(model, X)
    assert not [w for w in caught if 'keras_fastpredict' in str(w.message)]
    assert keras_adapter.lookup(model).batch_safe is True
    assert kfp.stats(model)['verified'] == 1


@pytest.mark.parametrize('how', ['sum_over_batch', 'concat_over_batch', 'constant'])
def test_outputs_without_one_row_per_input_row_are_left_to_keras(how):
    fn = {'sum_over_batch': lambda t: K.sum(t, axis=0, keepdims=True),
          'concat_over_batch': lambda t: K.concatenate([t, t], axis=0),
          'constant': lambda t: K.ones((1, 4))}[how]
    model = Sequential([L.Dense(4, input_shape=(4,)), L.Lambda(fn)])
    X = rand(70, 4)
    calls = {'short': lambda f, g: f(model, X[:10]), 'all': lambda f, g: f(model, X),
             'on_batch': lambda f, g: g(model, X[:10]), 'one': lambda f, g: f(model, X[3:4])}

    def outcome(call, f, g):
        try:
            return call(f, g)
        except Exception as exc:  # noqa: BLE001 - plain Keras may raise: so must we
            return type(exc), str(exc)

    expected = {k: outcome(c, unpatched_predict, plain_on_batch) for k, c in calls.items()}
    kfp.patch()
    with kfp.batching():
        got = {k: outcome(c, lambda m, x: m.predict(x), lambda m, x: m.predict_on_batch(x))
               for k, c in calls.items()}
    for key in expected:
        if isinstance(expected[key], tuple):
            assert got[key] == expected[key]
        else:
            assert_same(got[key], expected[key])


def test_declared_output_shape_does_not_matter():
    model = Sequential([L.Dense(4, input_shape=(4,)),
                        L.Lambda(lambda t: K.concatenate([t, t]), output_shape=(4,))])
    check_every_way(model, rand(30, 4))
    assert keras_adapter.lookup(model).row_shapes == [(8,)]


def test_large_values_within_the_promised_tolerance_and_no_false_warning():
    """Raw uint8 images into Dense layers: batched and one-row results differ in the last
    digits of large sums; the promise scales with the magnitude of each row."""
    model = Sequential([L.Dense(64, activation='relu', input_shape=(784,)), L.Dense(10),
                        L.Lambda(lambda t: t * 1.0)])
    X = np.random.RandomState(3).randint(0, 256, (200, 784)).astype('uint8')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        check_every_way(model, X)
    assert not [w for w in caught if 'keras_fastpredict' in str(w.message)]
    assert keras_adapter.lookup(model).batch_safe is True


@pytest.mark.parametrize('build, verdict', [
    (lambda: Sequential([L.Conv2D(4, 3, input_shape=(8, 8, 3)), L.MaxPooling2D(),
                         L.Flatten(), L.Dense(3)]), batch_safety.SAFE),
    (lambda: Sequential([L.Embedding(50, 8, input_length=6), L.Flatten(), L.Dense(2)]),
     batch_safety.SAFE),
    (lambda: Sequential([L.Reshape((2, 8), input_shape=(16,)), L.Permute((2, 1)),
                         L.Flatten()]), batch_safety.SAFE),
    (lambda: Sequential([L.TimeDistributed(L.Dense(3), input_shape=(5, 4)), L.Flatten()]),
     batch_safety.SAFE),
    (lambda: Sequential([L.LSTM(6, input_shape=(5, 4), unroll=True)]), batch_safety.SAFE),
    (lambda: Sequential([L.Bidirectional(L.GRU(3, unroll=True), input_shape=(5, 4))]),
     batch_safety.SAFE),
    (lambda: Sequential([L.LSTM(6, input_shape=(5, 4))]), batch_safety.UNKNOWN),
    (lambda: Sequential([L.Dense(4, input_shape=(4,)), L.Lambda(mean_free)]),
     batch_safety.UNSAFE),
])
def test_verdicts(build, verdict):
    model = build()
    sess = K.get_session()
    got, _ = batch_safety.analyse(model.outputs[0].graph, model._feed_inputs, model.outputs,
                                  lambda t, feed: sess.run(t, feed))
    assert got == verdict


class CountsSteps(L.Layer):
    """Adds how many times it ran: a side effect per run."""

    def build(self, input_shape):
        self.steps = self.add_weight('steps', (), initializer='zeros', trainable=False)
        self.built = True

    def call(self, x):
        with tf.control_dependencies([tf.assign_add(self.steps, 1.0)]):
            return x + tf.identity(self.steps)


@pytest.mark.parametrize('kind', ['random_draw', 'mc_dropout', 'counter'])
def test_side_effect_ops_run_once_per_call_as_in_plain_keras(kind):
    """Random draws and counters depend on how many runs are made: such a model is never
    batched or read ahead, and no check runs it an extra time. Twin models with the same
    op seeds draw the same streams, plain and patched."""
    def build():
        inp = L.Input((4,))
        if kind == 'random_draw':
            out = L.Lambda(lambda t: t + K.random_normal((4,), seed=5))(inp)
        elif kind == 'mc_dropout':
            out = L.Dense(3, kernel_initializer='ones')(
                L.Dropout(0.5, noise_shape=(1, 4), seed=3)(inp, training=True))
        else:
            out = CountsSteps()(inp)
        return Model(inp, out)

    plain_model, patched_model = build(), build()
    X = rand(30, 4)
    expected = [unpatched_predict(plain_model, X[i:i + 1]) for i in range(30)]
    expected.append(unpatched_predict(plain_model, X))
    kfp.patch()
    got = [patched_model.predict(X[i:i + 1]) for i in range(30)]
    got.append(patched_model.predict(X))
    for g, e in zip(got, expected):
        assert_same(g, e)
    entry = keras_adapter.lookup(patched_model)
    assert entry.batch_safe is False and 'side effects' in entry.batching_reason
    assert kfp.stats(patched_model)['readahead_hits'] == 0


def test_a_branch_chosen_by_a_variable_that_mixes_rows():
    """tf.cond on a variable: either branch may run, so one that mixes rows makes the
    model unbatchable, whichever branch the first calls took."""
    flag = K.variable(False, dtype='bool')
    inp = L.Input((4,))
    model = Model(inp, L.Lambda(lambda t: K.switch(flag, lambda: mean_free(t), lambda: t))(inp))
    X = rand(40, 4)

    def run(predict):
        K.set_value(flag, False)
        first = [predict(X[i:i + 1]) for i in range(10)]
        K.set_value(flag, True)
        return first + [predict(X[i:i + 1]) for i in range(10, 40)] + [predict(X)]

    expected = run(lambda x: unpatched_predict(model, x))
    kfp.patch()
    for g, e in zip(run(model.predict), expected):
        assert_same(g, e)
    assert keras_adapter.lookup(model).batch_safe is False


def test_verification_needs_rows_that_vary_in_every_position():
    """A while loop (map_fn, which the analysis does not model) mixes rows through the
    first feature only; the first rows differ elsewhere but share that feature."""
    inp = L.Input((4,))
    model = Model(inp, L.Lambda(
        lambda t: tf.map_fn(lambda r: r / tf.reduce_max(t[:, 0]), t))(inp))
    X = rand(60, 4)
    X[:10, 0] = 1.0
    check_every_way(model, X)
    assert keras_adapter.lookup(model).batch_safe is False
