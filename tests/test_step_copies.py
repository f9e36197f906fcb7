"""Unrolled recurrent layers built from copies of one time step's ops
(engine.step_copies): the same outputs as plain Keras, one template per layer."""
import numpy as np
import pytest
import keras
from keras import layers as L

import keras_fastpredict as kfp
from keras_fastpredict.adapters import keras as keras_adapter
from keras_fastpredict.engine import step_copies
from conftest import assert_same, unpatched_predict


def rand(*shape, seed=0):
    return np.random.RandomState(seed).rand(*shape).astype('float32')


def built_at_first_call_against_plain(model, rows):
    """Each row predicted plainly, then patched with the inference graph built at the
    first call; results compared; the graph must be in use."""
    expected = [unpatched_predict(model, r) for r in rows]
    kfp.patch(inference_graph=True)
    got = [model.predict(r) for r in rows]
    for g, e in zip(got, expected):
        assert_same(g, e)
    assert keras_adapter.lookup(model).inference_graph.startswith('used')


@pytest.mark.parametrize('layer', [
    lambda: L.LSTM(8, input_shape=(9, 3)),
    lambda: L.GRU(5, return_sequences=True, go_backwards=True, input_shape=(9, 3)),
    lambda: L.Bidirectional(L.SimpleRNN(4), input_shape=(9, 3)),
])
def test_copies_equal_plain_keras_and_one_template_per_layer(monkeypatch, layer):
    templates, copies = [], []
    made, copy = step_copies._Template.__init__, step_copies._Template.copy

    def counted(self, *args):
        templates.append(self)
        made(self, *args)

    def copied(self, flat):
        copies.append(self)
        return copy(self, flat)
    monkeypatch.setattr(step_copies._Template, '__init__', counted)
    monkeypatch.setattr(step_copies._Template, 'copy', copied)
    model = keras.models.Sequential([layer(), L.Dense(2)])
    rows = [rand(1, 9, 3, seed=i) for i in range(8)] + [rand(16, 9, 3, seed=9)]
    built_at_first_call_against_plain(model, rows)
    rnns = 2 if isinstance(model.layers[0], L.Bidirectional) else 1
    assert len(templates) == rnns
    assert len(copies) == 9 * rnns          # every time step of every layer a copy


def test_a_step_that_cannot_be_copied_runs_keras_own(monkeypatch):
    """A template that fails to copy leaves that layer to Keras' own step function."""
    def broken(self, flat):
        raise ValueError('cannot copy')
    monkeypatch.setattr(step_copies._Template, 'copy', broken)
    model = keras.models.Sequential([L.LSTM(4, input_shape=(6, 3)), L.Dense(2)])
    built_at_first_call_against_plain(model, [rand(1, 6, 3, seed=i) for i in range(6)])
