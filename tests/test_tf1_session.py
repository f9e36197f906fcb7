"""The session callables of ``Session.run`` and ``K.function`` calls (adapters.tf1_session's
``Runner``): released when their runner is dropped while the process lives, and nothing
printed for them at interpreter exit."""
import gc
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import keras_fastpredict as kfp
from keras_fastpredict.adapters import session_run, tf1_session

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = [sys.executable, '-m', 'keras_fastpredict']
tf1 = tf.compat.v1

# A predict loop, Session.run of a tensor that is no model's output and of a model's output,
# and a K.function, kept to the end (the session in Keras' backend, the function in the
# script's globals): their runners die as the interpreter tears its modules down. Small
# integer weights and inputs: every sum is exact, plain and patched give the same bytes.
EXIT_SCRIPT = textwrap.dedent('''
    import sys
    import numpy as np
    import keras
    from keras import backend as K, layers
    if sys.argv[2:] == ['patch']:
        import keras_fastpredict
        keras_fastpredict.patch()
    model = keras.models.Sequential([layers.Dense(5, activation='relu', input_shape=(4,)),
                                     layers.Dense(3)])
    rng = np.random.RandomState(0)
    model.set_weights([rng.randint(-2, 3, w.shape).astype('float32')
                       for w in model.get_weights()])
    rows = [np.array(r[None]) for r in rng.randint(0, 4, (40, 4)).astype('float32')]
    sess = K.get_session()
    twice = model.output * 2
    f = K.function([model.input], [model.output])
    out = {'predict': np.concatenate([model.predict(r) for r in rows]),
           'run_twice': np.concatenate([sess.run(twice, {model.input: r}) for r in rows]),
           'run_list': np.concatenate([sess.run([model.output, twice], {model.input: r})[1]
                                       for r in rows]),
           'run_output': np.concatenate([sess.run(model.output, {model.input: r})
                                         for r in rows]),
           'function': np.concatenate([f([r])[0] for r in rows])}
    np.savez(sys.argv[1], **out)
''')


def _run(args, cwd):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=ROOT, PYTHONWARNINGS='ignore')
    return subprocess.run(args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=300)


@pytest.mark.parametrize('how', ['runner', 'patch'])
def test_nothing_is_printed_at_exit_for_session_callables(tmp_path, how):
    """Under the runner, "Exception ignored in: <function Runner.__del__ ...> TypeError:
    'NoneType' object is not callable" was printed at exit: a Session.run signature's
    runner, held by the session Keras keeps to the end, was dropped after the interpreter
    had set this package's module globals to None."""
    script = tmp_path / 'kept.py'
    script.write_text(EXIT_SCRIPT)
    plain = _run([sys.executable, str(script), str(tmp_path / 'plain.npz')], str(tmp_path))
    if how == 'runner':
        fast = _run(RUNNER + [str(script), str(tmp_path / 'fast.npz')], str(tmp_path))
    else:
        fast = _run([sys.executable, str(script), str(tmp_path / 'fast.npz'), 'patch'],
                    str(tmp_path))
    for proc in (plain, fast):
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert 'Exception ignored' not in proc.stderr, proc.stderr[-3000:]
    expected, got = np.load(str(tmp_path / 'plain.npz')), np.load(str(tmp_path / 'fast.npz'))
    assert sorted(got.files) == sorted(expected.files)
    assert expected['predict'].shape == (40, 3) and expected['predict'].any()
    for name in expected.files:
        assert got[name].dtype == expected[name].dtype, name
        assert got[name].tobytes() == expected[name].tobytes(), name


def test_a_runner_dropped_while_its_session_lives_releases_its_callables(monkeypatch):
    graph = tf1.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, (None, 3))
        y = tf.reduce_sum(x * 2.0, axis=1)
    sess = tf1.Session(graph=graph)
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    expected = sess.run(y, {x: data})
    released = []
    bound = tf1_session.bind()
    real = bound.release_callable

    def release(session, handle):
        released.append((session, handle))
        return real(session, handle)
    monkeypatch.setattr(bound, 'release_callable', release)
    with kfp.patched():
        for _ in range(3):
            assert sess.run(y, {x: data}).tobytes() == expected.tobytes()
        entry, = sess.__dict__[session_run._ATTR].entries.values()
        handles = [h for h in entry.runner.ways.handles if h is not None]
        assert handles
        del entry
        session_run.clear()             # drops every cached signature: its runner too
        gc.collect()
        assert sorted(h for _, h in released) == sorted(handles)
        assert all(s is sess._session for s, _ in released)
        assert sess.run(y, {x: data}).tobytes() == expected.tobytes()   # made again
    sess.close()
