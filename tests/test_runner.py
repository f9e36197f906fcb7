"""python -m keras_fastpredict script.py args...: patched, and otherwise as ``python`` runs it.

The runner takes only its own options (those before the script or ``-m module``); the rest
passes through untouched. Each test compares against plain ``python script.py ...`` or
``python -m mod ...`` in a subprocess: sys.argv, sys.path (sys.path[0] is the script's real
folder, or the working directory for -m), __name__, exit code, errors.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), 'keras-fastpredict')
RUNNER = [sys.executable, '-m', 'keras_fastpredict']

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
    np.testing.assert_allclose(np.concatenate(ys), plain, rtol=1e-5, atol=1e-6)
    print('patched', keras_fastpredict.is_patched(), 'argv', sys.argv[1:], __name__)
    if sys.argv[1:] == ['fail']:
        raise KeyError('from the script')
    sys.exit(int(sys.argv[1]) if sys.argv[1:] else 0)
''')

# What the interpreter shows a script or module; no keras import, so it stays fast.
PROBE = textwrap.dedent('''
    import json, os, sys
    from keras_fastpredict.config import settings
    seen = {'argv': sys.argv, 'path': sys.path, 'name': __name__,
            'file': os.path.realpath(__file__), 'main': sys.modules['__main__'].__name__,
            'package': __package__, 'loader': type(__loader__).__name__,
            'is_main': sys.modules['__main__'].__dict__ is globals(),
            'patched': 'keras_fastpredict.patching' in sys.modules
                       and sys.modules['keras_fastpredict.patching'].is_patched(),
            'defer': settings.defer, 'max_batch_size': settings.max_batch_size}
    sys.stdout.write('PROBE' + json.dumps(seen) + '\\n')
    sys.stdout.flush()
    code = os.environ.get('PROBE_EXIT')
    if code == 'raise':
        raise KeyError('from the probe')
    sys.exit(int(code or 0))
''')


def env(**extra):
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=ROOT, **extra)


def call(cmd, cwd=None, **extra):
    return subprocess.run(cmd, cwd=cwd, env=env(**extra), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=300)


def probed(out):
    lines = [line for line in out.stdout.splitlines() if line.startswith('PROBE')]
    assert len(lines) == 1, (out.stdout, out.stderr[-3000:])
    return json.loads(lines[0][len('PROBE'):])


def same_as_python(python_args, runner_args, cwd, **extra):
    """Runs ``python *python_args`` and the runner with ``*runner_args``; returns both
    probes after checking that what the interpreter shows is the same."""
    plain = call([sys.executable] + python_args, cwd=cwd, **extra)
    fast = call(RUNNER + runner_args, cwd=cwd, **extra)
    want, got = probed(plain), probed(fast)
    for key in ('argv', 'path', 'name', 'file', 'main', 'package', 'loader', 'is_main'):
        assert got[key] == want[key], (key, got[key], want[key])
    assert fast.returncode == plain.returncode, (fast.stderr[-3000:], plain.stderr[-3000:])
    assert not want['patched'] and got['patched']
    return want, got, plain, fast


@pytest.fixture
def tree(tmp_path):
    """tmp/work (the working directory, with a module) and tmp/code/probe.py (the script),
    reached from work as ../code/probe.py and through a symlink link/p.py."""
    (tmp_path / 'work').mkdir()
    (tmp_path / 'code').mkdir()
    (tmp_path / 'code' / 'probe.py').write_text(PROBE)
    (tmp_path / 'work' / 'probemod.py').write_text(PROBE)
    (tmp_path / 'work' / 'link').mkdir()
    os.symlink(str(tmp_path / 'code' / 'probe.py'), str(tmp_path / 'work' / 'link' / 'p.py'))
    return tmp_path


def run(tmp_path, *args):
    script = tmp_path / 'legacy.py'
    script.write_text(SCRIPT)
    return call(RUNNER + ['--stats', str(script)] + list(args))


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
    out = call(RUNNER)
    assert out.returncode == 2 and 'script' in out.stderr


@pytest.mark.parametrize('script', ['../code/probe.py', 'link/p.py', 'ABS'])
def test_script_sees_what_python_shows_it(tree, script):
    # sys.path[0] is the real folder of the script (through the symlink too), replacing
    # the runner's own entry; the rest of sys.path is python's.
    if script == 'ABS':
        script = str(tree / 'code' / 'probe.py')
    args = [script, '--', '-q', '--stats', '--defer', '-m', 'x', '--max-batch-size', '3']
    want, got, _, fast = same_as_python(args, ['--max-batch-size', '5', '--stats'] + args,
                                        cwd=str(tree / 'work'), PROBE_EXIT='4')
    assert got['path'][0] == os.path.realpath(str(tree / 'code'))
    assert got['argv'] == args and fast.returncode == 4
    # Options after the script are the script's: only those before it reach the runner.
    assert got['max_batch_size'] == 5 and got['defer'] is False
    assert 'keras_fastpredict:' in fast.stderr          # --stats before the script


def test_options_after_the_script_are_not_the_runners(tree):
    args = ['../code/probe.py', '--stats', '--defer']
    want, got, _, fast = same_as_python(args, args, cwd=str(tree / 'work'))
    assert got['argv'] == args and got['defer'] is False
    assert 'keras_fastpredict:' not in fast.stderr


def test_double_dash_ends_the_runners_options(tree):
    same_as_python(['../code/probe.py', 'a'], ['--defer', '--', '../code/probe.py', 'a'],
                   cwd=str(tree / 'work'))


def test_module_sees_what_python_shows_it(tree):
    # python -m puts the working directory at sys.path[0].
    args = ['-q', '--', '--stats', 'x', '-m', 'y']
    for runner_args in (['-m', 'probemod'] + args, ['--defer', '-mprobemod'] + args):
        want, got, _, fast = same_as_python(['-m', 'probemod'] + args, runner_args,
                                            cwd=str(tree / 'work'), PROBE_EXIT='3')
        assert got['path'][0] == os.path.realpath(str(tree / 'work'))
        assert got['argv'][1:] == args and got['name'] == '__main__'
        assert fast.returncode == 3


def test_package_that_replaces_its_module_runs_as_python_runs_it(tree):
    # As celery does (`python -m celery worker`): its __init__ puts another module object,
    # one without __spec__, in sys.modules; python -m looks the package up only once.
    pkg = tree / 'work' / 'selfswap'
    pkg.mkdir()
    (pkg / '__init__.py').write_text(textwrap.dedent('''
        import sys, types
        new = types.ModuleType(__name__)      # its __spec__ is None
        new.__path__, new.__file__ = __path__, __file__
        sys.modules[__name__] = new
    '''))
    (pkg / '__main__.py').write_text(PROBE)
    want, got, _, _ = same_as_python(['-m', 'selfswap', 'a'], ['-m', 'selfswap', 'a'],
                                     cwd=str(tree / 'work'))
    assert got['argv'][1:] == ['a'] and got['name'] == '__main__'


def test_directory_with_main_sees_what_python_shows_it(tree):
    (tree / 'work' / 'app').mkdir()
    (tree / 'work' / 'app' / '__main__.py').write_text(PROBE)
    want, got, _, _ = same_as_python(['app', '-q'], ['app', '-q'], cwd=str(tree / 'work'))
    assert got['path'][0] == 'app'


def test_exceptions_and_exit_codes_pass_through(tree):
    for code in ('0', '1', '7', 'raise'):
        _, _, plain, fast = same_as_python(['../code/probe.py'], ['../code/probe.py'],
                                           cwd=str(tree / 'work'), PROBE_EXIT=code)
        assert (code == 'raise') == ("KeyError: 'from the probe'" in fast.stderr)


def test_missing_script_or_module_fails_as_python_does(tree):
    for args in (['nonexistent.py'], ['-m', 'nonexistent_module_kfp']):
        plain = call([sys.executable] + args, cwd=str(tree))
        fast = call(RUNNER + args, cwd=str(tree))
        assert fast.returncode == plain.returncode, fast.stderr
        message = plain.stderr.strip().split(': ', 1)[1]
        assert message in fast.stderr and 'Traceback' not in fast.stderr


def test_pytest_as_a_module_with_its_own_options(tree):
    # The case from the issue: `-q` belongs to pytest, not to the runner.
    (tree / 'work' / 'test_inside.py').write_text(textwrap.dedent('''
        import os
        import keras_fastpredict
        def test_patched():
            assert keras_fastpredict.is_patched() == (os.environ['EXPECT'] == 'patched')
    '''))
    args = ['-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-p', 'no:xdist', 'test_inside.py']
    for cmd, expect in (([sys.executable], 'plain'), (RUNNER, 'patched')):
        out = call(cmd + args, cwd=str(tree / 'work'), EXPECT=expect)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert '1 passed' in out.stdout and 'test session starts' not in out.stdout


@pytest.mark.skipif(not os.path.exists(CONSOLE_SCRIPT), reason='console script not installed')
def test_console_script_sees_what_python_shows_it(tree):
    for python_args, runner_args in ((['../code/probe.py', '-q'], ['../code/probe.py', '-q']),
                                     (['-m', 'probemod', '-q'], ['-m', 'probemod', '-q'])):
        plain = call([sys.executable] + python_args, cwd=str(tree / 'work'))
        fast = call([CONSOLE_SCRIPT, '--defer'] + runner_args, cwd=str(tree / 'work'))
        want, got = probed(plain), probed(fast)
        for key in ('argv', 'path', 'name', 'file', 'main', 'package', 'loader', 'is_main'):
            assert got[key] == want[key], (key, got[key], want[key])
        assert got['patched'] and got['defer'] is True


def test_under_the_runner_every_model_is_noted_and_sess_run_finds_it_unscanned(tmp_path):
    """The runner patches before keras is imported: models are noted as they are made,
    so Session.run of a model's tensors never scans the heap; results as plain TF."""
    script = tmp_path / 'noted.py'
    script.write_text(textwrap.dedent('''
        import numpy as np
        from keras import backend as K, layers, models
        from keras_fastpredict.adapters import model_path
        model_path._scan = lambda: 1 / 0          # a scan would raise
        model = models.Sequential([layers.Dense(4, input_shape=(3,))])
        model.set_weights([np.arange(12.).reshape(3, 4) / 10, np.ones(4)])
        sess = K.get_session()
        x = np.random.RandomState(0).rand(20, 3).astype('float32')
        got = np.concatenate([sess.run(model.output, {model.input: x[i:i + 1].copy()})
                              for i in range(20)])
        import keras_fastpredict
        print('NOTED', model_path.noting.complete,
              keras_fastpredict.stats(model)['fast_calls'] >= 19)
        np.save(%r, got)
    ''' % str(tmp_path / 'got.npy')))
    out = call(RUNNER + [str(script)])
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'NOTED True True' in out.stdout, out.stdout
    import numpy as np
    from keras import backend as K, layers, models
    model = models.Sequential([layers.Dense(4, input_shape=(3,))])     # plain TF, here
    model.set_weights([np.arange(12.).reshape(3, 4) / 10, np.ones(4)])
    x = np.random.RandomState(0).rand(20, 3).astype('float32')
    plain = K.get_session().run(model.output, {model.input: x})
    np.testing.assert_allclose(np.load(str(tmp_path / 'got.npy')), plain, rtol=1e-5,
                               atol=1e-6)


# A pre-fork server's worker (gunicorn's) is os.fork() without exec, and it ends with
# sys.exit(): the SystemExit unwinds through the master's frames, the runner's included.
FORK_THEN_SYS_EXIT = textwrap.dedent('''
    import os, sys
    import numpy as np
    import keras

    def predict(rows):
        model = keras.models.Sequential([keras.layers.Dense(2, input_shape=(3,))])
        for i in range(rows):
            model.predict(np.ones((1, 3), 'float32'))

    pid = os.fork()                 # before any session, as a pre-fork server does
    if pid == 0:
        predict(5)
        sys.exit(0)
    _, status = os.waitpid(pid, 0)
    print('PARENT', os.getpid(), 'child status', status, flush=True)
    predict(3)
''')


def test_a_forked_child_ending_with_sys_exit_leaves_the_runners_work_to_it(tmp_path):
    """The child's SystemExit passes the runner's own end: it must not print the job's
    table, remove the job's stats folder nor write the runner's JSON file; the runner
    still counts the child's report."""
    script = tmp_path / 'fork_exit.py'
    script.write_text(FORK_THEN_SYS_EXIT)
    path = tmp_path / 'sites.json'
    out = call(RUNNER + ['--stats', '--stats-json', str(path), str(script)])
    assert out.returncode == 0, out.stderr[-3000:]
    parent = int(out.stdout.split('PARENT ')[1].split()[0])
    assert 'child status 0' in out.stdout
    # One job table and one line for the other processes, from the runner alone.
    assert out.stderr.count('\nkeras_fastpredict: model ') + out.stderr.startswith(
        'keras_fastpredict: model ') == 1, out.stderr
    assert out.stderr.count('other processes of the job: ') == 1, out.stderr
    line = out.stderr.split('other processes of the job: ')[1].splitlines()[0]
    assert line.startswith('1 predicted, 5 calls, 5 fast, 0 fallbacks'), line
    assert json.loads(path.read_text())['pid'] == parent
    children = [p for p in tmp_path.iterdir() if p.name.startswith('sites.') and p.name
                != 'sites.json']
    assert len(children) == 1 and json.loads(children[0].read_text())['pid'] != parent


EXIT_SCRIPT = textwrap.dedent('''
    import numpy as np
    import tensorflow as tf             # (imported first, as many scripts do)
    import keras
    from keras import backend as K
    model = keras.models.Sequential([keras.layers.Dense(2, input_shape=(3,))])
    model.set_weights([np.arange(6.).reshape(3, 2) / 7, np.array([.5, -.25])])
    f = K.function([model.input], [model.output])
    rows = np.random.RandomState(0).rand(40, 3).astype('float32')


    def predict(x):
        return f([x])[0]


    out = np.concatenate([predict(np.array(r[None])) for r in rows])
    print('SUM %.6f' % out.sum())
''')


@pytest.mark.parametrize('how', ['script', 'module'])
def test_objects_of_the_script_are_freed_at_exit_as_python_frees_them(tmp_path, how):
    """Found by the first-pass benchmark: a K.function kept by a script's globals printed
    "Exception ignored in: BaseSession._Callable.__del__ ... AttributeError" twice at exit
    under the runner (its callables outlived TensorFlow's modules), never under python.
    The script's namespace is __main__ until the end, as python keeps it."""
    (tmp_path / 'exitmod.py').write_text(EXIT_SCRIPT)
    args = [str(tmp_path / 'exitmod.py')] if how == 'script' else ['-m', 'exitmod']
    plain = call([sys.executable] + args, cwd=str(tmp_path))
    fast = call(RUNNER + args, cwd=str(tmp_path))
    assert plain.returncode == fast.returncode == 0, fast.stderr[-3000:]
    sums = [[ln for ln in out.stdout.splitlines() if ln.startswith('SUM')]
            for out in (plain, fast)]
    assert sums[0] == sums[1] and len(sums[0]) == 1
    assert 'Exception ignored' not in plain.stderr
    assert 'Exception ignored' not in fast.stderr, fast.stderr[-3000:]


TRAINS_WITH_THE_CALLBACK = textwrap.dedent('''
    import os, sys
    import numpy as np
    import keras
    import keras_fastpredict
    from keras_fastpredict.config import settings
    model = keras.models.Sequential([keras.layers.Dense(6, activation='relu', input_shape=(4,)),
                                     keras.layers.Dense(2)])
    model.set_weights([np.arange(24.).reshape(4, 6) / 24 - .5, np.zeros(6),
                       np.arange(12.).reshape(6, 2) / 12 - .5, np.zeros(2)])
    model.compile('sgd', 'mse')
    rng = np.random.RandomState(5)
    x, y = rng.rand(8, 4).astype('float32'), rng.rand(8, 2).astype('float32')
    callbacks = [keras_fastpredict.FastPredict(timeout=30.0)] if sys.argv[2:] else []
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, shuffle=False, callbacks=callbacks)
    del callbacks[:]
    rows = np.concatenate([model.predict(x[i:i + 1].copy()) for i in range(8)])
    print('STATE', keras_fastpredict.is_patched(), settings.timeout,
          keras_fastpredict.stats(model)['fast_calls'])
    np.save(sys.argv[1], rows)
    np.savez(sys.argv[1] + '.weights.npz', *model.get_weights())
''')


def test_a_callback_under_the_runner_leaves_its_patch_and_options(tmp_path):
    """The runner's patch is the user's: a FastPredict callback's end leaves it, with the
    runner's options (not the callback's); the loop after the training is fast, with the
    results of plain Keras (here, unpatched) for the trained weights (training itself
    differs run to run by ~3e-5, in plain python too). Plain python's own run of the
    script: unpatched after the callback's training."""
    import numpy as np
    from keras import layers, models
    script = tmp_path / 'train.py'
    script.write_text(TRAINS_WITH_THE_CALLBACK)
    plain = call([sys.executable, str(script), str(tmp_path / 'plain.npy'), 'callback'])
    fast = call(RUNNER + [str(script), str(tmp_path / 'fast.npy'), 'callback'],
                KERAS_FASTPREDICT_TIMEOUT='5')
    assert plain.returncode == 0 and fast.returncode == 0, (plain.stderr[-3000:],
                                                            fast.stderr[-3000:])
    assert 'STATE False None 0' in plain.stdout, plain.stdout
    assert 'STATE True 5.0 8' in fast.stdout, fast.stdout
    weights = np.load(str(tmp_path / 'fast.npy.weights.npz'))
    model = models.Sequential([layers.Dense(6, activation='relu', input_shape=(4,)),
                               layers.Dense(2)])
    model.set_weights([weights['arr_%d' % i] for i in range(4)])
    x = np.random.RandomState(5).rand(8, 4).astype('float32')
    np.testing.assert_allclose(np.load(str(tmp_path / 'fast.npy')), model.predict(x),
                               rtol=1e-5, atol=1e-6)
