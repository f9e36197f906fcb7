"""The callable cache: built once, rebuilt when the session or model changes, weakly held."""
import gc
import weakref

import numpy as np
import keras
import tensorflow as tf
from keras import backend as K
from keras import layers

import keras_fastpredict as kfp
from keras_fastpredict import callables
from conftest import assert_same, inputs_for, unpatched_predict


def small_model(units=3):
    return keras.models.Sequential([layers.Dense(units, input_shape=(4,))])


def test_no_graph_ops_added_per_call(models):
    model = models['multi_out']
    x = inputs_for('multi_out', 50)
    graph = model.outputs[0].graph
    with kfp.patched():
        model.predict(x[:1])
        model.predict(x)
        ops = len(graph.get_operations())
        for i in range(200):
            model.predict(x[i % 50:i % 50 + 1])
            model.predict_on_batch(x[:5])
        model.predict(x, batch_size=3)
        assert len(graph.get_operations()) == ops


def test_entry_cached_and_rebuilt_after_recompile(models):
    model = small_model()
    x = np.random.rand(3, 4).astype('float32')
    with kfp.patched():
        model.predict(x)
        first = callables.lookup(model)
        model.predict(x)
        assert callables.lookup(model) is first
        model.compile('adam', 'mse')
        model.predict(x)
        assert callables.lookup(model) is not first
        kfp.clear_cache()
        assert callables.entries() == []
        assert_same(model.predict(x), unpatched_predict(model, x))


def test_set_session_and_clear_session_follow_keras():
    previous = K.get_session()
    try:
        model = small_model()
        x = np.random.rand(3, 4).astype('float32')
        with kfp.patched():
            before = model.predict(x)
            # A new session on the same graph with other weights: Keras uses it, so do we.
            other = tf.Session(graph=previous.graph)
            K.set_session(other)
            other.run(tf.variables_initializer(model.weights))
            model.set_weights([2 * w + 1 for w in model.get_weights()])
            after = model.predict(x)
            assert callables.lookup(model).session is other
            assert_same(after, unpatched_predict(model, x))
            assert not np.allclose(before, after)
    finally:
        K.set_session(previous)


def test_models_are_freed_when_dropped():
    x = np.random.rand(3, 4).astype('float32')
    with kfp.patched():
        model = small_model()
        model.predict(x)
        model.predict(x[:1])
        with kfp.batching():
            model.predict(x[1:2])
        ref = weakref.ref(model)
        del model
        gc.collect()
        assert ref() is None
        assert all(e.model() is not None for e in callables.entries())


def test_exclude_keeps_fast_path_without_batching(models):
    model = models['dense']
    x = inputs_for('dense', 20)
    kfp.exclude(model)
    try:
        with kfp.patched():
            with kfp.batching():
                got = [model.predict(x[i:i + 1]) for i in range(20)]
                assert all(type(g) is np.ndarray for g in got)
    finally:
        callables._excluded.discard(id(model))
        callables.invalidate(model)
    assert_same(np.concatenate(got), unpatched_predict(model, x))
    assert kfp.stats(model)['batches'] == 0


def test_clear_session_follows_keras_in_a_fresh_process():
    # K.clear_session() resets the default graph for the whole process: run it apart.
    import os
    import subprocess
    import sys
    import textwrap
    script = textwrap.dedent('''
        import numpy as np, keras
        from keras import backend as K
        from keras.engine.training import Model
        import keras_fastpredict as kfp
        def make():
            return keras.models.Sequential([keras.layers.Dense(3, input_shape=(4,))])
        def outcome(fn, *args):
            try:
                return ('value', fn(*args))
            except Exception as exc:
                return ('raised', type(exc), str(exc))
        x = np.ones((2, 4), 'float32')
        kfp.patch()
        old = make()
        old.predict(x)
        K.clear_session()
        new = make()
        np.testing.assert_allclose(new.predict(x), Model.predict.__wrapped__(new, x), rtol=1e-5)
        assert kfp.stats(new)['fast_calls'] == 1
        got = outcome(old.predict, x)
        kfp.unpatch()
        want = outcome(old.predict, x)
        # Whatever Keras does with a model from before clear_session, the patch does too.
        assert got[0] == want[0], (got, want)
        if want[0] == 'raised':
            assert got[1:] == want[1:], (got, want)
        else:
            np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
        print('ok')
    ''')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=root)
    done = subprocess.run([sys.executable, '-c', script], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith('ok'), done.stderr[-3000:]
