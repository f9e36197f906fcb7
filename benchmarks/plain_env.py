"""The environment for the processes a benchmark starts: nothing of keras_fastpredict's
runner inherited. A driver run from a shell that carries the runner's variables (or under
the runner itself) would otherwise start its "plain" processes patched (the bootstrap
folder on PYTHONPATH patches every Python that imports Keras) and its patched ones with
options other than the case's own (``KERAS_FASTPREDICT_*``)."""
import os

BOOTSTRAP_TAIL = os.path.join('keras_fastpredict', 'bootstrap')


def plain_environ(environ=None, **extra):
    """A copy of ``environ`` (default ``os.environ``) without ``KERAS_FASTPREDICT_*`` and
    without any keras_fastpredict bootstrap folder on ``PYTHONPATH``; ``extra`` added."""
    environ = os.environ if environ is None else environ
    env = {k: v for k, v in environ.items() if not k.startswith('KERAS_FASTPREDICT_')}
    paths = [p for p in env.get('PYTHONPATH', '').split(os.pathsep)
             if p and not os.path.abspath(p).rstrip(os.sep).endswith(BOOTSTRAP_TAIL)]
    if paths:
        env['PYTHONPATH'] = os.pathsep.join(paths)
    else:
        env.pop('PYTHONPATH', None)
    env.update(extra)
    return env


def byte_compile_package(folder=None):
    """Byte-compile keras_fastpredict in place, as pip does when it installs a package.
    Where ``PYTHONDONTWRITEBYTECODE`` is set (this machine's environment) an editable
    install is compiled from source in every process: 46 ms against 9 ms with its
    ``.pyc`` files (its import after TensorFlow's, measured 2026-12-07), charged to the
    runner's whole-process time though no installed copy pays it. Keras' and
    TensorFlow's own files were compiled by pip. ``folder``: the package's (default: the
    one imported)."""
    import compileall
    if folder is None:
        import keras_fastpredict
        folder = os.path.dirname(os.path.abspath(keras_fastpredict.__file__))
    return compileall.compile_dir(folder, quiet=1)
