"""import_freeze: under the runner and in the processes it starts, the objects that exist
when TensorFlow's import ends are frozen for the garbage collector; the script's later
objects (its models) are collected as under python, and its results are python's."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = [sys.executable, '-m', 'keras_fastpredict']

SCRIPT = textwrap.dedent('''
    import gc
    import subprocess
    import sys
    import weakref
    import numpy as np
    import tensorflow as tf
    print('FROZEN', gc.get_freeze_count() > 100000)
    from keras import layers, models
    model = models.Sequential([layers.Dense(4, input_shape=(3,), kernel_initializer='ones'),
                               layers.Dense(2, kernel_initializer='ones')])
    x = np.arange(30, dtype='float32').reshape(10, 3)
    out = np.concatenate([model.predict(x[i:i + 1]) for i in range(10)])
    print('OUT', out.tolist())
    model.predict_function = None
    ref = weakref.ref(model)
    del model
    gc.collect()
    print('FREED', ref() is None)
    child = subprocess.run(
        [sys.executable, '-c', 'import gc, tensorflow; print(gc.get_freeze_count() > 100000)'],
        stdout=subprocess.PIPE, universal_newlines=True)
    print('CHILD_FROZEN', child.stdout.strip())
''')


def _run(tmp_path, command, **env):
    script = tmp_path / 'freeze.py'
    script.write_text(SCRIPT)
    out = subprocess.run(command + [str(script)], cwd=str(tmp_path),
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=ROOT, **env),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         universal_newlines=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'Exception ignored' not in out.stderr, out.stderr[-3000:]
    return dict(line.split(' ', 1) for line in out.stdout.splitlines()
                if line.split(' ')[0] in ('FROZEN', 'OUT', 'FREED', 'CHILD_FROZEN'))


def test_the_runner_freezes_tensorflows_import_and_nothing_after(tmp_path):
    """Under the runner TensorFlow's import objects are frozen, in the script and in a
    process it starts; a model made after is freed when dropped, as under python; the
    outputs are python's."""
    plain = _run(tmp_path, [sys.executable])
    fast = _run(tmp_path, RUNNER)
    assert plain['FROZEN'] == 'False' and plain['CHILD_FROZEN'] == 'False'
    assert fast['FROZEN'] == 'True' and fast['CHILD_FROZEN'] == 'True'
    assert fast['OUT'] == plain['OUT']
    assert plain['FREED'] == 'True' and fast['FREED'] == 'True'


def test_no_gc_freeze_and_its_variable_turn_it_off_for_children_too(tmp_path):
    for command, env in ((RUNNER + ['--no-gc-freeze'], {}),
                         (RUNNER, {'KERAS_FASTPREDICT_GC_FREEZE': '0'})):
        fast = _run(tmp_path, command, **env)
        assert fast['FROZEN'] == 'False' and fast['CHILD_FROZEN'] == 'False', command


EXIT_SCRIPT = textwrap.dedent('''
    import sys

    class Log(object):
        """A buffered file held by a cycle (a bound method kept on the instance)."""
        def __init__(self, path):
            self.f = open(path, 'w')
            self.write = self._write

        def _write(self, text):
            self.f.write(text)

        def __del__(self):
            print('DEL Log', flush=True)

    log = Log(sys.argv[1])          # made before TensorFlow's import: frozen with it
    import tensorflow as tf
    log.write('written after the import')
    print('END', flush=True)
''')


def test_what_the_script_made_before_the_import_is_finalised_at_exit_as_under_python(tmp_path):
    """A cycle the script made before importing TensorFlow is collected at exit as under
    python: its ``__del__`` runs and the buffered file it holds is flushed (frozen for
    good, the file lost what was written to it), in the script and in a process it starts."""
    script = tmp_path / 'exit_cycle.py'
    script.write_text(EXIT_SCRIPT)
    driver = tmp_path / 'driver.py'      # the script as a process the runner starts
    driver.write_text('import subprocess, sys\n'
                      'sys.exit(subprocess.call([sys.executable] + sys.argv[1:]))\n')
    outs = {}
    for name, command in (('plain', [sys.executable]), ('fast', RUNNER),
                          ('child', RUNNER + [str(driver)])):
        path = tmp_path / (name + '.txt')
        out = subprocess.run(command + [str(script), str(path)], cwd=str(tmp_path),
                             env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=ROOT),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             universal_newlines=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert 'Exception ignored' not in out.stderr, out.stderr[-3000:]
        outs[name] = (out.stdout, path.read_text())
    assert outs['plain'] == ('END\nDEL Log\n', 'written after the import')
    assert outs['fast'] == outs['plain'] and outs['child'] == outs['plain']
