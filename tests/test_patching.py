"""patch()/unpatch()/patched(): idempotent, exact restore, no change to training or saving."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import keras
from keras.backend import tensorflow_backend
from keras.engine import sequential, training

import keras_fastpredict as kfp
from keras_fastpredict import patching
from tensorflow.python.keras import backend as tf_backend
from tensorflow.python.keras.engine import sequential as tf_sequential
from tensorflow.python.keras.engine import training as tf_training

from conftest import (ORIGINAL, TF_ORIGINAL, assert_same, inputs_for, overlapping_blocks,
                      raised)

PYTHON = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def originals():
    out = {}
    for module_name, path, _ in patching.ENTRY_POINTS:
        module = sys.modules[module_name]
        owner, name = patching.owner_of(module, path)
        out[module_name, path] = owner.__dict__[name]
    return out


def test_patch_twice_unpatch_restores_identity():
    before = originals()
    kfp.patch()
    kfp.patch()
    during = originals()
    assert all(during[p] is not before[p] for p in before)
    assert all(during[p].__wrapped__ is before[p] for p in before)
    kfp.unpatch()
    kfp.unpatch()
    assert originals() == before
    assert training.Model.predict is ORIGINAL['predict']
    assert sequential.Sequential.predict_classes is before[
        'keras.engine.sequential', 'Sequential.predict_classes']
    assert tensorflow_backend.Function.__call__ is before[
        'keras.backend.tensorflow_backend', 'Function.__call__']
    # tf.keras' own entry points, restored as exactly
    assert tf_training.Model.predict is TF_ORIGINAL['predict']
    assert tf_sequential.Sequential.predict_classes is before[
        'tensorflow.python.keras.engine.sequential', 'Sequential.predict_classes']
    assert tf_backend.GraphExecutionFunction.__call__ is before[
        'tensorflow.python.keras.backend', 'GraphExecutionFunction.__call__']


def test_patched_scope_nests_and_restores(flavour):
    model = flavour.models['dense']
    x = inputs_for('dense', 3)
    with kfp.patched(readahead=False):
        assert kfp.is_patched()
        with kfp.patched(max_batch_size=7):
            assert kfp.is_patched()
        assert kfp.is_patched()           # the outer scope still holds
        model.predict(x)
    assert not kfp.is_patched()
    assert kfp.stats(model)['fast_calls'] == 1


# A fresh process patches first, then imports the Keras named (each header binds
# `keras` and `Model`, and checks that Model.predict is patched), then predicts and
# unpatches: the method restored exactly, the result as plain Keras'.
PATCH_FIRST = {
    'keras': '''
        assert 'keras' not in sys.modules
        import numpy as np
        import keras
        from keras.engine.training import Model
        assert hasattr(Model.predict, '__wrapped__')
    ''',
    'tf.keras': '''
        assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules
        import numpy as np
        from tensorflow import keras
        from tensorflow.python.keras.engine.training import Model
        assert hasattr(Model.predict, '__wrapped__')
        assert 'keras' not in sys.modules       # Keras 2.2.5 is not imported for tf.keras
    ''',
}
PATCH_FIRST_START = '''
    import sys
    import keras_fastpredict
    keras_fastpredict.patch()
'''
PATCH_FIRST_END = '''
    m = keras.models.Sequential([keras.layers.Dense(2, input_shape=(3,))])
    x = np.ones((4, 3), 'float32')
    y = m.predict(x)
    assert keras_fastpredict.stats(m)['fast_calls'] == 1
    original = Model.predict.__wrapped__
    keras_fastpredict.unpatch()
    assert Model.predict is original
    np.testing.assert_allclose(y, m.predict(x), rtol=1e-5, atol=1e-6)
    print('ok')
'''


@pytest.mark.parametrize('which', sorted(PATCH_FIRST))
def test_patch_before_keras_is_imported(which):
    script = ''.join(textwrap.dedent(part) for part in
                     (PATCH_FIRST_START, PATCH_FIRST[which], PATCH_FIRST_END))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=ROOT)
    out = subprocess.run([PYTHON, '-c', script], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith('ok')


def _train(model, x, y):
    history = model.fit(x, y, epochs=3, batch_size=8, verbose=0, shuffle=False)
    return history.history['loss'], model.evaluate(x, y, verbose=0), model.get_weights()


def test_training_evaluation_and_saving_unchanged(flavour, tmp_path):
    # One trainable layer: with more, Keras 2.2.5 training on TF 1.15 is not repeatable
    # even unpatched (a layer's weight read races with its update in the same run), so
    # only a single-layer model can be compared bit for bit.
    keras = flavour.keras

    def make(weights=None):
        m = keras.models.Sequential([keras.layers.Dense(3, input_shape=(4,))])
        m.compile('sgd', 'mse')
        if weights is not None:
            m.set_weights(weights)
        return m

    rng = np.random.RandomState(0)
    x, y = rng.rand(32, 4).astype('float32'), rng.rand(32, 3).astype('float32')
    initial = make().get_weights()
    plain_model = make(initial)
    plain = _train(plain_model, x, y)
    with kfp.patched():
        patched_model = make(initial)
        patched = _train(patched_model, x, y)
        path = str(tmp_path / 'm.h5')
        patched_model.save(path)
        loaded = keras.models.load_model(path)
        loaded_pred = loaded.predict(x)
    assert patched[0] == plain[0]
    assert patched[1] == plain[1]
    for a, b in zip(patched[2], plain[2]):
        np.testing.assert_array_equal(a, b)
    assert_same(loaded_pred, flavour.unpatched_predict(plain_model, x))


def test_options_do_not_outlive_their_patch(models):
    """Issue 9 item 20: unpatch() returns options to their defaults; a nested patched()
    restores the outer options; a FastPredict callback's options last for its training."""
    from keras_fastpredict.config import settings
    from conftest import assert_same, inputs_for, unpatched_predict
    model = models['dense']
    x = inputs_for('dense', 6)
    kfp.patch(defer=True)
    kfp.unpatch()
    kfp.patch()
    ys = [model.predict(x[i:i + 1].copy()) for i in range(6)]
    assert all(type(y) is np.ndarray for y in ys)          # not deferred
    assert_same(np.concatenate(ys), unpatched_predict(model, x))
    kfp.unpatch()
    kfp.patch(readahead=False)
    with kfp.patched(defer=True):
        assert settings.defer is True and settings.readahead is False
    assert settings.defer is False and settings.readahead is False
    trainee = keras.models.Sequential([keras.layers.Dense(1, input_shape=(3,))])
    trainee.compile('sgd', 'mse')
    callback = kfp.FastPredict(max_batch_size=7, readahead=True, concurrent=False)
    trainee.fit(np.ones((4, 3)), np.ones((4, 1)), epochs=1, verbose=0, callbacks=[callback])
    assert settings.concurrent is True and settings.readahead is False


def test_holds_end_with_the_last_release_or_the_users_unpatch(models):
    """hold()/release(): the patch lasts while any hold does, or the user's patch(); the
    user's unpatch() ends every hold (a later release does nothing). Results as plain's."""
    from conftest import unpatched_predict
    model = models['dense']
    x = inputs_for('dense', 3)
    first, second = patching.hold(), patching.hold()
    patching.release(first)
    assert kfp.is_patched() and patching.holding(second)
    assert_same(model.predict(x), unpatched_predict(model, x))
    assert kfp.stats(model)['fast_calls'] == 1
    patching.release(second)
    assert not kfp.is_patched()
    ticket = patching.hold()
    kfp.patch()
    patching.release(ticket)
    assert kfp.is_patched()             # the user's patch outlasts the hold
    ticket = patching.hold()
    kfp.unpatch()
    assert not patching.holding(ticket)
    kfp.patch()
    patching.release(ticket)            # stale: the user's new patch stays
    assert kfp.is_patched()
    assert_same(model.predict(x), unpatched_predict(model, x))
    assert kfp.stats(model)['fast_calls'] == 2


def test_patched_block_puts_back_an_outer_patch_the_block_unpatched():
    """Unchanged by holds: the user's unpatch() inside a block within the user's patch
    comes back patched, with the outer options. A patch() inside an outermost block is
    the user's and stays (another thread's patch() made while a block was open did not:
    see the test below)."""
    from keras_fastpredict.config import settings
    kfp.patch(timeout=5.0)
    with kfp.patched(timeout=7.0):
        kfp.unpatch()
    assert kfp.is_patched() and settings.timeout == 5.0
    kfp.unpatch()
    with kfp.patched():
        kfp.patch()
    assert kfp.is_patched()
    kfp.unpatch()


def test_patched_blocks_in_two_threads_each_keep_the_patch_until_the_last_leaves():
    # Thread a's block patched; b's began inside it. a's leaves first: b's block is still
    # patched; once b's leaves too, Keras is as it was (was: unpatched under b, then patched
    # for good by b's exit).
    _, inside = overlapping_blocks(kfp.patched, kfp.patched, None, lambda: (
        kfp.is_patched(), training.Model.__dict__['predict'] is not ORIGINAL['predict']))
    assert inside == (True, True)
    assert not kfp.is_patched()
    assert training.Model.__dict__['predict'] is ORIGINAL['predict']


def test_the_users_patch_stays_when_a_block_begun_before_it_ends():
    # Thread a's batching() block patched an unpatched process; the user's patch() came
    # next, in another thread (a server's start-up); a's block leaving must not take the
    # user's patch away (it did: the block put the user's mark back as it found it, and
    # unpatched).
    import contextlib

    @contextlib.contextmanager
    def users_patch():
        kfp.patch()
        yield
    overlapping_blocks(kfp.batching, users_patch)
    assert kfp.is_patched()
    assert training.Model.__dict__['predict'] is not ORIGINAL['predict']
    kfp.unpatch()
    assert training.Model.__dict__['predict'] is ORIGINAL['predict']


def test_a_block_leaving_puts_back_no_option_another_threads_block_set_since():
    # Options are the process's: thread b's block set max_batch_size over a's; a's block
    # leaving first left b's value in place under b's block (it put back its own old one).
    from keras_fastpredict.config import settings
    default = settings.max_batch_size
    _, in_b = overlapping_blocks(lambda: kfp.patched(max_batch_size=8),
                                 lambda: kfp.patched(max_batch_size=64),
                                 None, lambda: settings.max_batch_size)
    assert in_b == 64
    assert not kfp.is_patched() and settings.max_batch_size == default


@pytest.mark.parametrize('options', [{}, {'report': True}, {'auto_batch': True}])
def test_a_method_called_through_its_class_dict_runs_as_unpatched(options):
    # Model.__dict__['predict'](model, x) has no instance bound: it raised TypeError
    # (predict) and AttributeError (K.function's __call__) where plain Keras returns.
    from tensorflow.python.client import session as tf_session
    model = keras.Sequential([keras.layers.Dense(4, input_shape=(3,))])
    X = np.arange(6, dtype='float32').reshape(2, 3)
    function = keras.backend.function([model.input], [model.output])
    session = keras.backend.get_session()
    calls = [lambda: training.Model.__dict__['predict'](model, X),
             lambda: training.Model.__dict__['predict_on_batch'](model, X),
             lambda: sequential.Sequential.__dict__['predict_classes'](model, X),
             lambda: type(function).__dict__['__call__'](function, [X])[0],
             lambda: tf_session.BaseSession.__dict__['run'](session, model.output,
                                                            {model.input: X})]
    plain = [np.array(call()) for call in calls]
    kfp.patch(**options)
    assert training.Model.__dict__['predict'] is not ORIGINAL['predict']
    for call, expected in zip(calls, plain):
        assert_same(np.asarray(call()), expected)
    # Without the instance, as plain Keras: its own TypeError.
    assert raised(lambda: training.Model.__dict__['predict'](model)) == raised(
        lambda: ORIGINAL['predict'](model))
