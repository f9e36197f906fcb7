"""The callable cache: built once, rebuilt when the session or model changes, weakly held."""
import gc
import weakref

import numpy as np
import keras
import tensorflow as tf
from keras import backend as K
from keras import layers

import keras_fastpredict as kfp
from keras_fastpredict.adapters import keras as keras_adapter
from keras_fastpredict.engine import compiled, ways, work
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
        first = keras_adapter.lookup(model)
        model.predict(x)
        assert keras_adapter.lookup(model) is first
        model.compile('adam', 'mse')
        model.predict(x)
        assert keras_adapter.lookup(model) is not first
        kfp.clear_cache()
        assert compiled.entries() == []
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
            assert keras_adapter.lookup(model).session is other
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
        assert all(e.model() is not None for e in compiled.entries())


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
        compiled._excluded.discard(id(model))
        compiled.invalidate(model)
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
        got_new = new.predict(x)
        assert kfp.stats(new)['fast_calls'] == 1
        got = outcome(old.predict, x)
        kfp.unpatch()
        # (plain Keras unpatched: the original called while patched runs Keras' predict
        # function through our K.function adapter)
        np.testing.assert_allclose(got_new, Model.predict(new, x), rtol=1e-5, atol=1e-6)
        want = outcome(old.predict, x)
        # Whatever Keras does with a model from before clear_session, the patch does too.
        assert got[0] == want[0], (got, want)
        if want[0] == 'raised':
            assert got[1:] == want[1:], (got, want)
        else:
            np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
        print('ok')
    ''')
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=root)
    done = subprocess.run([sys.executable, '-c', script], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith('ok'), done.stderr[-3000:]


SCENARIOS = '''
import sys, threading
import numpy as np, tensorflow as tf, keras
from keras import backend as K
import keras_fastpredict as kfp
PATCHED = sys.argv[1] == 'patched'
if PATCHED:
    kfp.patch()
x = np.arange(8, dtype='float32').reshape(2, 4) / 8


def make(*units):
    return keras.models.Sequential(
        [keras.layers.Dense(u, kernel_initializer='ones', bias_initializer='zeros',
                            **({'input_shape': (4,)} if i == 0 else {}))
         for i, u in enumerate(units or (3,))])


def _without_name(fn, *args):
    try:
        return fn(*args)
    except tf.errors.FailedPreconditionError as exc:
        raise type(exc)(exc.node_def, exc.op, str(exc).split('value ')[0])


def show(label, fn, *args):
    try:
        y = fn(*args)
        print(label, 'value', np.shape(y), np.round(np.asarray(y), 4).tolist())
    except Exception as exc:
        print(label, 'raised', type(exc).__name__, str(exc).split('\\n')[0])


# Ops the first calls add: plain Keras never creates the learning-phase placeholder for a
# model that does not use it (item 24).
graph = tf.get_default_graph()
counted = make(5)
before = len(graph.get_operations())
for i in range(20):
    counted.predict(x[:1])
print('ops added', len(graph.get_operations()) - before,
      'learning phase', any('keras_learning_phase' in op.name for op in graph.get_operations()))

# Outputs changed after the first predict: Keras keeps its predict function (item 18).
seq = make(4, 2)
show('before pop', seq.predict, x)
seq.pop()
show('after pop', seq.predict, x)
seq.add(keras.layers.Dense(3))
show('after add', seq.predict, x)

# A session of the user's with uninitialised variables: the same error. (Which variable
# TF names first varies from run to run even in plain Keras: the name is left out.)
fresh = make(3)
fresh.predict(x)
with tf.Session().as_default():
    show('uninitialised session', _without_name, fresh.predict, x)

# A temporary patch ends, then a new thread predicts (item 9).
g = tf.Graph()
with g.as_default():
    sess = tf.Session()
    K.set_session(sess)
    in_g = make()
    if PATCHED:
        with kfp.patched():
            show('in graph', in_g.predict, x)
    else:
        show('in graph', in_g.predict, x)
out = []
t = threading.Thread(target=lambda: out.append(in_g.predict(x)))
t.start(); t.join()
show('new thread', lambda: out[0])
K.clear_session()

# A model of another graph predicted first, then the default graph's (item 12).
mine = make()
other = tf.Graph()
with other.as_default():
    theirs = make()
show('other graph first', theirs.predict, x)
show('default graph', mine.predict, x)
K.clear_session()
show('stale after clear_session', mine.predict, x)
'''


def test_scenarios_match_plain_keras_in_fresh_processes():
    """Items 9, 12, 18, 24: each scenario leaves Keras' global state as plain Keras does,
    so plain and patched runs are compared in separate fresh processes."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=root)
    lines = {}
    for mode in ('plain', 'patched'):
        done = subprocess.run([sys.executable, '-c', SCENARIOS, mode], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        lines[mode] = [ln for ln in done.stdout.splitlines() if ln.strip()]
    assert len(lines['plain']) == 10
    assert lines['patched'] == lines['plain']


def _sixty_calls(make_s, monkeypatch=None):
    """60 fresh one-row calls of a model, the second callable's cost taken as ``make_s``
    from the second call on; each result as plain Keras'. Its Ways and one-time costs.
    With ``monkeypatch``, the model's work does not count as tiny."""
    if monkeypatch is not None:
        monkeypatch.setattr(work, 'TINY_FLOPS', 0)
    model = small_model()
    x = np.random.RandomState(0).rand(60, 4).astype('float32')
    expected = [unpatched_predict(model, x[i:i + 1]) for i in range(60)]
    with kfp.patched():
        assert_same(model.predict(x[:1].copy()), expected[0])
        made = compiled.get(model)._ways
        made.make_s = make_s
        for i in range(1, 60):
            assert_same(model.predict(x[i:i + 1].copy()), expected[i])
        return made, kfp.stats(model)['one_time_ms']


def test_the_first_callable_runs_on_the_pool_as_plain_keras_does(monkeypatch):
    """One callable, as plain Keras makes, and on TF's pool as Keras' is (a MobileNet run
    is slower in the caller's thread); the other only once the runs could have paid it."""
    made, one_time = _sixty_calls(float('inf'), monkeypatch)
    assert made.first == ways.POOL and made.has(ways.POOL) and not made.has(ways.INLINE)
    assert 'callable' in one_time and 'inline callable' not in one_time


def test_the_inline_callable_is_made_once_runs_could_have_paid_it(monkeypatch):
    made, one_time = _sixty_calls(0.0, monkeypatch)
    assert made.has(ways.POOL) and made.has(ways.INLINE) and 'inline callable' in one_time
    assert made.choice[1] in (ways.POOL, ways.INLINE)     # one row: settled, both tried


def test_a_tiny_model_starts_in_the_callers_thread_and_never_makes_the_pool(monkeypatch):
    """A row of a few hundred operations starts in the caller's thread; while its runs
    are too short for the pool to gain on them (here every run counts as such, so that
    the test does not depend on the machine's speed), the pool's callable is not made
    however long the loop, even at no price."""
    monkeypatch.setattr(ways, 'POOL_MIN_RUN_S', float('inf'))
    made, one_time = _sixty_calls(0.0)
    assert made.first == ways.INLINE and not made.has(ways.POOL)
    assert made.choice[1] == ways.INLINE and 'pool callable' not in one_time


def test_a_recurrent_model_starts_in_the_callers_thread():
    """Its loop's ops would go to the pool one by one at each iteration. Each result as
    plain Keras'."""
    model = keras.models.Sequential([layers.LSTM(4, input_shape=(5, 3)), layers.Dense(2)])
    x = np.random.RandomState(0).rand(8, 5, 3).astype('float32')
    expected = [unpatched_predict(model, x[i:i + 1]) for i in range(8)]
    with kfp.patched(inference_graph=False):
        for i in range(8):
            assert_same(model.predict(x[i:i + 1].copy()), expected[i])
        assert compiled.get(model)._ways.first == ways.INLINE


def test_a_tiny_model_with_a_flatten_layer_starts_in_the_callers_thread():
    """Found by review of c92efb5: Keras' Flatten reshapes to a shape TF does not know
    statically, and the products after it then looked unknown, so the classic MNIST
    MLP (200,000 operations a row) started on the pool and paid a second callable once
    its rent was paid, as any large graph. Each result as plain Keras'."""
    model = keras.models.Sequential([layers.Flatten(input_shape=(28, 28)),
                                     layers.Dense(128, activation='relu'), layers.Dense(10)])
    x = np.random.RandomState(0).rand(8, 28, 28).astype('float32')
    expected = [unpatched_predict(model, x[i:i + 1]) for i in range(8)]
    with kfp.patched():
        for i in range(8):
            assert_same(model.predict(x[i:i + 1].copy()), expected[i])
        assert compiled.get(model)._ways.first == ways.INLINE
