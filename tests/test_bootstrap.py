"""The bootstrap sitecustomize (keras_fastpredict/bootstrap): children of the runner patch
themselves on their first ``import keras``, import nothing heavy before, still run the
user's own sitecustomize, report per process; a child with a cleaned environment is left
as plain python. Each case is compared with the same child run plainly.
"""
import json
import os
import subprocess
import sys
import textwrap

from keras_fastpredict import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = [sys.executable, '-m', 'keras_fastpredict']


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith('KERAS_FASTPREDICT_') and k != 'PYTHONPATH'}
    env.update(TF_CPP_MIN_LOG_LEVEL='3', PYTHONWARNINGS='ignore', **extra)
    return env


def call(cmd, cwd=ROOT, **extra):
    out = subprocess.run(cmd, cwd=cwd, env=clean_env(**extra), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, universal_newlines=True, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def seen(out, tag='SEEN'):
    return [json.loads(l[len(tag) + 1:]) for l in out.stdout.splitlines()
            if l.startswith(tag + ' ')]


# A child started by the script: what it has imported before and after `import keras`,
# and whether predict is patched and equal to plain Keras.
CHILD = textwrap.dedent('''
    import json, sys
    heavy = sorted(m for m in ('numpy', 'tensorflow', 'keras', 'keras_fastpredict')
                   if m in sys.modules)
    import numpy as np
    import keras
    from keras.engine.training import Model
    import keras_fastpredict
    model = keras.models.Sequential([keras.layers.Dense(2, input_shape=(3,))])
    x = np.random.RandomState(0).rand(8, 3).astype('float32')
    ys = np.concatenate([model.predict(x[i:i + 1]) for i in range(8)])
    plain = getattr(Model.predict, '__wrapped__', Model.predict)(model, x)
    print('SEEN ' + json.dumps({'before_keras': heavy, 'patched': keras_fastpredict.is_patched(),
          'defer': keras_fastpredict.config.settings.defer,
          'max_diff': float(abs(ys - plain).max()),
          'fast': sum(s['fast_calls'] for s in keras_fastpredict.stats().values())}))
''')

PARENT = textwrap.dedent('''
    import subprocess, sys
    child = sys.argv[1]
    print(subprocess.run([sys.executable, child], stdout=subprocess.PIPE,
                         universal_newlines=True).stdout, end='')
    print(subprocess.run(['env', '-i', 'TF_CPP_MIN_LOG_LEVEL=3', sys.executable, child],
                         stdout=subprocess.PIPE, universal_newlines=True).stdout, end='')
''')


def test_children_patched_on_import_keras_and_env_i_left_plain(tmp_path):
    (tmp_path / 'child.py').write_text(CHILD)
    (tmp_path / 'parent.py').write_text(PARENT)
    args = [str(tmp_path / 'parent.py'), str(tmp_path / 'child.py')]
    plain_child, plain_clean = seen(call([sys.executable] + args))
    child, clean = seen(call(RUNNER + ['--defer', '--stats'] + args))
    # Patched, with the runner's options, importing nothing heavy before keras.
    assert child['patched'] and child['defer'] and child['fast'] == 8
    assert child['before_keras'] == plain_child['before_keras'] == []
    assert child['max_diff'] <= 1e-5 and plain_child['max_diff'] <= 1e-5
    # env -i: no PYTHONPATH, no options: the child is plain python, as without the runner.
    assert clean.pop('max_diff') <= 1e-5 and plain_clean.pop('max_diff') <= 1e-5
    assert clean == plain_clean and not clean['patched'] and clean['fast'] == 0


def test_users_sitecustomize_still_runs(tmp_path):
    site = tmp_path / 'usersite'
    site.mkdir()
    (site / 'sitecustomize.py').write_text(textwrap.dedent('''
        import os, sys
        sys.path.append('/users-sitecustomize-was-here')
        os.environ['USER_SITECUSTOMIZE'] = __file__
    '''))
    probe = tmp_path / 'probe.py'
    probe.write_text(textwrap.dedent('''
        import json, os, sys
        import sitecustomize
        print('SEEN ' + json.dumps({'ran': os.environ.get('USER_SITECUSTOMIZE'),
              'module': sitecustomize.__file__, 'path': sys.path[1:]}))
    '''))
    plain = seen(call([sys.executable, str(probe)], PYTHONPATH=str(site)))[0]
    # The probe runs as a child, started with the environment the runner hands on.
    launcher = tmp_path / 'launch.py'
    launcher.write_text('import subprocess, sys\n'
                        'subprocess.run([sys.executable, sys.argv[1]], check=True)\n')
    fast = seen(call(RUNNER + [str(launcher), str(probe)], PYTHONPATH=str(site)))[0]
    assert plain['ran'] == plain['module'] == str(site / 'sitecustomize.py')
    assert fast['ran'] == fast['module'] == plain['module']
    # sys.path as plain python has it, plus the bootstrap folder first.
    assert fast['path'] == [processes.BOOTSTRAP_DIR] + plain['path']


def test_error_in_users_sitecustomize_reported_as_python_does(tmp_path):
    site = tmp_path / 'usersite'
    site.mkdir()
    (site / 'sitecustomize.py').write_text('raise ValueError("broken site")\n')
    plain = call([sys.executable, '-c', 'print("ok")'], PYTHONPATH=str(site))
    fast = call([sys.executable, '-c', 'import keras_fastpredict as k; print("ok", k.is_patched())'],
                PYTHONPATH=os.pathsep.join([processes.BOOTSTRAP_DIR, str(site)]))
    assert 'Error in sitecustomize' in plain.stderr and 'broken site' in plain.stderr
    assert 'Error in sitecustomize' in fast.stderr and 'broken site' in fast.stderr
    assert fast.stdout.strip() == 'ok True'


def test_pytest_xdist_workers_patched(tmp_path):
    # The case from the issue: `pytest -n 2` under the runner reported no predict calls.
    tests = tmp_path / 'tiny'
    tests.mkdir()
    (tests / 'test_tiny.py').write_text(textwrap.dedent('''
        import os
        import numpy as np
        import pytest
        import keras
        from keras.engine.training import Model
        import keras_fastpredict

        @pytest.mark.parametrize('seed', range(4))
        def test_predict(seed):
            assert keras_fastpredict.is_patched() == (os.environ['EXPECT'] == 'patched')
            model = keras.models.Sequential([keras.layers.Dense(2, input_shape=(3,))])
            x = np.random.RandomState(seed).rand(5, 3).astype('float32')
            ys = np.concatenate([model.predict(x[i:i + 1]) for i in range(5)])
            plain = getattr(Model.predict, '__wrapped__', Model.predict)(model, x)
            np.testing.assert_allclose(ys, plain, rtol=1e-5, atol=1e-6)
    '''))
    args = ['-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-n', '2', str(tests)]
    plain = call([sys.executable] + args, cwd=str(tmp_path), EXPECT='plain')
    fast = call(RUNNER + ['--stats'] + args, cwd=str(tmp_path), EXPECT='patched')
    assert '4 passed' in plain.stdout and '4 passed' in fast.stdout, fast.stdout
    assert 'other processes of the job: 2 predicted, 20 calls, 20 fast, 0 fallbacks' \
        in fast.stderr, fast.stderr[-3000:]
