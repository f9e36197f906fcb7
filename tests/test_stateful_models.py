"""Stateful and fixed-batch models on the fast path (issue 10, items 2 and 3): the callable
runs the predict function's state updates; calls run in Keras' own batch size and are
never merged; anything else goes to Keras. Twin models (same weights) run the same
sequence of calls plainly and patched, and every outcome is compared."""
import numpy as np
import pytest
import keras
from keras import layers

import keras_fastpredict as kfp
from keras_fastpredict.adapters import keras as keras_adapter
from conftest import assert_same


def twins(build):
    a = build()
    b = build()
    b.set_weights(a.get_weights())
    return a, b


def outcomes(steps):
    found = []
    for step in steps:
        try:
            found.append(step())
        except Exception as exc:  # noqa: BLE001 - plain Keras may raise: so must we
            found.append((type(exc), str(exc).split('\n')[0]))
    return found


def compare(build, script):
    """``script(model)`` returns a list of zero-argument calls; the plain twin's outcomes
    must equal the patched twin's."""
    plain_model, patched_model = twins(build)
    expected = outcomes(script(plain_model))
    kfp.patch()
    got = outcomes(script(patched_model))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        if isinstance(e, tuple):
            assert g == e
        elif isinstance(e, list):
            assert len(g) == len(e)
            for gg, ee in zip(g, e):
                assert_same(gg, ee)
        elif isinstance(e, np.ndarray):
            assert_same(g, e)
        elif isinstance(e, (float, np.floating)):
            # A loss (where training is repeatable: see one_thread_session).
            assert g == pytest.approx(e, rel=1e-5)
        else:
            assert g == e
    return patched_model


def stateful_lstm(batch=1):
    model = keras.models.Sequential([
        layers.LSTM(8, stateful=True, batch_input_shape=(batch, 1, 4)), layers.Dense(3)])
    model.compile('sgd', 'mse')
    return model


def test_one_step_stateful_loop_equals_keras_step_by_step():
    X = np.random.RandomState(0).rand(300, 1, 1, 4).astype('float32')

    def script(model):
        steps = [lambda i=i: model.predict(X[i]) for i in range(200)]
        steps.append(lambda: model.reset_states())
        steps += [lambda i=i: model.predict_on_batch(X[i]) for i in range(200, 260)]
        steps.append(lambda: model.layers[0].reset_states(states=[np.ones((1, 8)),
                                                                   np.zeros((1, 8))]))
        steps += [lambda i=i: model.predict(X[i]) for i in range(260, 300)]
        return steps

    model = compare(stateful_lstm, script)
    stats = kfp.stats(model)
    assert stats['fast_calls'] == 300 and stats['fallbacks'] == 0
    assert stats['batches'] == 0 and stats['readahead_hits'] == 0 and stats['deferred'] == 0


def one_layer_stateful_lstm():
    # One trainable layer: TF 1.15 training is repeatable only so (see docs/same-result.md), and
    # the twins must train alike for their predictions to be compared.
    model = keras.models.Sequential([
        layers.LSTM(3, stateful=True, batch_input_shape=(1, 1, 4))])
    model.compile('sgd', 'mse')
    return model


@pytest.fixture
def one_thread_session():
    """Keras' session with one intra-op and one inter-op thread, for this test only.

    A stateful model's train step assigns its states in the same run that reads them for
    the gradients, with no order between the two: with TF's thread pools, plain Keras
    itself gives other losses and states from run to run (two unpatched twins of this
    test's model differed by 1.5e-5 in their predictions and 2e-5 in a loss in 1 of 20
    processes). With one thread the run order, and so every result, repeats."""
    import tensorflow as tf
    from keras import backend as K
    previous = K.get_session()
    config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=1,
                                      inter_op_parallelism_threads=1)
    K.set_session(tf.compat.v1.Session(graph=previous.graph, config=config))
    yield
    K.get_session().close()
    K.set_session(previous)


def test_stateful_predict_mixed_with_training_and_evaluation(one_thread_session):
    X = np.random.RandomState(1).rand(40, 1, 1, 4).astype('float32')
    Y = np.random.RandomState(2).rand(40, 1, 3).astype('float32')

    def script(model):
        steps = []
        for i in range(40):
            steps.append(lambda i=i: model.predict(X[i]))
            if i % 5 == 4:
                steps.append(lambda i=i: model.train_on_batch(X[i], Y[i]))
                steps.append(lambda i=i: model.evaluate(X[i], Y[i], batch_size=1, verbose=0))
        return steps

    compare(one_layer_stateful_lstm, script)


def test_stateful_batch_sizes_follow_keras_and_bad_sizes_raise_as_keras():
    X = np.random.RandomState(3).rand(12, 1, 4).astype('float32')

    def script(model):
        return [lambda: model.predict(X[:6]),                 # three runs of two
                lambda: model.predict(X[:3]),                 # not a multiple: Keras raises
                lambda: model.predict(X[:2], batch_size=4),   # another batch size: raises
                lambda: model.predict_on_batch(X[:4]),        # one run of four: TF raises
                lambda: model.predict_on_batch(X[:2]),
                lambda: model.predict(X[:1]),
                lambda: model.predict(X[4:8], batch_size=2)]

    compare(lambda: stateful_lstm(batch=2), script)


def test_fixed_batch_multi_input_model_in_a_loop():
    def build():
        a = layers.Input(batch_shape=(4, 3))
        b = layers.Input(batch_shape=(4, 2))
        out = layers.Dense(2)(layers.concatenate([layers.Dense(5)(a), layers.Dense(5)(b)]))
        return keras.models.Model([a, b], out)

    A = np.random.RandomState(4).rand(40, 3).astype('float32')
    B = np.random.RandomState(5).rand(40, 2).astype('float32')

    def script(model):
        steps = [lambda i=i: model.predict([A[i:i + 4], B[i:i + 4]]) for i in range(0, 36, 4)]
        steps += [lambda: model.predict([A[:8], B[:8]]), lambda: model.predict([A[:6], B[:6]]),
                  lambda: model.predict_on_batch([A[:4], B[:4]]),
                  lambda: model.predict_on_batch([A[:3], B[:3]]),
                  lambda: model.predict([A[:4], B[:4]], batch_size=2)]
        return steps

    model = compare(build, script)
    assert keras_adapter.lookup(model).batch_safe is False
    assert kfp.stats(model)['fast_calls'] >= 10


def test_fixed_batch_sequential_predict_classes_raises_as_keras():
    def build():
        return keras.models.Sequential([layers.Dense(3, batch_input_shape=(5, 4)),
                                        layers.Activation('softmax')])

    X = np.random.RandomState(6).rand(10, 4).astype('float32')

    def script(model):
        return [lambda: model.predict_classes(X[:5]), lambda: model.predict_proba(X[:5]),
                lambda: model.predict_classes(X[:5], batch_size=5),
                lambda: model.predict(X)]

    compare(build, script)


@pytest.mark.parametrize('kind', ['stateful', 'stateless'])
def test_threads_on_a_stateful_or_fixed_batch_model_are_never_merged(kind):
    import threading
    if kind == 'stateful':
        model = stateful_lstm()
        x = np.ones((1, 1, 4), 'float32')
    else:
        model = keras.models.Sequential([layers.Dense(3, batch_input_shape=(1, 4))])
        x = np.ones((1, 4), 'float32')
    errors = []

    def work():
        try:
            for _ in range(25):
                model.predict(x)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    kfp.patch()
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    stats = kfp.stats(model)
    assert stats['fast_calls'] == 100 and stats['batches'] == 0 and stats['queued'] == 0
