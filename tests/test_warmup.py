"""engine.warmup: when TF's multi-row kernels are made (in a fresh process each: the
warm-up runs once per process)."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import keras_fastpredict as kfp
from conftest import assert_same, inputs_for, unpatched_predict

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


POOL_SCRIPT = r'''
import sys, threading, time
import numpy as np
import tensorflow as tf
server = tf.train.Server.create_local_server()      # its sessions set no local pools
x = tf.compat.v1.placeholder(tf.float32, (None, 8))
y = tf.matmul(x, tf.ones((8, 8)))
with tf.compat.v1.Session(server.target) as remote:
    remote.run(y, {x: np.ones((1, 8))})
warmup = sys.modules.get('keras_fastpredict.engine.warmup')
if warmup is not None and warmup._started:
    assert warmup.done.wait(60)
lock = threading.Lock()
now = [0, 0]
def slow(v):
    with lock:
        now[0] += 1
        now[1] = max(now[1], now[0])
    time.sleep(0.3)
    with lock:
        now[0] -= 1
    return v
outs = [tf.compat.v1.py_func(slow, [tf.constant(float(i))], tf.float32) for i in range(4)]
with tf.compat.v1.Session() as local:     # the process' first local session
    print('SUM', local.run(tf.add_n(outs)))
print('AT_ONCE', now[1])
'''


def test_the_warm_up_session_never_sets_the_process_inter_op_pool(tmp_path):
    """A session on a server (here one in the process) sets none of TF's global pools:
    the first local session does. The warm-up's session, begun at the remote session's
    first run under auto-batch, must not be that one (its one inter-op thread became the
    pool of every later session: the user's local session ran its ops one at a time,
    where plain runs two at once on this machine). Compared with plain TF."""
    script = tmp_path / 'pools.py'
    script.write_text(POOL_SCRIPT)
    outs = []
    for command in ([sys.executable], [sys.executable, '-m', 'keras_fastpredict', '--auto-batch']):
        out = subprocess.run(command + [str(script)],
                             env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        outs.append([line for line in out.stdout.splitlines()
                     if line.startswith(('SUM', 'AT_ONCE'))])
    assert outs[0][0] == 'SUM 6.0' and outs[0][1] != 'AT_ONCE 1'   # (else nothing to see)
    assert outs[1] == outs[0]


def _kernels_being_made(monkeypatch, made_after=None):
    """The warm-up as if still making TF's multi-row kernels (set made after
    ``made_after`` model runs, if given); returns the list of each run's row count, kept
    from the next call on."""
    from keras_fastpredict.engine import compiled, warmup
    kernels = threading.Event()
    monkeypatch.setattr(warmup, 'done', kernels)
    monkeypatch.setattr(warmup, '_started', True)
    runs = []
    run = compiled.CompiledModel.run

    def counted(self, arrays, *args, **kwargs):
        runs.append(arrays[0].shape[0])
        if len(runs) == made_after:
            kernels.set()
        return run(self, arrays, *args, **kwargs)

    monkeypatch.setattr(compiled.CompiledModel, 'run', counted)
    return runs


@pytest.mark.parametrize('name', ['dense', 'multi_out'])
def test_a_merged_run_never_waits_for_the_kernels(models, monkeypatch, name):
    """While TF's multi-row kernels are still being made on their thread, a run of several
    rows would wait for them (25-40 ms, more on a loaded machine: a short collect loop
    under auto-batch was slower than plain). A deferred batch's calls then run alone, as
    the fast path runs one row, and the calls left once the kernels are made run as one
    batch. Each result as plain Keras' for its own row, in call order."""
    model = models[name]
    x = inputs_for(name, 40)
    expected = [unpatched_predict(model, x[i:i + 1]) for i in range(40)]
    kfp.patch(readahead=False)
    model.predict(x[:1])                                # the model's entry made
    runs = _kernels_being_made(monkeypatch, made_after=10)
    with kfp.batching():
        got = [model.predict(x[i:i + 1]) for i in range(40)]
        assert runs == []                               # deferred, nothing ran yet
        got = [[np.array(o) for o in y] if type(y) is list else np.array(y) for y in got]
    assert runs == [1] * 10 + [30]
    for y, e in zip(got, expected):
        assert_same(y, e)


def test_calls_of_several_rows_wait_for_the_kernels_as_plain_keras_does(models,
                                                                        monkeypatch):
    """Only our merging of calls is spared the wait: a call of several rows runs as one
    run, as plain Keras runs it (and waits for the kernels as plain Keras does)."""
    model = models['dense']
    x = inputs_for('dense', 12)
    expected = [unpatched_predict(model, x[i:i + 3]) for i in range(0, 12, 3)]
    kfp.patch(readahead=False)
    model.predict(x[:1])
    runs = _kernels_being_made(monkeypatch)
    with kfp.batching():
        got = [model.predict(x[i:i + 3]) for i in range(0, 12, 3)]
        got = [np.array(y) for y in got]
    assert runs == [3] * 4
    for y, e in zip(got, expected):
        assert_same(y, e)


def test_a_warm_up_thread_that_cannot_start_leaves_nothing_waiting(monkeypatch):
    # RuntimeError("can't start new thread") (a thread limit): start() raises nothing, and
    # the kernels count as made (merged runs pay them inline, 25-40 ms once), so neither a
    # merge trial nor read-ahead waits for them for good.
    from keras_fastpredict.engine import warmup
    monkeypatch.setattr(warmup, 'done', threading.Event())
    monkeypatch.setattr(warmup, '_started', False)

    class NoThread(object):
        def __init__(self, *args, **kwargs):
            pass

        def start(self):
            raise RuntimeError("can't start new thread")
    monkeypatch.setattr(warmup, '_Thread', NoThread)
    warmup.start()
    assert warmup.ready() and warmup.done.is_set()
