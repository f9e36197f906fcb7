"""FastPredict callback: predictions made during fit are fast, batched, and see the weights
of the step they were made in."""
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
