"""Run by every Python process started under ``python -m keras_fastpredict``: the runner
puts this folder first on ``PYTHONPATH`` (as ``opentelemetry-instrument`` and
``ddtrace-run`` do), and ``site`` imports ``sitecustomize`` at start-up.

It imports neither Keras nor TensorFlow nor numpy: it only registers post-import hooks,
so a child that never imports Keras pays a few milliseconds. When ``keras``, ``tf.keras``
(or ``keras_fastpredict``) is imported, ``keras_fastpredict.processes.start_in_child()``
patches with the options of the ``KERAS_FASTPREDICT_*`` variables and, with
``KERAS_FASTPREDICT_STATS``, reports this process' counters.

Then the user's own ``sitecustomize``, if one is further on ``sys.path``, runs as it
would have without us (ddtrace's bootstrap does the same): this folder is taken off
``sys.path``, the next ``sitecustomize`` is found, loaded under that name, and the folder
is put back. Its errors reach ``site``, which reports them as for any sitecustomize.
"""
import os
import sys


def _start(module):
    try:
        from keras_fastpredict import processes
    except Exception as exc:  # noqa: BLE001 - never break a child process for this
        sys.stderr.write('keras_fastpredict: not patching process %d: %s: %s\n'
                         % (os.getpid(), type(exc).__name__, exc))
        return
    processes.start_in_child()


def _start_tf_keras(module):
    # tf.keras (TensorFlow imports it). When Keras 2.2.5 imports TensorFlow, Keras is not
    # whole yet: its own hook starts once it is.
    keras = sys.modules.get('keras')
    if keras is not None and getattr(getattr(keras, '__spec__', None), '_initializing', False):
        return
    _start(module)


def _spark_worker(module):
    # Spark kills idle Python workers without running any exit code: with reports asked
    # for, this process reports after each task. Wrapped before pyspark.daemon binds it.
    wrapped = module.main

    def main(*args, **kwargs):
        try:
            return wrapped(*args, **kwargs)
        finally:
            processes = sys.modules.get('keras_fastpredict.processes')
            if processes is not None and processes.state.reporting:
                processes.report('Spark task')
    main.__wrapped__ = wrapped
    module.main = main


def _freeze_imports(module):
    import atexit
    import gc
    gc.freeze()
    atexit.register(gc.unfreeze)


def _register():
    try:
        import wrapt
    except ImportError:          # another interpreter than the job's: leave it alone
        return
    # keras_fastpredict.import_freeze.install(), copied: importing the package here would
    # cost every child 100 ms.
    if (os.environ.get('KERAS_FASTPREDICT_GC_FREEZE', '1') not in ('0', '')
            and 'tensorflow' not in sys.modules):
        wrapt.register_post_import_hook(_freeze_imports, 'tensorflow')
    for name in ('keras', 'keras_fastpredict'):
        wrapt.register_post_import_hook(_start, name)
    wrapt.register_post_import_hook(_start_tf_keras, 'tensorflow.python.keras.engine.training')
    if (os.environ.get('KERAS_FASTPREDICT_STATS', '') not in ('', '0')
            or os.environ.get('KERAS_FASTPREDICT_STATS_DIR')):
        wrapt.register_post_import_hook(_spark_worker, 'pyspark.worker')


def _load_users_sitecustomize():
    import importlib.machinery
    import importlib.util
    here = os.path.dirname(os.path.abspath(__file__))
    ours = sys.modules.get(__name__)
    index = None
    for i, entry in enumerate(sys.path):
        if os.path.abspath(entry or os.curdir) == here:
            index = i
            break
    if index is not None:
        del sys.path[index]
    try:
        spec = importlib.machinery.PathFinder.find_spec('sitecustomize', sys.path)
        if spec is None or spec.loader is None:
            return
        module = importlib.util.module_from_spec(spec)
        sys.modules['sitecustomize'] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules['sitecustomize'] = ours
            raise
    finally:
        if index is not None:       # where it was, whatever the user's module added
            sys.path.insert(min(index, len(sys.path)), here)


if os.environ.get('KERAS_FASTPREDICT_BOOTSTRAP', '1') not in ('0', ''):
    _register()
_load_users_sitecustomize()
