"""Watched results (keras_fastpredict/report/watch.py): the same values and types as plain
Keras, and fed back in, the same path as plain arrays."""
import pickle

import numpy as np
import keras
from keras import layers

import keras_fastpredict as kfp
from conftest import assert_same, inputs_for, unpatched_predict
from report_support import sites, recorder  # noqa: F401 (autouse)


def test_watched_results_behave_as_plain_arrays(models):
    model = models['multi_out']
    X = inputs_for('multi_out', 6)
    expected = unpatched_predict(model, X[:2])
    kfp.patch(report=True, readahead=False)
    got = model.predict(X[:2])
    assert_same(got, expected)
    y = got[0]
    assert isinstance(y, np.ndarray) and y.shape == expected[0].shape and y.dtype == np.float32
    for value in (y + 1, np.exp(y), y.sum(axis=0), y.copy(), y[[0, 1]], np.concatenate([y, y]),
                  y.reshape(-1), pickle.loads(pickle.dumps(y)), np.asarray(y)):
        assert type(value) is np.ndarray
    fresh = model.predict(X[2:4])[1]
    assert type(fresh) is not np.ndarray and isinstance(fresh, np.ndarray)      # watched
    assert type(fresh[0]) is np.ndarray             # an item or view is a use: plain
    assert_same(fresh[0], unpatched_predict(model, X[2:4])[1][0])
    assert float(y[0, 0]) == float(expected[0][0, 0])
    assert repr(y) == repr(expected[0]) and str(y) == str(expected[0])
    np.testing.assert_array_equal(np.array([y, y]), np.array([expected[0]] * 2))
    # Passed back in, it takes the path a plain array takes.
    kfp.reset_stats()
    model2 = models['dense']
    x = inputs_for('dense', 1)
    a = model2.predict(x)
    b = model2.predict(np.zeros((1, 32), 'float32') + a.sum())
    assert kfp.stats(model2)['fast_calls'] == 2 and kfp.stats(model2)['fallbacks'] == 0
    assert_same(b, unpatched_predict(model2, np.zeros((1, 32), 'float32') + a.sum()))


def test_results_passed_back_into_k_function_and_session_run(models):
    from keras import backend as K
    inp = layers.Input((4,))
    model = keras.models.Model(inp, layers.Dense(4)(inp))
    f = K.function([model.input], [model.output])
    sess = K.get_session()

    def loop():
        y = np.ones((1, 4), 'float32')
        for _ in range(20):
            y = f([y])[0]
        z = np.ones((1, 4), 'float32')
        for _ in range(20):
            z = sess.run(model.output, {model.input: z})
        return y, z
    expected = loop()
    kfp.patch(report=True)
    got = loop()
    for g, e in zip(got, expected):
        assert_same(g, e)
    # Watched results fed back in are plain arrays to the adapter: each call on its fast
    # path, as without the report, but the first of K.function's signature (left to Keras;
    # Session.run's first call, whose feeds pass TF's checks, is on the model path too).
    for entry, left_to_keras in (('__call__', 1), ('run', 0)):
        found = sites(entry=entry, function='loop')
        assert len(found) == 1 and found[0]['calls'] == 20
        assert found[0]['paths']['keras'] == left_to_keras, found[0]


def _frozen_and_in_place(predict, x):
    """What a script does to its results: freezes one, writes to it, adds in place."""
    seen = []
    out = [predict(x[i:i + 1].copy()) for i in range(4)]
    out[0].setflags(write=False)
    try:
        out[0][0, 0] = 1.0
        seen.append('written')
    except ValueError as exc:
        seen.append(str(exc))
    out[1].flags.writeable = False
    seen.append(out[1].flags.writeable)
    a = out[2]
    out[2] += 1
    seen.append(a is out[2])
    b = out[3]
    np.multiply(out[3], 2, out=out[3])
    seen.append(b is out[3])
    return seen, [np.array(o) for o in out]


def test_flags_set_and_in_place_arithmetic_act_on_the_watched_result_itself(models):
    """Found by review: setflags(write=False) on a watched result set a throwaway view's
    flags (a later write went through where plain Keras raises); ``out[i] += 1`` put a
    plain view in the list in place of the result."""
    model = models['dense']
    x = inputs_for('dense', 4)
    expected = _frozen_and_in_place(lambda r: unpatched_predict(model, r), x)
    assert expected[0][0] == 'assignment destination is read-only'
    kfp.patch(report=True, readahead=False)
    got = _frozen_and_in_place(model.predict, x)
    assert got[0] == expected[0]
    for g, e in zip(got[1], expected[1]):
        assert_same(g, e)
