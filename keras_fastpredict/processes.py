"""Every process of the job: children patched by the runner, their counters, and forks.

* ``child_environ()``: what the runner adds to the environment so that every Python
  process it starts (spawned, forked-then-exec'd, started by a JVM or a process manager)
  patches itself: the bootstrap folder first on ``PYTHONPATH``, options as
  ``KERAS_FASTPREDICT_*``.
* ``start_in_child()``: what the bootstrap ``sitecustomize`` calls when ``keras`` (or this
  package) is imported in such a process: ``patch()`` with those options and, with
  ``KERAS_FASTPREDICT_STATS``, a report of this process' counters.
* Reports: to stderr with the pid (``KERAS_FASTPREDICT_STATS=1``) and as JSON, one file
  per pid, in ``KERAS_FASTPREDICT_STATS_DIR``. Written at interpreter exit, at
  ``os._exit`` (forked pool workers, Spark's workers), on a default-handled ``SIGTERM``
  (``Pool.terminate()``, ``with Pool(...)``) and, through the bootstrap, after each Spark
  task (Spark kills idle Python workers without any exit code running).
* Forks: TensorFlow 1.15 does not work in a process forked after a session was created
  in its parent (any session run there, plain Keras' ``predict`` included, waits for
  ever on thread pools that were not forked). In such a child the patched predict
  methods raise ``ForkedAfterSessionError`` at once instead, and the parent's sessions
  are disowned (``_disown_sessions``). A child forked before any session (a pre-fork
  server loading its model after the fork) is patched as usual.
"""
import _thread
import atexit
import json
import os
import signal
import sys
import threading
import time
import weakref

import wrapt

from . import config
from . import counters as _stats
from . import term_watch

BOOTSTRAP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'bootstrap')
STATS_ENV = 'KERAS_FASTPREDICT_STATS'
STATS_DIR_ENV = 'KERAS_FASTPREDICT_STATS_DIR'
STATS_FILE = 'keras_fastpredict-stats-%d.json'

# The predict methods guarded in a child forked after a session (patching's table names).
_PREDICT_PATHS = ('Model.predict', 'Model.predict_on_batch', 'Sequential.predict_proba',
                  'Sequential.predict_classes')


class ForkedAfterSessionError(RuntimeError):
    """predict in a process forked after TensorFlow created a session in its parent."""


class _State(object):
    started = False            # start_in_child() ran
    runner = False             # this process is the runner's own (it prints its table)
    reporting = False          # reports installed
    session_created = False    # a TensorFlow session was created in this process
    forked_from = None         # parent pid, in a child forked after a session
    term_pending = False       # a SIGTERM came while a report was being written
    main_reporting = False     # the main thread is inside report()
    exit_reported = False      # the report at exit (or os._exit) is written: the last one
    exit_code = None           # os._exit(code) was called: waiting for a report to end


state = _State()
_report_lock = threading.Lock()
_real_exit = os._exit
REPORT_GRACE_S = 2.0            # how long a SIGTERM waits for a report being written


# --- the environment children inherit -------------------------------------------------

def _text(value):
    if value is True or value is False:
        return '1' if value else '0'
    if value is None:
        return 'none'
    return str(value)


def child_environ(options, stats=False, environ=None):
    """The variables (a new dict) that make every Python process started with them patch
    itself with ``options``; ``stats`` asks each one for a report."""
    environ = dict(os.environ if environ is None else environ)
    paths = [p for p in environ.get('PYTHONPATH', '').split(os.pathsep) if p]
    paths = [BOOTSTRAP_DIR] + [p for p in paths if os.path.abspath(p) != BOOTSTRAP_DIR]
    environ['PYTHONPATH'] = os.pathsep.join(paths)
    for name, value in options.items():
        environ['KERAS_FASTPREDICT_' + name.upper()] = _text(value)
    if stats:
        environ[STATS_ENV] = '1'
    return environ


def stats_wanted(environ=None):
    environ = os.environ if environ is None else environ
    return ((environ.get(STATS_ENV, '') not in ('', '0')) or bool(environ.get(STATS_DIR_ENV))
            or bool(environ.get('KERAS_FASTPREDICT_STATS_JSON')))     # report.JSON_ENV


# --- start-up in a child ----------------------------------------------------------------

def start_in_child():
    """Patch this process with the ``KERAS_FASTPREDICT_*`` options (once); reports too
    when asked. Called by the bootstrap ``sitecustomize`` on the first ``import keras``."""
    if state.started:
        return
    state.started = True
    from . import patching
    patching.patch(**config.from_environ())
    if stats_wanted():
        install_reports()


def mark_runner():
    """The runner's own process: it prints its own table; reports only write the file."""
    state.runner = True


# --- reports ------------------------------------------------------------------------------

def _write(fd, text):
    # os.write, not sys.stderr: in a forked child another thread of the parent may have
    # held the stream's lock at the fork.
    data = text.encode('utf-8', 'replace')
    while data:
        data = data[os.write(fd, data):]


def report(when='exit', wait=0.0):
    """This process' counters: a table on stderr (not for the runner's own process, nor
    when no predict call was seen) and the JSON file in ``KERAS_FASTPREDICT_STATS_DIR``.
    Returns at once (after ``wait`` seconds at most) if another report is being written.
    Never raises: it runs at exit and from a signal handler."""
    main = threading.current_thread() is threading.main_thread()
    if main:
        # Set before the lock is tried: a SIGTERM handler (it runs in this thread) that
        # finds it set knows this thread is inside a report, wherever it was interrupted.
        state.main_reporting = True
    try:
        if not (_report_lock.acquire(True, wait) if wait else _report_lock.acquire(False)):
            return
        try:
            _write_report(when)
        except Exception:                   # noqa: BLE001 - never fail the exit for this
            pass
        finally:
            _report_lock.release()
        # (A SIGTERM from now on, as the finalizers retire the models' counters, would
        # write a poorer one over it.)
        state.exit_reported = when in ('exit', 'os._exit')
    finally:
        if main:
            state.main_reporting = False
            if state.term_pending:
                _die_of_sigterm()           # SIGTERM waited for this report: now it ends
        if state.exit_code is not None:
            _real_exit(state.exit_code)     # os._exit waited for this report (its own or
            #                                 another thread's): now it ends


def _write_report(when):
    error = None
    try:
        snap = _stats.snapshot()
    except Exception as exc:                # noqa: BLE001 - the file still says so
        snap, error = {}, '%s: %s' % (type(exc).__name__, exc)
    folder = os.environ.get(STATS_DIR_ENV)
    sites = None
    if not state.runner and config.settings.report and error is None:  # call-site report
        from .report import in_child
        show = os.environ.get(STATS_ENV, '') not in ('', '0')
        try:
            sites = in_child('keras_fastpredict [pid %d]:' % os.getpid(),
                             (lambda text: _write(2, text)) if show else None)
        except Exception:                   # the counters' report is written regardless
            sites = None
    if folder:
        record = {'pid': os.getpid(), 'ppid': os.getppid(), 'argv': list(sys.argv),
                  'when': when, 'runner': state.runner, 'models': snap}
        if sites is not None:
            record['sites'] = sites['sites']
        if error is not None:
            record['error'] = error
        path = os.path.join(folder, STATS_FILE % os.getpid())
        try:
            text = json.dumps(record, default=_plain)
        except Exception as exc:            # noqa: BLE001 - the file still says so
            record.update(models={}, sites=[], error='%s: %s' % (type(exc).__name__, exc))
            text = json.dumps(record, default=str)
        try:
            tmp = path + '.tmp'
            with open(tmp, 'w') as f:
                f.write(text)
            os.replace(tmp, path)
        except OSError:
            pass                            # the folder is gone: the job is over
    if snap and not state.runner and os.environ.get(STATS_ENV, '') not in ('', '0'):
        table = _stats.format_table(snap).replace(
            'keras_fastpredict:', 'keras_fastpredict [pid %d]:' % os.getpid(), 1)
        try:
            _write(2, table + '\n')
        except OSError:
            pass


def _plain(value):
    """A numpy scalar as JSON's number."""
    item = getattr(value, 'item', None)
    if item is None:
        raise TypeError('%s is not JSON serializable' % type(value).__name__)
    return item()


def _die_of_sigterm():
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _exit_reporting(code):
    try:
        # Another thread's report, if one is being written, is not cut short: this one
        # waits for it, and that report ends the process as soon as it is written, with
        # this code (else this thread writes its own).
        state.exit_code = code
        report('os._exit', wait=REPORT_GRACE_S)
    finally:
        _real_exit(code)        # whatever happened: in a forked child, returning from
        #                         os._exit would run the parent's code on


def _end_after_grace(main):
    time.sleep(REPORT_GRACE_S)
    signal.pthread_kill(main, signal.SIGTERM)   # (to the main thread: a write it is
    #                                             blocked in returns, and the handler runs)


def _on_sigterm(signum, frame):
    # (Python runs this in the main thread.) A report may be being written: by the very
    # code this interrupted (at os._exit, say: Pool.terminate() races a worker's own
    # exit), or by another thread. Ending at once would lose it half-written, so the
    # signal waits for it, REPORT_GRACE_S at most: a report blocked for good (a full
    # stderr pipe) must not make the process outlive a SIGTERM.
    if state.term_pending or state.exit_reported:
        _die_of_sigterm()                   # the second time (or the grace ran out), or
        #                                     the process' last report is written
    state.term_pending = True
    if state.main_reporting:
        # This thread's report ends the process when it is done, or a second SIGTERM
        # does after the grace period. (A bare thread: threading's would take a lock this
        # thread may hold where it was stopped.)
        _thread.start_new_thread(_end_after_grace, (threading.get_ident(),))
        return
    # The report is written by a thread of its own, waited for here: this wait returns
    # after the grace period whatever the report does. (A second SIGTERM could not end a
    # report blocked in this handler: Python runs no handler inside another one.)
    term_watch.run_for_at_most(_late_report, REPORT_GRACE_S)
    _die_of_sigterm()


def _install_sigterm():
    try:
        if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            return
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):            # not the main thread
        return
    # A SIGTERM while the main thread waits in C (a session run that never returns)
    # could not run the handler: reported and ended from another thread after the grace.
    term_watch.start(_ours, _sigterm_started, _late_report, REPORT_GRACE_S)


def _ours():
    return signal.getsignal(signal.SIGTERM) is _on_sigterm


def _sigterm_started():
    return state.term_pending


def _late_report():
    report('SIGTERM', wait=REPORT_GRACE_S)  # (after another thread's report, if any)


def install_reports():
    """Report this process' counters whenever it may end (see the module docs)."""
    if state.reporting:
        return
    state.reporting = True
    atexit.register(report, 'exit', REPORT_GRACE_S)
    os._exit = _exit_reporting
    _install_sigterm()


def collect(folder, exclude_pid=None):
    """The JSON reports in ``folder`` (one per process), pid order."""
    found = []
    for name in sorted(os.listdir(folder)):
        if not (name.startswith('keras_fastpredict-stats-') and name.endswith('.json')):
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                record = json.load(f)
        except (OSError, ValueError):
            continue
        if record.get('pid') != exclude_pid:
            found.append(record)
    return sorted(found, key=lambda r: r['pid'])


_TOTALLED = ('calls', 'fast_calls', 'fallbacks', 'batches', 'deferred')


def totals(records):
    """The processes that predicted, and their models' counters ``_TOTALLED`` summed over
    processes' reports."""
    out = dict.fromkeys(('processes',) + _TOTALLED, 0)
    for record in records:
        models = record.get('models') or {}
        if models:
            out['processes'] += 1
        for counters in models.values():
            for key in _TOTALLED:
                out[key] += counters.get(key, 0)
    return out


# --- forks --------------------------------------------------------------------------------

_sessions = weakref.WeakSet()      # the sessions of this process, for a forked child's sake


def _note_session(wrapped, instance, args, kwargs):
    state.session_created = True
    result = wrapped(*args, **kwargs)
    _sessions.add(instance)
    return result


def _disown_sessions():
    """In a child forked after sessions were made: they are the parent's, and closing or
    deleting one here waits for ever for the parent's threads, which a fork does not copy.
    Plain Keras' child never finalises its session (Keras' predict function holds it until
    TensorFlow's modules are gone, and it then leaks); patched, Keras' function was never
    called, so nothing held it and the child hung at exit (``sys.exit``) in
    ``TF_DeleteSession``. Each is marked closed, its handle dropped (leaked, as plain's):
    using it here raises TensorFlow's closed-session error where plain would hang."""
    for session in list(_sessions):
        session._closed = True
        session._session = None


def _watch_sessions(module):
    wrapt.wrap_function_wrapper(module, 'BaseSession.__init__', _note_session)


def _session_before_fork():
    if state.session_created:
        return True
    backend = sys.modules.get('keras.backend.tensorflow_backend')
    return getattr(backend, '_SESSION', None) is not None


def _refuse(wrapped, instance, args, kwargs):
    raise ForkedAfterSessionError(
        'keras_fastpredict: process %d was forked from process %d after TensorFlow had '
        'created a session there. TensorFlow 1.15 does not work in such a child: any '
        'session run, plain Keras predict included, would wait for ever. Load the model '
        'after the fork (gunicorn without --preload, a Pool initializer), or start '
        "processes with the 'spawn' method." % (os.getpid(), state.forked_from))


def _guard(module):
    from . import patching
    for name, path, _ in patching.ENTRY_POINTS:
        if name != module.__name__ or path not in _PREDICT_PATHS:
            continue
        owner, attr = patching.owner_of(module, path)
        patching.replace(owner, attr, _refuse)


def _after_fork_in_child():
    global _report_lock
    _report_lock = threading.Lock()      # a parent thread may have held it at the fork
    state.term_pending = False
    state.main_reporting = False
    state.exit_reported = False
    state.exit_code = None
    state.runner = False
    _stats.forget_parent()               # this process reports its own calls only
    patching = sys.modules.get('keras_fastpredict.patching')
    patched = patching is not None and patching.is_patched()
    if patched and stats_wanted():
        install_reports()
    if not _session_before_fork():
        return
    state.forked_from = os.getppid()
    if not patched:
        return
    _disown_sessions()
    for name in ('keras.engine.training', 'keras.engine.sequential'):
        module = sys.modules.get(name)
        if module is not None:
            _guard(module)
        else:
            wrapt.register_post_import_hook(_guard, name)


def forked_after_session():
    """Whether this process was forked after its parent created a TensorFlow session."""
    return state.forked_from is not None


wrapt.register_post_import_hook(_watch_sessions, 'tensorflow.python.client.session')
os.register_at_fork(after_in_child=_after_fork_in_child)
