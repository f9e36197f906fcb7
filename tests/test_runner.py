"""python -m keras_fastpredict script.py args...: patched, argv, exit code and errors pass through."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import sys
    import numpy as np
    import keras
    from keras.engine.training import Model
    import keras_fastpredict
    model = keras.models.Sequential([keras.layers.Dense(2, input_shape=(3,))])
    x = np.random.rand(20, 3).astype('float32')
    ys = [model.predict(x[i:i + 1]) for i in range(20)]
    plain = Model.predict.__wrapped__(model, x)
    np.testing.assert_allclose(np.concatenate(ys), plain, rtol=1e-5)
    print('patched', keras_fastpredict.is_patched(), 'argv', sys.argv[1:], __name__)
    if sys.argv[1:] == ['fail']:
        raise KeyError('from the script')
    sys.exit(int(sys.argv[1]) if sys.argv[1:] else 0)
''')


def run(tmp_path, *args):
    script = tmp_path / 'legacy.py'
    script.write_text(SCRIPT)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, '-m', 'keras_fastpredict', '--stats', str(script)]
                          + list(args), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=300)


def test_runs_script_patched_with_its_argv_and_exit_code(tmp_path):
    out = run(tmp_path, '3', )
    assert out.returncode == 3, out.stderr[-2000:]
    assert "patched True argv ['3'] __main__" in out.stdout
    assert 'keras_fastpredict:' in out.stderr and 'sequential_1' in out.stderr


def test_script_exception_passes_through(tmp_path):
    out = run(tmp_path, 'fail')
    assert out.returncode == 1
    assert "KeyError: 'from the script'" in out.stderr


def test_runner_needs_a_script():
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, '-m', 'keras_fastpredict'], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, timeout=120)
    assert out.returncode == 2 and 'script' in out.stderr
