"""tf.keras (TensorFlow 1.15, graph mode) patched against plain tf.keras, side by side.

tf.keras' own test files are not in the wheel: this differential suite is the proof. Every
expected value comes from plain tf.keras in this process: the original ``Model.predict`` /
``predict_on_batch`` captured before anything patched them (``conftest.TF_ORIGINAL``),
called on the same model as unpatched tf.keras whatever the patch state
(``Flavour.unpatched_predict``). Models: Sequential, functional, multi-input/output, Conv, LSTM
(plain, ``unroll``, ``stateful``, ``return_sequences``), BatchNormalization, Dropout, Lambda.
"""
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import tensorflow as tf
from tensorflow import keras as tfk
from tensorflow.python.keras import backend as TK

import keras_fastpredict as kfp
from keras_fastpredict.adapters import tf_keras as tf_keras_adapter
from conftest import FLAVOURS, assert_same, raised, run_in_threads

L = tfk.layers
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAVOUR = FLAVOURS['tf.keras']


plain = FLAVOUR.unpatched_predict                     # plain tf.keras, whatever the patch state
plain_on_batch = FLAVOUR.unpatched_predict_on_batch


def rand(rows, shape, seed=1):
    return np.random.RandomState(seed).standard_normal((rows,) + shape).astype('float32')


def _models():
    np.random.seed(0)
    tf.compat.v1.set_random_seed(0)
    out = {}
    out['sequential'] = tfk.models.Sequential([
        L.Dense(16, activation='relu', input_shape=(8,)), L.Dense(4, activation='softmax')])
    a, b = L.Input((6,), name='a'), L.Input((4,), name='b')
    h = L.Dense(8, activation='tanh')(L.concatenate([L.Dense(8)(a), L.Dense(8)(b)]))
    out['multi_in_out'] = tfk.models.Model([a, b], [L.Dense(3, name='o1')(h),
                                                    L.Dense(1, name='o2')(h)])
    f = L.Input((5,))
    out['functional'] = tfk.models.Model(f, L.Dense(2)(L.Dense(7, activation='elu')(f)))
    out['conv'] = tfk.models.Sequential([
        L.Conv2D(4, 3, activation='relu', input_shape=(10, 10, 2)), L.MaxPooling2D(),
        L.Flatten(), L.Dense(3)])
    out['lstm'] = tfk.models.Sequential([L.LSTM(6, input_shape=(7, 3)), L.Dense(2)])
    out['lstm_unroll'] = tfk.models.Sequential([L.LSTM(6, unroll=True, input_shape=(7, 3)),
                                                L.Dense(2)])
    out['lstm_sequences'] = tfk.models.Sequential([
        L.LSTM(5, return_sequences=True, input_shape=(6, 3)), L.TimeDistributed(L.Dense(2))])
    bn = tfk.models.Sequential([L.Dense(8, input_shape=(5,)), L.BatchNormalization(),
                                L.Dense(2)])
    bn.compile('sgd', 'mse')
    bn.fit(rand(64, (5,)), rand(64, (2,)), epochs=2, verbose=0)   # moving statistics move
    out['batchnorm'] = bn
    out['dropout'] = tfk.models.Sequential([L.Dense(16, input_shape=(8,)), L.Dropout(0.5),
                                            L.Dense(2)])
    out['lambda'] = tfk.models.Sequential([L.Dense(4, input_shape=(3,)),
                                           L.Lambda(lambda t: t * 2.0 + 1.0)])
    return out


INPUTS = {'sequential': [(8,)], 'multi_in_out': [(6,), (4,)], 'functional': [(5,)],
          'conv': [(10, 10, 2)], 'lstm': [(7, 3)], 'lstm_unroll': [(7, 3)],
          'lstm_sequences': [(6, 3)], 'batchnorm': [(5,)], 'dropout': [(8,)],
          'lambda': [(3,)]}
NAMES = sorted(INPUTS)


def inputs(name, rows, seed=1):
    arrays = [rand(rows, s, seed + i) for i, s in enumerate(INPUTS[name])]
    return arrays if len(arrays) > 1 else arrays[0]


def rows_of(x, i, j, copy=False):
    if isinstance(x, list):
        return [a[i:j].copy() if copy else a[i:j] for a in x]
    return x[i:j].copy() if copy else x[i:j]


@pytest.fixture(scope='module')
def tfm():
    return _models()


@pytest.mark.parametrize('name', NAMES)
def test_fast_path_matches_plain_tf_keras(tfm, name):
    model = tfm[name]
    x = inputs(name, 300)
    one = [plain(model, rows_of(x, i, i + 1)) for i in range(12)]
    whole = {bs: plain(model, x, batch_size=bs) for bs in (None, 7, 1000)}
    on_batch = plain_on_batch(model, rows_of(x, 0, 50))
    with kfp.patched(readahead=False, concurrent=False):
        for i in range(12):
            assert_same(model.predict(rows_of(x, i, i + 1)), one[i])
        for bs, expected in whole.items():
            assert_same(model.predict(x, batch_size=bs), expected)
        assert_same(model.predict_on_batch(rows_of(x, 0, 50)), on_batch)
    stats = kfp.stats(model)
    assert stats['fallbacks'] == 0 and stats['fast_calls'] == 16


@pytest.mark.parametrize('name', ['sequential', 'multi_in_out', 'conv', 'lstm', 'batchnorm'])
def test_readahead_and_deferral_match_plain_tf_keras(tfm, name):
    model = tfm[name]
    x, x2 = inputs(name, 40, seed=5), inputs(name, 40, seed=7)
    expected = ([plain(model, rows_of(x, i, i + 1)) for i in range(40)]
                + [plain(model, rows_of(x2, i, i + 1)) for i in range(40)])
    with kfp.patched():
        ahead = [model.predict(rows_of(x, i, i + 1)) for i in range(40)]
        with kfp.batching():     # rows copied: no array to read ahead in
            deferred = [model.predict(rows_of(x2, i, i + 1, copy=True)) for i in range(40)]
        got = ahead + [[np.asarray(o) for o in d] if isinstance(d, list) else np.asarray(d)
                       for d in deferred]
    for g, e in zip(got, expected):
        assert_same(g, e)
    stats = kfp.stats(model)
    assert stats['readahead_hits'] > 20 and stats['deferred'] == 40, stats
    assert stats['fallbacks'] == 0


def test_lstm_inference_graph_is_used(tfm):
    model = tfm['lstm']
    x = inputs('lstm', 10, seed=9)
    expected = [plain(model, x[i:i + 1]) for i in range(10)]
    with kfp.patched(readahead=False, inference_graph=True):    # built at the first call
        got = [model.predict(x[i:i + 1]) for i in range(10)]
        stats = kfp.stats(model)
    for g, e in zip(got, expected):
        assert_same(g, e)
    assert stats['inference_graph'].startswith('used') and stats['batched'] is True, stats


def test_dropout_is_inference_and_lambda_batch_mixing_as_plain(tfm):
    model = tfm['dropout']
    x = inputs('dropout', 20)
    with kfp.patched():
        a, b = model.predict(x), model.predict(x)
    np.testing.assert_array_equal(a, b)
    assert_same(a, plain(model, x))
    # A Lambda whose output rows are not the input's: tf.keras raises for one batch
    # (SliceAggregator), and broadcasts (or raises) over several, as numpy assigns.
    mixing = tfk.models.Sequential([L.Dense(3, input_shape=(4,)),
                                    L.Lambda(lambda t: tf.reduce_sum(t, 0, keepdims=True))])
    outcomes = []
    for rows, bs in ((5, None), (1, None), (64, 32), (70, 32), (70, None)):
        xs = rand(rows, (4,), seed=rows)
        want = raised(plain, mixing, xs, batch_size=bs)
        expected = None if want else plain(mixing, xs, batch_size=bs)
        with kfp.patched():
            got = raised(mixing.predict, xs, batch_size=bs)
            if want is None:
                assert_same(mixing.predict(xs, batch_size=bs), expected)
            assert kfp.stats(mixing)['batched'] is False
        assert got == want, (rows, bs)
        outcomes.append(want and want[0])
    assert outcomes[:3] == [ValueError, None, None]


def test_stateful_lstm_carries_state_as_plain():
    model = tfk.models.Sequential([L.LSTM(4, stateful=True, batch_input_shape=(2, 3, 2)),
                                   L.Dense(1)])
    xs = rand(6, (2, 3, 2), seed=3)
    model.reset_states()
    expected = [plain(model, x) for x in xs] + [plain(model, xs[0].repeat(2, 0))]
    want_error = raised(plain, model, xs[0][:1].repeat(3, 0))     # 3 rows, batch of 2
    model.reset_states()
    with kfp.patched():
        got = [model.predict(x) for x in xs] + [model.predict(xs[0].repeat(2, 0))]
        got_error = raised(model.predict, xs[0][:1].repeat(3, 0))
    for g, e in zip(got, expected):
        assert_same(g, e)
    assert got_error == want_error
    stats = kfp.stats(model)
    assert stats['fast_calls'] == 7 and stats['batches'] == 0


def test_bad_batch_size_for_a_fixed_batch_model_as_plain():
    model = tfk.models.Sequential([L.Dense(3, batch_input_shape=(4, 5))])
    x = rand(4, (5,))
    expected = plain(model, x)
    want = raised(plain, model, x, batch_size=3)
    with kfp.patched():
        assert_same(model.predict(x), expected)
        assert raised(model.predict, x, batch_size=3) == want
    assert want is not None and want[0] is ValueError


def test_sequential_siblings(tfm):
    model = tfm['sequential']
    x = inputs('sequential', 100)
    proba, classes = model.predict_proba(x), model.predict_classes(x)   # unpatched
    with kfp.patched():
        assert_same(model.predict_proba(x), proba)
        np.testing.assert_array_equal(model.predict_classes(x), classes)
        np.testing.assert_array_equal(model.predict_classes(x, batch_size=3), classes)
    assert kfp.stats(model)['fast_calls'] == 3


def test_dict_inputs_and_dtypes(tfm):
    model = tfm['multi_in_out']
    a, b = inputs('multi_in_out', 9)
    with kfp.patched():
        for x in ({'a': a, 'b': b}, [a.astype('float64'), b], (a, b),
                  [(a * 10).astype('int64'), b > 0]):
            want = raised(plain, model, x)
            assert raised(model.predict, x) == want
            if want is None:
                assert_same(model.predict(x), plain(model, x))


def test_threads_with_tf_keras_session_workaround(tfm):
    # tf.keras keeps its session per thread: plain code sets it in each thread (the usual
    # server workaround); those calls are merged, each thread getting its own rows.
    model = tfm['sequential']
    x = inputs('sequential', 8 * 40)
    expected = plain(model, x, batch_size=1)
    session, graph = TK.get_session(), tf.compat.v1.get_default_graph()
    results = {}

    def work(t):
        with graph.as_default():
            TK.set_session(session)
            results[t] = [model.predict(x[i:i + 1].copy()) for i in range(t * 40, t * 40 + 40)]

    with kfp.patched():
        errors = run_in_threads(8, work)
    assert not errors
    for t in range(8):
        assert_same(np.concatenate(results[t]), expected[t * 40:t * 40 + 40])
    assert kfp.stats(model)['fallbacks'] == 0


def test_new_thread_without_the_workaround_fails_as_plain(tfm):
    model = tfm['functional']
    x = inputs('functional', 3)
    out = {}

    def in_thread(key, fn):
        out[key] = raised(fn, model, x)

    for key, fn in (('plain', plain), ('patched', lambda m, v: m.predict(v))):
        with kfp.patched() if key == 'patched' else _nothing():
            th = threading.Thread(target=in_thread, args=(key, fn))
            th.start()
            th.join()
    assert out['plain'] is not None and out['patched'] == out['plain']


class _nothing(object):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_fallbacks_with_reasons(tfm):
    model = tfm['sequential']
    x = inputs('sequential', 12)
    expected = plain(model, x)

    class Sub(tfk.models.Model):
        def __init__(self):
            super(Sub, self).__init__()
            self.d = L.Dense(2)

        def call(self, t):
            return self.d(t)

    sub = Sub()
    want_sub = plain(sub, x)
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(4)
    want_ds = plain(model, dataset)

    def gen():
        while True:
            yield x[:4]

    with kfp.patched():
        assert_same(sub.predict(x), want_sub)
        assert_same(model.predict(dataset), want_ds)
        assert_same(model.predict(gen(), steps=3), np.concatenate([expected[:4]] * 3))
        assert raised(model.predict, gen()) == raised(plain, model, gen())
        assert_same(model.predict(x, verbose=1), expected)
        tf.config.experimental_run_functions_eagerly(True)
        try:      # tf.keras fails in graph mode then: the same failure
            got = raised(model.predict, x)
        finally:
            tf.config.experimental_run_functions_eagerly(False)
        assert_same(model.predict(x), expected)          # and the fast path again
    tf.config.experimental_run_functions_eagerly(True)
    try:
        want = raised(plain, model, x)
    finally:
        tf.config.experimental_run_functions_eagerly(False)
    assert want[0] is got[0] is RuntimeError
    assert got[1].split(' Tensor(')[0] == want[1].split(' Tensor(')[0]
    assert kfp.stats(sub)['fallback_reasons'] == {'not a built graph network': 1}
    reasons = kfp.stats(model)['fallback_reasons']
    assert reasons == {'tf.data dataset input': 1, 'verbose, steps or callbacks': 2,
                       'generator or Sequence input': 1, 'functions run eagerly': 1}, reasons


def test_distribution_strategy_goes_to_tf_keras():
    previous = TK.get_session()    # the strategy makes tf.keras a new session: kept apart
    try:
        strategy = tf.distribute.OneDeviceStrategy('/cpu:0')
        with strategy.scope():
            model = tfk.models.Sequential([L.Dense(3, input_shape=(4,))])
            model.compile('sgd', 'mse')
        x = rand(10, (4,))
        expected = plain(model, x)
        with kfp.patched():
            assert_same(model.predict(x), expected)
            with strategy.scope():
                assert raised(model.predict, x) == raised(plain, model, x)
    finally:
        TK.set_session(previous)
    assert kfp.stats(model)['fallback_reasons'] == {'distribution strategy': 1,
                                                     'distribution strategy scope': 1}


def test_both_flavours_in_one_process(tfm, models):
    # A Keras 2.2.5 model and a tf.keras model side by side, each on its own Keras'
    # session: patched calls, deferred ones and a graph event in between.
    kmodel, tmodel = models['dense'], tfm['sequential']
    kx, tx = np.random.rand(30, 32).astype('float32'), inputs('sequential', 30)
    kexp = [FLAVOURS['keras'].unpatched_predict(kmodel, kx[i:i + 1]) for i in range(30)]
    texp = [plain(tmodel, tx[i:i + 1]) for i in range(30)]
    with kfp.patched():
        got_k, got_t = [], []
        for i in range(30):
            got_k.append(kmodel.predict(kx[i:i + 1]))
            got_t.append(tmodel.predict(tx[i:i + 1]))
        with kfp.batching():
            dk = [kmodel.predict(kx[i:i + 1].copy()) for i in range(10)]
            dt = [tmodel.predict(tx[i:i + 1].copy()) for i in range(10)]
            tmodel.get_weights()      # no graph event; a keras K.function call is one
        ksession = tf_keras_adapter.adapter.lookup(tmodel).session
        assert ksession is TK.get_session()
        from keras_fastpredict.adapters import keras as keras_adapter
        assert keras_adapter.lookup(kmodel).session is not ksession
    for g, e in zip(got_k + [np.asarray(d) for d in dk], kexp + kexp[:10]):
        assert_same(g, e)
    for g, e in zip(got_t + [np.asarray(d) for d in dt], texp + texp[:10]):
        assert_same(g, e)
    assert kfp.stats(kmodel)['fallbacks'] == kfp.stats(tmodel)['fallbacks'] == 0


def test_tf_keras_callback_during_fit():
    model = tfk.models.Sequential([L.Dense(6, activation='relu', input_shape=(4,)),
                                   L.Dense(2)])
    model.compile('sgd', 'mse')
    rng = np.random.RandomState(0)
    x, y, probe_x = (rng.rand(64, 4).astype('float32'), rng.rand(64, 2).astype('float32'),
                     rng.rand(5, 4).astype('float32'))

    class Probe(tfk.callbacks.Callback):
        def __init__(self):
            super(Probe, self).__init__()
            self.seen, self.expected = [], []

        def on_batch_end(self, batch, logs=None):
            self.seen.extend(self.model.predict(probe_x[i:i + 1].copy()) for i in range(5))
            self.expected.append(plain(self.model, probe_x))

    fast = kfp.TfKerasFastPredict()
    assert isinstance(fast, tfk.callbacks.Callback)
    assert kfp.TfKerasFastPredict is kfp.TfKerasFastPredict
    probe = Probe()
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[fast, probe])
    assert not kfp.is_patched()               # patched for the training only
    assert any(isinstance(s, kfp.DeferredArray) for s in probe.seen)
    for step, expected in enumerate(probe.expected):
        got = np.concatenate([np.asarray(s) for s in probe.seen[step * 5:step * 5 + 5]])
        assert_same(got, expected)
    assert kfp.stats(model)['deferred'] == 40


EAGER_SCRIPT = textwrap.dedent('''
    import numpy as np
    import tensorflow as tf
    tf.compat.v1.enable_eager_execution()
    from tensorflow import keras
    import keras_fastpredict
    m = keras.models.Sequential([keras.layers.Dense(2, input_shape=(3,))])
    x = np.ones((4, 3), 'float32')
    plain = m.predict(x)
    keras_fastpredict.patch()
    np.testing.assert_array_equal(m.predict(x), plain)
    np.testing.assert_array_equal(m.predict_on_batch(x).numpy()
                                  if hasattr(m.predict_on_batch(x), 'numpy')
                                  else m.predict_on_batch(x), plain)
    assert keras_fastpredict.stats(m)['fallback_reasons'] == {'eager execution': 3}, \\
        keras_fastpredict.stats(m)
    print('ok')
''')


def test_eager_execution_goes_to_tf_keras():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, '-c', EAGER_SCRIPT], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith('ok')


CHILD_SCRIPT = textwrap.dedent('''
    import subprocess, sys
    code = """
    import sys
    import numpy as np
    from tensorflow import keras
    import keras_fastpredict
    m = keras.models.Sequential([keras.layers.Dense(2, input_shape=(3,))])
    m.predict(np.ones((2, 3), 'float32'))
    print('child', keras_fastpredict.is_patched(), keras_fastpredict.stats(m)['fast_calls'],
          'keras' in sys.modules)
    """
    print(subprocess.run([sys.executable, '-c', code.replace('\\n    ', '\\n')],
                         stdout=subprocess.PIPE, universal_newlines=True).stdout)
''')


def test_runner_child_using_only_tf_keras_is_patched(tmp_path):
    script = tmp_path / 'parent.py'
    script.write_text(CHILD_SCRIPT)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
    env.pop('PYTHONPATH', None)
    out = subprocess.run([sys.executable, '-m', 'keras_fastpredict', str(script)], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'child True 1 False' in out.stdout, out.stdout + out.stderr[-3000:]


def test_compiled_sequential_after_pop_and_add_serves_what_tf_keras_serves():
    """tf.keras compiles a compiled model again inside predict once it changed
    (Sequential.pop sets it uncompiled): plain tf.keras then serves the new outputs."""
    def build():
        model = tfk.Sequential([
            tfk.layers.Dense(3, kernel_initializer='ones', input_shape=(4,)),
            tfk.layers.Dense(2, kernel_initializer='ones')])
        model.compile('sgd', 'mse')
        return model

    x = np.ones((1, 4), np.float32)

    def steps(model):
        out = [model.predict(x)]
        model.pop()
        out.append(model.predict(x))
        out.append(model.predict(x))
        model.add(tfk.layers.Dense(1, kernel_initializer='ones'))
        out.append(model.predict(x))
        return out

    expected = steps(build())
    kfp.patch()
    got = steps(build())
    assert [g.shape for g in got] == [e.shape for e in expected] == [(1, 2), (1, 3), (1, 3),
                                                                     (1, 1)]
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
