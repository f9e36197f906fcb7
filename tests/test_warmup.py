"""engine.warmup: when TF's multi-row kernels are made (in a fresh process each: the
warm-up runs once per process)."""
import os
import subprocess
import sys

import numpy as np

from conftest import assert_same

SCRIPT = r'''
import sys
import numpy as np
from tensorflow.python.client import session as tf_session
made = []                                   # each session's graph, in order of creation
_init = tf_session.BaseSession.__init__
def init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    made.append(self.graph)
tf_session.BaseSession.__init__ = init
import keras_fastpredict as kfp
from keras_fastpredict.engine import warmup
from keras import backend as K, layers, models
model = models.Sequential([layers.Dense(8, input_shape=(4,)), layers.Dense(2)])
rows = [np.array(r) for r in np.random.RandomState(0).rand(300, 4).astype('float32')]
kfp.patch(auto_batch=sys.argv[2] == 'auto')
print('PATCHED', warmup._started)
session = K.get_session()           # Keras' session, its variables initialised by its runs
print('SESSION', warmup._started)
got = [model.predict(np.expand_dims(r, 0)) for r in rows]
got = np.concatenate(got)
assert warmup.done.wait(60) or not warmup._started
print('FIRST_SESSION_IS_KERAS', made[0] is session.graph, len(made))
kfp.unpatch()
np.save(sys.argv[1] + 'got.npy', got)
np.save(sys.argv[1] + 'plain.npy', np.concatenate([model.predict(r[None]) for r in rows]))
'''


def _run(tmp_path, mode):
    script = tmp_path / 'warm.py'
    script.write_text(SCRIPT)
    prefix = str(tmp_path / mode)
    out = subprocess.run([sys.executable, str(script), prefix, mode],
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same(np.load(prefix + 'got.npy'), np.load(prefix + 'plain.npy'))
    return out.stdout


def test_auto_batch_begins_the_kernels_when_keras_session_first_runs(tmp_path):
    """Under auto-batch the kernels are begun at the first session run that reaches us
    (Keras' variable initialisation, inside the first predict), not later at the model's
    entry; never before a session of the user's exists: the first session made in a
    process sets TF's thread pools for all, and the warm-up's own is made with one
    thread. Results of the collect loop as plain Keras' in the same process."""
    stdout = _run(tmp_path, 'auto')
    assert 'PATCHED False' in stdout
    assert 'SESSION True' in stdout
    assert 'FIRST_SESSION_IS_KERAS True 2' in stdout     # Keras', then the warm-up's


def test_without_auto_batch_a_session_begins_nothing(tmp_path):
    """Without auto-batch, a session's runs begin no warm-up (a loop of rows loaded one
    by one never runs several rows: test_readahead has when read-ahead begins it)."""
    stdout = _run(tmp_path, 'plain')
    assert 'SESSION False' in stdout
    assert 'FIRST_SESSION_IS_KERAS True 1' in stdout
