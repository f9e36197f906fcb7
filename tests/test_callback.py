"""FastPredict callback: predictions made during fit are fast, batched, and see the weights
of the step they were made in."""
import gc
import sys

import numpy as np
import pytest
import keras
from keras import layers
from keras.callbacks import Callback

import keras_fastpredict as kfp
from keras_fastpredict import DeferredArray
from conftest import assert_same, unpatched_predict


class Probe(Callback):
    """A user's callback that predicts a few rows after every batch (a common pattern)."""

    def __init__(self, x):
        super(Probe, self).__init__()
        self.x = x
        self.seen = []
        self.expected = []

    def on_batch_end(self, batch, logs=None):
        for i in range(len(self.x)):
            self.seen.append(self.model.predict(self.x[i:i + 1].copy()))
        self.expected.append(unpatched_predict(self.model, self.x))


def make():
    model = keras.models.Sequential([layers.Dense(6, activation='relu', input_shape=(4,)),
                                     layers.Dense(2)])
    model.compile('sgd', 'mse')
    return model


def test_predictions_in_callbacks_are_batched_and_see_their_step():
    model = make()
    rng = np.random.RandomState(0)
    x, y = rng.rand(64, 4).astype('float32'), rng.rand(64, 2).astype('float32')
    probe = Probe(rng.rand(5, 4).astype('float32'))
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[kfp.FastPredict(), probe])
    assert not kfp.is_patched()
    assert len(probe.seen) == 8 * 5
    assert type(probe.seen[0]) is DeferredArray
    for step, expected in enumerate(probe.expected):
        got = np.concatenate(probe.seen[step * 5:step * 5 + 5])
        assert_same(got, expected)
    s = kfp.stats(model)
    assert s['batches'] == 8 and s['mean_batch_size'] == 5


class Boom(Callback):
    def on_batch_end(self, batch, logs=None):
        self.model.predict(np.zeros((1, 4), 'float32'))
        raise RuntimeError('boom')


def test_scope_closed_when_fit_raises():
    model = make()
    callback = kfp.FastPredict()          # created before fit: fit itself is wrapped
    with pytest.raises(RuntimeError):
        model.fit(np.zeros((8, 4)), np.zeros((8, 2)), verbose=0, callbacks=[callback, Boom()])
    assert not kfp.is_patched()
    assert type(model.predict(np.zeros((1, 4), 'float32'))) is np.ndarray


def test_callback_made_inside_the_fit_call_still_gives_right_results():
    # `model.fit` is looked up before its arguments are evaluated, so here Keras' own fit
    # runs and cannot tell the callback it raised: the scope stays open until the next
    # training starts, but results stay right.
    model = make()
    x = np.random.RandomState(0).rand(3, 4).astype('float32')
    with pytest.raises(RuntimeError):
        model.fit(np.zeros((8, 4)), np.zeros((8, 2)), verbose=0,
                  callbacks=[kfp.FastPredict(), Boom()])
    assert_same(np.asarray(model.predict(x)), unpatched_predict(model, x))
    model.fit(np.zeros((8, 4)), np.zeros((8, 2)), verbose=0, callbacks=[kfp.FastPredict()])
    assert type(model.predict(x)) is np.ndarray


def test_callback_options_apply_only_while_its_training_runs():
    """Issue 9 item 20: FastPredict(**options) sets nothing when made, its options hold
    during its training, then the settings before it come back."""
    from keras_fastpredict.config import settings

    class Look(Callback):
        seen = []

        def on_batch_end(self, batch, logs=None):
            self.seen.append(settings.timeout)

    model = make()
    callback = kfp.FastPredict(timeout=30.0)
    assert settings.timeout is None                  # made, not yet training
    model.fit(np.zeros((8, 4)), np.zeros((8, 2)), batch_size=4, verbose=0,
              callbacks=[callback, Look()])
    assert Look.seen == [30.0, 30.0]
    assert settings.timeout is None and not kfp.is_patched()
    kfp.patch(timeout=5.0)
    model.fit(np.zeros((8, 4)), np.zeros((8, 2)), batch_size=4, verbose=0,
              callbacks=[kfp.FastPredict(timeout=30.0), Look()])
    assert Look.seen[2:] == [30.0, 30.0]
    assert settings.timeout == 5.0 and kfp.is_patched()


def test_report_option_records_the_training_as_patch_report_does():
    """FastPredict(report=True) turns the report on for its training as patch(report=True)
    does: the entries are wrapped with the report while it trains (the predict line of a
    callback is a site of the report), and as before after it (the option alone left them
    unwrapped: no site); results as plain Keras' at each step."""

    class Probe2(Probe):
        def on_batch_end(self, batch, logs=None):
            for i in range(len(self.x)):
                self.seen.append(self.model.predict(self.x[i:i + 1].copy()))   # a site
            self.expected.append(unpatched_predict(self.model, self.x))

    model = make()
    x = np.random.RandomState(3).rand(3, 4).astype('float32')
    probe = Probe2(x)
    kfp.patch()
    try:
        model.fit(np.zeros((8, 4)), np.zeros((8, 2)), batch_size=4, verbose=0,
                  callbacks=[kfp.FastPredict(report=True, defer=False), probe])
        after_line = sys._getframe().f_lineno + 1
        after = model.predict(x[:1].copy())          # after the training: not recorded
        here = {s['line']: s['calls'] for s in kfp.report()['sites']
                if s['file'] == __file__}
    finally:
        kfp.unpatch()
    # (fit's own K.function calls are a site too, at the fit line, as under patch(report=True))
    assert here.get(Probe2.on_batch_end.__code__.co_firstlineno + 2) == 6
    assert after_line not in here
    assert_same(np.concatenate(probe.seen), np.concatenate(probe.expected))
    assert_same(after, unpatched_predict(model, x[:1]))


def test_two_callbacks_setting_one_option_restore_the_settings_before_the_training():
    """Two FastPredict callbacks (defer=False) in one fit both set ``timeout``: after the
    training the value before it comes back, whatever order they end in; predictions
    after it as plain Keras'."""
    from keras_fastpredict.config import settings
    model = make()
    x = np.random.RandomState(4).rand(3, 4).astype('float32')
    kfp.patch(timeout=5.0)
    try:
        model.fit(np.zeros((8, 4)), np.zeros((8, 2)), batch_size=4, verbose=0,
                  callbacks=[kfp.FastPredict(timeout=30.0, defer=False),
                             kfp.FastPredict(timeout=60.0, defer=False)])
        after = settings.timeout
        got = model.predict(x)
    finally:
        kfp.unpatch()
    assert_same(got, unpatched_predict(model, x))
    assert after == 5.0


# Who asked for the patch: a callback patches for as long as it may train, but a user's
# own patch() (or patched() block) outlasts it, and a user's unpatch() ends every holder's.

def predict_rows(model, x, plain=unpatched_predict):
    """A user's predict loop (one row a call): its results, plain Keras' answer, and how
    many of its calls took the fast path (none unpatched)."""
    before = kfp.stats(model)['fast_calls']
    got = np.concatenate([np.asarray(model.predict(x[i:i + 1].copy()))
                          for i in range(len(x))])
    return got, plain(model, x), kfp.stats(model)['fast_calls'] - before


class At(Callback):
    """Runs ``action()`` at the end of the first epoch, and notes the patch state at every
    batch's end."""

    def __init__(self, action):
        super(At, self).__init__()
        self.action = action
        self.patched = []

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            self.action()

    def on_batch_end(self, batch, logs=None):
        self.patched.append(kfp.is_patched())


def fit(model, *callbacks, **kwargs):
    rng = np.random.RandomState(5)
    x, y = rng.rand(8, 4).astype('float32'), rng.rand(8, 2).astype('float32')
    kwargs.setdefault('epochs', 2)
    model.fit(x, y, batch_size=4, verbose=0, callbacks=list(callbacks), **kwargs)


X = np.random.RandomState(6).rand(4, 4).astype('float32')


@pytest.mark.parametrize('when', ['before fit', 'during fit'])
def test_users_patch_outlasts_the_callbacks_training(when):
    """The user's patch(), made after the callback (which patched) was created, holds after
    the training: the user's later loops take the fast path, with plain Keras' results."""
    model = make()
    callback = kfp.FastPredict()
    if when == 'before fit':
        kfp.patch()
        fit(model, callback)
    else:
        fit(model, callback, At(kfp.patch))
    assert kfp.is_patched()
    got, expected, fast = predict_rows(model, X)
    assert fast == len(X)
    assert_same(got, expected)


def test_tf_keras_callback_leaves_the_users_patch_in_place():
    import tensorflow as tf
    tfk = tf.keras
    model = tfk.models.Sequential([tfk.layers.Dense(6, activation='relu', input_shape=(4,)),
                                   tfk.layers.Dense(2)])
    model.compile('sgd', 'mse')

    class Patch(tfk.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            kfp.patch()

    rng = np.random.RandomState(5)
    model.fit(rng.rand(8, 4).astype('float32'), rng.rand(8, 2).astype('float32'),
              batch_size=4, epochs=2, verbose=0,
              callbacks=[kfp.TfKerasFastPredict(), Patch()])
    assert kfp.is_patched()
    from conftest import FLAVOURS
    got, expected, fast = predict_rows(model, X, FLAVOURS['tf.keras'].unpatched_predict)
    assert fast == len(X)
    assert_same(got, expected)


def test_users_patch_during_training_keeps_the_users_options_not_the_callbacks():
    """The callback's options are put back after its training, but an option the user
    chose with patch() during it stays as the user chose it."""
    from keras_fastpredict.config import DEFAULTS, settings
    model = make()
    callback = kfp.FastPredict(timeout=30.0, concurrent=False)
    at = At(lambda: kfp.patch(timeout=5.0))
    fit(model, callback, at)
    assert (settings.timeout, settings.concurrent) == (5.0, DEFAULTS['concurrent'])
    got, expected, fast = predict_rows(model, X)
    assert fast == len(X)
    assert_same(got, expected)


@pytest.mark.parametrize('then_patch', [False, True], ids=['unpatch', 'unpatch, patch'])
def test_users_unpatch_during_training_is_not_undone(then_patch):
    """The user's unpatch() during training ends the callback's patch too: the training
    finishes (the callback's end does not fail), its predictions right throughout, and
    nothing comes back after it (no option of the callback's or of before the unpatch)
    unless the user patched again."""
    from keras_fastpredict.config import DEFAULTS, settings
    model = make()
    kfp.patch(timeout=5.0)
    callback = kfp.FastPredict(timeout=30.0)
    probe = Probe(X)

    def action():
        kfp.unpatch()
        if then_patch:
            kfp.patch()

    at = At(action)
    fit(model, callback, at, probe)
    assert at.patched == [True, True, then_patch, then_patch]
    assert kfp.is_patched() is then_patch
    assert settings.as_dict() == DEFAULTS
    for step, expected in enumerate(probe.expected):
        got = [np.asarray(s) for s in probe.seen[step * 4:step * 4 + 4]]
        assert_same(np.concatenate(got), expected)
    got, expected, fast = predict_rows(model, X)
    assert fast == (len(X) if then_patch else 0)
    assert_same(got, expected)


def test_two_callbacks_in_two_trainings_one_after_another():
    """Two callbacks made while unpatched: the patch lasts until the second's training
    ends, so its fit is wrapped too (and closes its scope when it raises)."""
    model = make()
    first, second = kfp.FastPredict(), kfp.FastPredict()
    fit(model, first)
    assert kfp.is_patched()              # the second may still train
    probe = Probe(X)
    with pytest.raises(RuntimeError):
        fit(model, second, probe, Boom())
    assert not kfp.is_patched()
    assert_same(np.concatenate([np.asarray(s) for s in probe.seen]), probe.expected[0])
    got, expected, fast = predict_rows(model, X)
    assert fast == 0
    assert_same(got, expected)


def test_two_callbacks_in_one_training():
    model = make()
    probe = Probe(X)
    fit(model, kfp.FastPredict(), kfp.FastPredict(), probe)
    assert not kfp.is_patched()
    for step, expected in enumerate(probe.expected):
        assert_same(np.concatenate(probe.seen[step * 4:step * 4 + 4]), expected)


def test_a_dropped_callback_does_not_unpatch_under_a_training_one():
    """The first of two callbacks made while unpatched is collected while the second
    trains: the patch holds until the second's training ends."""
    import gc
    model = make()
    held = [kfp.FastPredict()]
    second = kfp.FastPredict()
    probe = Probe(X)

    def drop():
        del held[:]
        gc.collect()

    at = At(drop)
    fit(model, second, at, probe)
    assert at.patched == [True] * 4
    assert all(type(s) is DeferredArray for s in probe.seen)
    for step, expected in enumerate(probe.expected):
        assert_same(np.concatenate(probe.seen[step * 4:step * 4 + 4]), expected)
    assert not kfp.is_patched()


@pytest.mark.parametrize('made', ['outside', 'inside'])
def test_patched_block_around_the_training(made):
    """``with patched():`` around fit: patched for the whole block, whenever the callback
    was made, and unpatched after it (nobody else asked)."""
    model = make()
    if made == 'outside':
        callback = kfp.FastPredict()
    with kfp.patched():
        if made == 'inside':
            callback = kfp.FastPredict()
        fit(model, callback)
        assert kfp.is_patched()
        got, expected, fast = predict_rows(model, X)
    assert fast == len(X)
    assert_same(got, expected)
    assert not kfp.is_patched()
    del callback
    assert not kfp.is_patched()


def test_patched_block_inside_the_training():
    from keras_fastpredict.config import DEFAULTS, settings
    model = make()
    seen = []

    def block():
        with kfp.patched(timeout=5.0):
            seen.append(settings.timeout)
        seen.append(settings.timeout)

    at = At(block)
    fit(model, kfp.FastPredict(timeout=30.0), at)
    assert seen == [5.0, 30.0]
    assert at.patched == [True] * 4
    assert not kfp.is_patched() and settings.as_dict() == DEFAULTS


def test_unused_callback_dropped_unpatches_only_if_nobody_else_asked():
    import gc
    callback = kfp.FastPredict()
    assert kfp.is_patched()
    del callback
    gc.collect()
    assert not kfp.is_patched()
    # The user patched after making it: the patch stays.
    callback = kfp.FastPredict()
    kfp.patch()
    del callback
    gc.collect()
    assert kfp.is_patched()
    kfp.unpatch()
    # Two made: dropping either leaves the other's patch.
    first, second = kfp.FastPredict(), kfp.FastPredict()
    del first
    gc.collect()
    assert kfp.is_patched()
    model = make()
    got, expected, fast = predict_rows(model, X)
    assert fast == len(X)
    assert_same(got, expected)
    del second
    gc.collect()
    assert not kfp.is_patched()


class CollectedDuringUpdate(object):
    """A callback kept alive only by a reference cycle, collected by the garbage collector
    while patching sets options (a collection may run at any allocation: here, just after
    ``settings.update`` has set them)."""

    def __init__(self, monkeypatch):
        from keras_fastpredict.config import settings
        callback = kfp.FastPredict()
        callback.cycle = callback
        self.held = [callback]
        original = settings.update

        def update(**options):
            saved = original(**options)
            if self.held:
                del self.held[:]
                gc.collect()
            return saved
        monkeypatch.setattr(settings, 'update', update)


@pytest.mark.parametrize('how', ['patch', 'patched'])
def test_a_callback_collected_while_the_user_patches_leaves_the_users_options(
        monkeypatch, how):
    """The last hold ends (an unused callback collected) in the middle of the user's
    patch(timeout=5.0): the patch is the user's, with the user's option (the release
    unpatched mid-way and reset it); predictions as plain Keras', on the fast path."""
    from keras_fastpredict.config import settings
    model = make()
    collected = CollectedDuringUpdate(monkeypatch)
    if how == 'patch':
        kfp.patch(timeout=5.0)
        state = kfp.is_patched(), settings.timeout
        got, expected, fast = predict_rows(model, X)
    else:
        with kfp.patched(timeout=5.0):
            state = kfp.is_patched(), settings.timeout
            got, expected, fast = predict_rows(model, X)
        assert not kfp.is_patched()         # nobody holds it after the block
    assert not collected.held
    assert state == (True, 5.0)
    assert fast == len(X)
    assert_same(got, expected)


def test_a_callback_dropped_after_a_training_that_raised_unwrapped_restores():
    """A callback reused after its first training (which unpatched) patches again when its
    second begins, but that fit was looked up unpatched: it raises without closing the
    callback. Dropped, the callback ends its patch and its options (it was kept alive by
    the record of option setters); predictions then as plain Keras', unpatched."""
    from keras_fastpredict.config import DEFAULTS, settings
    model = make()
    callback = kfp.FastPredict(timeout=30.0, defer=False)
    fit(model, callback)
    assert not kfp.is_patched()
    try:
        fit(model, callback, Boom())
    except RuntimeError:
        pass
    assert kfp.is_patched() and settings.timeout == 30.0     # open until dropped
    del callback
    gc.collect()
    assert not kfp.is_patched() and settings.as_dict() == DEFAULTS
    got, expected, fast = predict_rows(model, X)
    assert fast == 0
    assert_same(got, expected)
