"""Settings: one table of defaults, keyword options, KERAS_FASTPREDICT_* variables."""
import pytest

import keras_fastpredict as kfp
from keras_fastpredict import config
from keras_fastpredict.config import settings


def test_environment_variables_are_parsed():
    env = {'KERAS_FASTPREDICT_READAHEAD': 'off', 'KERAS_FASTPREDICT_MAX_BATCH_SIZE': '256',
           'KERAS_FASTPREDICT_VERIFY': 'true', 'KERAS_FASTPREDICT_TIMEOUT': '2.5',
           'KERAS_FASTPREDICT_UNRELATED': 'x'}
    assert config.from_environ(env) == {'readahead': False, 'max_batch_size': 256,
                                        'verify': True, 'timeout': 2.5}


def test_unknown_or_invalid_options_are_refused():
    with pytest.raises(TypeError, match='bogus'):
        kfp.patch(bogus=1)
    with pytest.raises(ValueError):
        kfp.patch(verify='sometimes')
    assert not kfp.is_patched()


def test_patched_restores_previous_options():
    with kfp.patched(max_batch_size=5):
        assert settings.max_batch_size == 5
    assert settings.max_batch_size == config.DEFAULTS['max_batch_size']


def test_queue_is_unbounded_unless_a_bound_is_set():
    """Issue 9 item 11: plain Keras never refuses a call, so by default nothing is."""
    assert config.DEFAULTS['max_enqueued_batches'] is None
    assert config.from_environ({'KERAS_FASTPREDICT_MAX_ENQUEUED_BATCHES': '8'}) == {
        'max_enqueued_batches': 8}
    assert config.from_environ({'KERAS_FASTPREDICT_MAX_ENQUEUED_BATCHES': 'none'}) == {
        'max_enqueued_batches': None}


def test_merge_and_run_slots_options():
    # merge: 'auto' | True | False, as verify; num_batch_threads: None means the cores.
    assert config.DEFAULTS['merge'] == 'auto' and config.DEFAULTS['num_batch_threads'] is None
    assert config.from_environ({'KERAS_FASTPREDICT_MERGE': 'off',
                                'KERAS_FASTPREDICT_NUM_BATCH_THREADS': '3'}) == {
        'merge': False, 'num_batch_threads': 3}
    assert config.from_environ({'KERAS_FASTPREDICT_MERGE': 'auto',
                                'KERAS_FASTPREDICT_NUM_BATCH_THREADS': 'none'}) == {
        'merge': 'auto', 'num_batch_threads': None}
    with pytest.raises(ValueError, match="merge must be True, False or 'auto'"):
        kfp.patch(merge='sometimes')
    assert not kfp.is_patched()
