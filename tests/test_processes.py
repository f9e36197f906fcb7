"""Every process of the job (keras_fastpredict.processes): worker pools in both start
methods, ProcessPoolExecutor, a pre-fork server, a fork after predicting, and Spark
executors, each run plainly and under the runner alone, with the same outputs and the
children's fast calls counted from their per-process reports.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import keras_fastpredict
from keras_fastpredict import processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = [sys.executable, '-m', 'keras_fastpredict']
EXAMPLE = os.path.join(ROOT, 'examples', 'spark_scoring.py')


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith('KERAS_FASTPREDICT_') and k != 'PYTHONPATH'}
    env.update(TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=ROOT, PYTHONWARNINGS='ignore', **extra)
    return env


def call(cmd, timeout=240, **extra):
    out = subprocess.run(cmd, cwd=ROOT, env=clean_env(**extra), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return out


def results(out):
    lines = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
    assert len(lines) == 1, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(lines[0][len('RESULT '):])


def run_script(tmp_path, text, timeout=60, stats=True):
    """Run ``text`` as a script of its own; with ``stats``, its reports go to a folder
    (returned with the completed process)."""
    script = tmp_path / 'script.py'
    script.write_text(text)
    folder = tmp_path / 'stats'
    folder.mkdir(exist_ok=True)
    extra = {'KERAS_FASTPREDICT_STATS_DIR': str(folder)} if stats else {}
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout,
                         env=clean_env(**extra))
    return out, str(folder)


def child_reports(folder, main_pid):
    return [r for r in processes.collect(folder) if r['pid'] != main_pid]


# One script, every way of starting workers; each worker loads the model itself (after
# its fork, or in its spawned interpreter) and predicts one row per call.
POOLS = textwrap.dedent('''
    import concurrent.futures, json, multiprocessing as mp, os, sys
    import numpy as np

    def score(args):
        path, rows = args
        from keras.engine.training import Model
        from keras.models import load_model
        import keras_fastpredict
        model = load_model(path, compile=False)
        ys = [model.predict(np.expand_dims(row, 0)) for row in np.asarray(rows, 'float32')]
        plain = Model.predict
        plain = getattr(plain, '__wrapped__', plain)(model, np.asarray(rows, 'float32'))
        return (os.getpid(), keras_fastpredict.is_patched(),
                np.concatenate(ys).tolist(), plain.tolist())

    def prefork(path, chunks):
        """A gunicorn-style pre-fork server: keras imported by the master, the model
        loaded by each worker after the fork; answers go back through a pipe."""
        import keras  # noqa: F401  (the master imports it, creates no session)
        answers = []
        for rows in chunks:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                os.write(w, json.dumps(score((path, rows))).encode())
                os._exit(0)
            os.close(w)
            with os.fdopen(r) as f:
                answers.append(json.loads(f.read()))
            os.waitpid(pid, 0)
        return answers

    if __name__ == '__main__':
        path = sys.argv[1]
        rng = np.random.RandomState(0)
        chunks = [rng.rand(6, 16).astype('float32').tolist() for _ in range(4)]
        out = {'prefork': prefork(path, chunks[:2])}
        for method in ('fork', 'spawn'):
            with mp.get_context(method).Pool(2) as pool:
                out['pool-' + method] = pool.map(score, [(path, c) for c in chunks])
        with concurrent.futures.ProcessPoolExecutor(2) as ex:
            out['executor'] = list(ex.map(score, [(path, c) for c in chunks]))
        print('RESULT ' + json.dumps({'pid': os.getpid(), 'out': out}))
''')


@pytest.fixture(scope='module')
def model_path(tmp_path_factory):
    """The example's model, saved by a plain process (this one's Keras session is the
    other tests')."""
    path = str(tmp_path_factory.mktemp('model') / 'model.h5')
    call([sys.executable, '-c', 'import sys; sys.path.insert(0, "examples"); '
          'import spark_scoring; spark_scoring.make_model(sys.argv[1])', path])
    return path


def test_pools_and_prefork_workers_patched_by_the_runner_alone(tmp_path, model_path):
    script = tmp_path / 'pools.py'
    script.write_text(POOLS)
    plain = results(call([sys.executable, str(script), model_path]))
    folder = tmp_path / 'stats'
    folder.mkdir()
    fast_out = call(RUNNER + [str(script), model_path], KERAS_FASTPREDICT_STATS_DIR=str(folder))
    fast = results(fast_out)
    for kind, answers in plain['out'].items():
        got = fast['out'][kind]
        assert len(got) == len(answers)
        for (_, patched_plain, ys_plain, _), (pid, patched, ys, reference) in zip(answers, got):
            assert not patched_plain and patched, kind
            np.testing.assert_allclose(ys, ys_plain, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(ys, reference, rtol=1e-5, atol=1e-6)
    # Every worker's calls took the fast path, each worker counting its own calls only.
    reports = child_reports(folder, fast['pid'])
    workers = {pid for answers in fast['out'].values() for pid, _, _, _ in answers}
    assert workers <= {r['pid'] for r in reports}, (
        {kind: [a[0] for a in answers] for kind, answers in fast['out'].items()},
        [(r['pid'], r['when'], r.get('error')) for r in reports], fast_out.stderr[-4000:])
    total = processes.totals(reports)
    calls = sum(len(a[2]) for answers in fast['out'].values() for a in answers)
    assert total['calls'] == total['fast_calls'] == calls and total['fallbacks'] == 0, [
        (r['pid'], r['when'], [m['calls'] for m in r['models'].values()]) for r in reports]


SIGTERM_DURING_EXIT_REPORT = textwrap.dedent('''
    import os, signal, sys
    import numpy as np
    import keras
    import keras_fastpredict
    from keras_fastpredict import counters, processes
    keras_fastpredict.patch()
    model = keras.models.Sequential([keras.layers.Dense(3, input_shape=(4,))])
    y = model.predict(np.ones((1, 4), 'float32'))
    print('PREDICTED', y.shape, flush=True)
    processes.install_reports()
    real = counters.snapshot

    def snapshot():
        # Pool.terminate() racing a worker's own exit: SIGTERM while the exit report is
        # being written.
        os.kill(os.getpid(), signal.SIGTERM)
        return real()
    counters.snapshot = snapshot
    os._exit(0)
''')


def test_sigterm_during_the_exit_report_waits_for_it(tmp_path):
    out, folder = run_script(tmp_path, SIGTERM_DURING_EXIT_REPORT, timeout=240)
    assert 'PREDICTED (1, 3)' in out.stdout, out.stderr[-3000:]
    assert out.returncode == -signal.SIGTERM          # the signal still ends the process
    reports = processes.collect(folder)
    assert len(reports) == 1 and reports[0]['when'] == 'os._exit', reports
    assert sum(m['calls'] for m in reports[0]['models'].values()) == 1


SIGTERM_DURING_A_THREADS_REPORT = textwrap.dedent('''
    import os, signal, threading, time
    from keras_fastpredict import counters, processes
    processes.install_reports()
    real = counters.snapshot
    entered = threading.Event()

    def snapshot():
        entered.set()
        time.sleep(0.5)          # a report being written in another thread
        return real()
    counters.snapshot = snapshot
    t = threading.Thread(target=processes.report, args=('thread',))
    t.start()
    entered.wait()
    os.kill(os.getpid(), signal.SIGTERM)
    t.join()
    time.sleep(0.5)
    print('STILL ALIVE', flush=True)
''')

# A report whose stderr write blocks: stderr is a pipe the parent does not read (a child
# that logged a lot; the parent's terminate() then wait()).
BLOCKING_REPORT = textwrap.dedent('''
    import sys, time
    from keras_fastpredict import counters, processes
    processes.install_reports()
    real = counters.snapshot

    def snapshot():
        processes._write(2, 'x' * 200000)
        return real()
    counters.snapshot = snapshot
    print('READY', flush=True)
''')
SIGTERM_DURING_A_BLOCKED_REPORT = BLOCKING_REPORT + 'sys.exit(0)    # the atexit report\n'


def test_sigterm_during_another_threads_report_still_ends_the_process(tmp_path):
    out, _ = run_script(tmp_path, SIGTERM_DURING_A_THREADS_REPORT, stats=False)
    assert out.returncode == -signal.SIGTERM and 'STILL ALIVE' not in out.stdout, (
        out.returncode, out.stdout, out.stderr[-2000:])


def terminated_in_grace(tmp_path, text, settle_s):
    """``text`` run as a script, SIGTERM'd ``settle_s`` after it printed READY: it must
    die of the signal within the reports' grace period."""
    script = tmp_path / 'blocked.py'
    script.write_text(text)
    child = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, env=clean_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b'READY'
        time.sleep(settle_s)
        child.terminate()
        assert child.wait(timeout=processes.REPORT_GRACE_S + 10) == -signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_sigterm_during_a_blocked_report_still_ends_the_process(tmp_path):
    terminated_in_grace(tmp_path, SIGTERM_DURING_A_BLOCKED_REPORT, 1.0)  # report blocked


# The report the SIGTERM itself starts blocks (no report running when the signal comes).
SIGTERM_WHOSE_OWN_REPORT_BLOCKS = BLOCKING_REPORT + 'while True:\n    time.sleep(0.1)\n'


def test_sigterm_whose_own_report_blocks_still_ends_the_process(tmp_path):
    # Plain Python dies of the signal at once; the report it writes first may not keep
    # it alive past the grace period.
    terminated_in_grace(tmp_path, SIGTERM_WHOSE_OWN_REPORT_BLOCKS, 0.0)


SIGTERM_AFTER_THE_EXIT_REPORT = textwrap.dedent('''
    import collections, os, signal, sys
    from keras_fastpredict import counters, processes

    class Model(object):
        name = 'm'
    model = Model()
    counters.for_model(model).calls = 3      # (its finalizer runs at exit, after the report)
    processes.install_reports()

    class Freed(collections.deque):
        def append(self, found):
            # SIGTERM at exit after the report was written, as the finalizers retire the
            # live models' counters (one taken out of the live ones, not yet freed).
            os.kill(os.getpid(), signal.SIGTERM)
            collections.deque.append(self, found)
    counters._freed = Freed()
    sys.exit(0)
''')


def test_sigterm_after_the_exit_report_keeps_it(tmp_path):
    out, folder = run_script(tmp_path, SIGTERM_AFTER_THE_EXIT_REPORT)
    assert out.returncode == -signal.SIGTERM, (out.returncode, out.stderr[-2000:])
    reports = processes.collect(folder)
    assert [(r['when'], r['models'].get('m', {}).get('calls')) for r in reports] == [
        ('exit', 3)], reports


OS_EXIT_IN_A_THREAD_DURING_THE_EXIT_REPORT = textwrap.dedent('''
    import os, sys, threading, time
    from keras_fastpredict import counters, processes

    class Model(object):
        name = 'm'
    model = Model()
    counters.for_model(model).calls = 3
    processes.install_reports()
    real = counters.snapshot
    began = threading.Event()

    def snapshot():
        if threading.current_thread() is threading.main_thread():
            began.set()
            time.sleep(0.5)          # the exit report, being written
        return real()
    counters.snapshot = snapshot

    def watchdog():
        began.wait()
        os._exit(3)                  # a thread ends the process meanwhile
    threading.Thread(target=watchdog, daemon=True).start()
    sys.exit(0)
''')


def test_os_exit_in_a_thread_during_the_exit_report_still_leaves_a_report(tmp_path):
    out, folder = run_script(tmp_path, OS_EXIT_IN_A_THREAD_DURING_THE_EXIT_REPORT)
    assert out.returncode == 3, (out.returncode, out.stderr[-2000:])     # the os._exit code
    reports = processes.collect(folder)
    assert [r['models'].get('m', {}).get('calls') for r in reports] == [3], reports


SIGTERM_WHILE_TENSORFLOW_WAITS = textwrap.dedent('''
    import sys
    import tensorflow as tf
    if sys.argv[1] == 'reports':
        from keras_fastpredict import processes
        processes.install_reports()
    queue = tf.FIFOQueue(1, tf.float32, shapes=[()])
    session = tf.Session()
    print('READY', flush=True)
    session.run(queue.dequeue())     # waits for ever (a stuck Pool worker, say)
''')


def _terminate_when_ready(script, *args, **env):
    """SIGTERM once the script says READY; its exit status, or None if it outlived the
    grace period by 10 s."""
    child = subprocess.Popen([sys.executable, str(script)] + list(args), cwd=ROOT,
                             env=clean_env(**env), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b'READY'
        time.sleep(0.5)                             # inside the session run by now
        child.terminate()
        try:
            return child.wait(timeout=processes.REPORT_GRACE_S + 10)
        except subprocess.TimeoutExpired:
            return None
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_sigterm_while_tensorflow_waits_still_ends_the_process(tmp_path):
    # A Python handler runs only once the main thread is back in Python: term_watch ends
    # the process, with its report, after the grace period.
    script = tmp_path / 'stuck.py'
    script.write_text(SIGTERM_WHILE_TENSORFLOW_WAITS)
    assert _terminate_when_ready(script, 'plain') == -signal.SIGTERM
    folder = tmp_path / 'stats'
    folder.mkdir()
    assert _terminate_when_ready(script, 'reports', KERAS_FASTPREDICT_STATS_DIR=str(folder)) \
        == -signal.SIGTERM
    assert [r['when'] for r in processes.collect(str(folder))] == ['SIGTERM']


A_FORKED_CHILD_WAITS_IN_TENSORFLOW = textwrap.dedent('''
    import os, signal, sys, time
    import tensorflow as tf
    from keras_fastpredict import processes
    processes.install_reports()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                    # its own watch: the parent's pipe is not its own
        queue = tf.FIFOQueue(1, tf.float32, shapes=[()])
        session = tf.Session()
        os.write(w, b'x')
        session.run(queue.dequeue())
        os._exit(0)
    os.read(r, 1)
    time.sleep(0.5)
    start = time.time()
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    print('CHILD', -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status),
          time.time() - start < processes.REPORT_GRACE_S + 5, flush=True)
    time.sleep(processes.REPORT_GRACE_S + 0.5)
    print('PARENT ALIVE', flush=True)
''')


def test_a_forked_child_waiting_in_tensorflow_ends_on_sigterm_alone(tmp_path):
    out, folder = run_script(tmp_path, A_FORKED_CHILD_WAITS_IN_TENSORFLOW)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ['CHILD -15 True', 'PARENT ALIVE'], out.stdout
    assert sorted(r['when'] for r in processes.collect(folder)) == ['SIGTERM', 'exit']


SIGTERM_JUST_AFTER_THE_REPORT_LOCK = textwrap.dedent('''
    import os, signal
    from keras_fastpredict import processes
    processes.install_reports()
    real = processes._report_lock

    class Lock(object):
        """The report's lock; SIGTERM lands just after os._exit's report has taken it
        (Pool.terminate() racing a worker's own exit), before anything else ran."""
        sent = False

        def acquire(self, *args):
            got = real.acquire(*args)
            if got and not Lock.sent:
                Lock.sent = True
                os.kill(os.getpid(), signal.SIGTERM)
            return got

        def release(self):
            real.release()
    processes._report_lock = Lock()
    os._exit(0)
''')

FAILING_EXIT_REPORT = textwrap.dedent('''
    import os, sys
    from keras_fastpredict import counters, processes
    processes.install_reports()

    def snapshot():
        raise RuntimeError('dictionary changed size during iteration')
    counters.snapshot = snapshot
    pid = os.fork()
    if pid == 0:
        os._exit(3)
        print('CHILD CONTINUED', flush=True)      # would run the parent's code from here
        processes._real_exit(99)
    _, status = os.waitpid(pid, 0)
    print('CHILD EXIT', os.WEXITSTATUS(status), flush=True)
''')


SIGTERM_INSIDE_THE_COUNTERS_LOCK = textwrap.dedent('''
    import os, signal
    from keras_fastpredict import counters, processes
    processes.install_reports()
    with counters._lock:        # a first call registering its model, say
        os.kill(os.getpid(), signal.SIGTERM)
        print('STILL ALIVE', flush=True)
''')


def test_sigterm_inside_the_counters_lock_reports_and_ends(tmp_path):
    out, folder = run_script(tmp_path, SIGTERM_INSIDE_THE_COUNTERS_LOCK)
    assert out.returncode == -signal.SIGTERM and 'STILL ALIVE' not in out.stdout, (
        out.returncode, out.stderr[-2000:])
    assert [r['when'] for r in processes.collect(folder)] == ['SIGTERM']


def test_sigterm_just_after_the_report_took_its_lock_still_gets_the_report(tmp_path):
    start = time.time()
    out, folder = run_script(tmp_path, SIGTERM_JUST_AFTER_THE_REPORT_LOCK)
    assert out.returncode == -signal.SIGTERM, (out.returncode, out.stderr[-2000:])
    reports = processes.collect(folder)
    assert [r['when'] for r in reports] == ['os._exit'], out.stderr[-2000:]
    assert time.time() - start < 30


UNWRITABLE_COUNTERS = textwrap.dedent('''
    import os
    import numpy as np
    from keras_fastpredict import counters, processes
    processes.install_reports()
    real = counters.snapshot
    counters.snapshot = lambda: {'a': {'calls': np.int64(3)}, 'b': {'calls': object()}}
    os._exit(0)
''')


def test_counters_json_cannot_hold_still_give_a_report(tmp_path):
    out, folder = run_script(tmp_path, UNWRITABLE_COUNTERS)
    assert out.returncode == 0, out.stderr[-2000:]
    [report] = processes.collect(folder)
    assert report['models'] == {} and 'not JSON serializable' in report['error'], report


def test_a_failing_exit_report_still_exits(tmp_path):
    out, folder = run_script(tmp_path, FAILING_EXIT_REPORT)
    assert out.returncode == 0 and out.stdout.splitlines() == ['CHILD EXIT 3'], (
        out.stdout, out.stderr[-2000:])
    # The child's report is still written, saying what went wrong; the parent's too.
    reports = {r['pid']: r for r in processes.collect(folder)}
    assert len(reports) == 2 and all(
        r['models'] == {} and 'dictionary changed size' in r['error']
        for r in reports.values()), reports


FORK_AFTER_PREDICT = textwrap.dedent('''
    import os, signal, sys, time
    import numpy as np
    import keras
    import keras_fastpredict
    model = keras.models.Sequential([keras.layers.Dense(3, input_shape=(4,))])
    x = np.ones((1, 4), 'float32')
    model.predict(x)
    start = time.time()
    pid = os.fork()
    if pid == 0:
        signal.alarm(int(sys.argv[1]))          # plain Keras waits for ever here
        try:
            model.predict(x)
            print('CHILD predicted', flush=True)
        except keras_fastpredict.ForkedAfterSessionError as e:
            print('CHILD error', e, flush=True)
        keras_fastpredict.unpatch()
        from keras.engine.training import Model
        print('CHILD unpatched', not hasattr(Model.__dict__['predict'], '__wrapped__'),
              flush=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    signalled = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
    print('PARENT signal %d after %.1f s' % (signalled, time.time() - start), flush=True)
''')


def _hangs_plainly(tmp_path, name, text):
    """Runs the script plainly, where its forked child must hang until its alarm (3 s),
    then under the runner (alarm 30 s); returns the runner's output."""
    script = tmp_path / name
    script.write_text(text)
    plain = call([sys.executable, str(script), '3'])
    assert 'PARENT signal 14' in plain.stdout and 'CHILD' not in plain.stdout, plain.stdout
    return call(RUNNER + [str(script), '30']).stdout


def test_fork_after_predicting_raises_where_plain_keras_hangs(tmp_path):
    # Under the runner: a clear error at once, and unpatch() still restores Keras.
    out = _hangs_plainly(tmp_path, 'fork_after.py', FORK_AFTER_PREDICT)
    assert 'CHILD error keras_fastpredict: process' in out, out
    assert 'after TensorFlow had created a session' in out
    assert 'CHILD unpatched True' in out and 'PARENT signal 0' in out


FORK_AND_EXIT = textwrap.dedent('''
    import os, signal, sys
    import numpy as np
    import keras
    model = keras.models.Sequential([keras.layers.Dense(3, input_shape=(4,))])
    model.predict(np.ones((1, 4), 'float32'))
    pid = os.fork()
    if pid == 0:
        signal.alarm(20)
        print('CHILD done', flush=True)
        sys.exit(0)                 # the interpreter's exit, not os._exit
    _, status = os.waitpid(pid, 0)
    print('PARENT child signal %d exit %d' % (
        os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
        os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1), flush=True)
''')


def test_a_child_forked_after_predicting_exits_as_under_plain_keras(tmp_path):
    """A child forked after a predict that never uses TensorFlow and ends with sys.exit:
    plain Keras' child exits 0 (its session is never finalised at exit); patched (found by
    review of 644d036; on main before it too, and with patch() in the script), the session
    is closed while the interpreter ends and the child waits there until its alarm."""
    script = tmp_path / 'fork_exit.py'
    script.write_text(FORK_AND_EXIT)
    plain = call([sys.executable, str(script)])
    assert 'CHILD done' in plain.stdout and 'PARENT child signal 0 exit 0' in plain.stdout
    fast = call(RUNNER + [str(script)])
    assert 'CHILD done' in fast.stdout and 'PARENT child signal 0 exit 0' in fast.stdout, (
        fast.stdout)


FORK_AND_RUN = textwrap.dedent('''
    import os, signal, sys
    import numpy as np
    import keras
    from keras import backend as K
    model = keras.models.Sequential([keras.layers.Dense(3, input_shape=(4,))])
    model.predict(np.ones((1, 4), 'float32'))
    pid = os.fork()
    if pid == 0:
        signal.alarm(int(sys.argv[1]))
        try:
            K.get_session().run(model.output, {model.input: np.ones((1, 4), 'float32')})
            print('CHILD ran', flush=True)
        except RuntimeError as exc:
            print('CHILD error %s' % exc, flush=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print('PARENT signal %d' % (os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0),
          flush=True)
''')


def test_a_parents_session_run_in_a_forked_child_raises_where_plain_hangs(tmp_path):
    """The parent's sessions are disowned in a child forked after them (so that its exit
    does not wait in TF_DeleteSession): a Session.run on one raises TensorFlow's own
    closed-session error at once, where plain Keras' child waits for ever."""
    out = _hangs_plainly(tmp_path, 'fork_run.py', FORK_AND_RUN)
    assert 'CHILD error Attempted to use a closed Session.' in out, out
    assert 'PARENT signal 0' in out


def test_child_environ_puts_the_bootstrap_first_once():
    env = processes.child_environ({'defer': True, 'timeout': None, 'max_batch_size': 8},
                                  stats=True, environ={'PYTHONPATH': '/a:%s:/b'
                                                       % processes.BOOTSTRAP_DIR})
    assert env['PYTHONPATH'].split(os.pathsep) == [processes.BOOTSTRAP_DIR, '/a', '/b']
    assert env['KERAS_FASTPREDICT_DEFER'] == '1' and env['KERAS_FASTPREDICT_STATS'] == '1'
    from keras_fastpredict import config
    assert config.from_environ(env) == {'defer': True, 'timeout': None, 'max_batch_size': 8}


# --- Spark ------------------------------------------------------------------------------
# pyspark comes with the project's `spark` extra (tools/bootstrap.sh installs it) and Java
# is on CI: a missing one fails these tests, it does not skip them.

SPARK_ROWS = 400


@pytest.fixture(scope='module')
def spark():
    import pyspark  # noqa: F401  (ImportError here: the spark extra is not installed)
    sys.path.insert(0, os.path.join(ROOT, 'examples'))
    try:
        import spark_scoring
    finally:
        sys.path.pop(0)
    os.environ['PYSPARK_PYTHON'] = sys.executable
    session = spark_scoring.session('local[2]', 'keras_fastpredict tests')
    session.sparkContext.addPyFile(EXAMPLE)        # the executors import it by name
    yield session, spark_scoring
    session.stop()


def _job(spark, model_path, environment, fast_predict=False):
    """One scoring job on the shared session; its Python workers get ``environment``
    (Spark starts a separate worker daemon for each environment)."""
    session, example = spark
    sc = session.sparkContext
    saved = dict(sc.environment)
    sc.environment.clear()
    sc.environment.update(environment)
    try:
        scored, _ = example.score(session, model_path, example.feature_rows(SPARK_ROWS), 2,
                                  fast_predict=fast_predict)
    finally:
        sc.environment.clear()
        sc.environment.update(saved)
    return scored


@pytest.fixture(scope='module')
def plain_scores(spark, model_path):
    return _job(spark, model_path, {})


def _executor_env(folder, **options):
    """What the runner hands to executors (``spark.executorEnv.*`` on a cluster)."""
    env = processes.child_environ(options, environ={})
    env['KERAS_FASTPREDICT_STATS_DIR'] = str(folder)
    return env


def test_spark_executors_patched_same_scores_fast_calls_counted(spark, model_path, tmp_path,
                                                               plain_scores):
    plain = plain_scores
    folder = tmp_path / 'stats'
    folder.mkdir()
    fast = _job(spark, model_path, _executor_env(folder))
    assert fast.shape == (SPARK_ROWS, 2) and (fast[:, 0] == plain[:, 0]).all()
    np.testing.assert_allclose(fast[:, 1], plain[:, 1], rtol=1e-5, atol=1e-6)
    total = processes.totals(child_reports(folder, os.getpid()))
    assert total['calls'] == total['fast_calls'] == SPARK_ROWS and total['batches'] == 0


def test_spark_fast_predict_defers_each_partitions_calls(spark, model_path, tmp_path,
                                                         plain_scores):
    # Every call of a partition deferred in the executor. How many runs they take is the
    # engine's (a fresh worker's first batch runs its calls alone until TF's multi-row
    # kernels are made: test_warmup), not counted here.
    plain = plain_scores
    folder = tmp_path / 'stats'
    folder.mkdir()
    batched = _job(spark, model_path, _executor_env(folder), fast_predict=True)
    np.testing.assert_allclose(batched, plain, rtol=1e-5, atol=1e-6)
    total = processes.totals(child_reports(folder, os.getpid()))
    assert total['fast_calls'] == total['deferred'] == SPARK_ROWS, total
    assert 1 <= total['batches'] <= SPARK_ROWS, total


def test_spark_example_under_the_runner(model_path, tmp_path, plain_scores):
    # The example as a user runs it, its executors patched by the runner alone,
    # against the same job run plainly on the shared session.
    plain = plain_scores
    out = tmp_path / 'scores.npy'
    proc = call(RUNNER + ['--stats', EXAMPLE, '--rows', str(SPARK_ROWS), '--partitions', '2',
                          '--model', model_path, '--out', str(out)], timeout=300)
    np.testing.assert_allclose(np.load(str(out)), plain, rtol=1e-5, atol=1e-6)
    assert 'other processes of the job: ' in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.split('other processes of the job: ')[1].splitlines()[0]
    assert '%d calls, %d fast, 0 fallbacks' % (SPARK_ROWS, SPARK_ROWS) in line, line
