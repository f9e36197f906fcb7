"""Load generator for examples/celery_tasks.py: a Redis server and a Celery worker (prefork
pool) of their own, and client threads sending tasks in a closed loop.

    python examples/celery_load.py --both                   # plain and patched workers
    python examples/celery_load.py --both --task score_rows --rows-per-task 32

Redis (Debian's ``redis-server``, on ``PATH``) listens on a Unix socket in a temporary
folder only, no TCP port. ``--clients`` threads (16) each send a task, wait for its result,
check it and send the next, for ``--duration`` seconds (so at most that many tasks are in
flight). Each client owns ``--rows-per-client`` distinct payloads (one row, or
``--rows-per-task`` rows for score_rows); every payload's result is first fetched once,
sequentially, from the same worker, and every answer under load must equal it (rtol 1e-5,
atol 1e-6), so an answer holding another task's rows counts as wrong. The worker runs
plainly (``python -m celery -A celery_tasks worker --pool prefork -c 2``) or under
``python -m keras_fastpredict``. Reports tasks/s, rows/s, p50/p99 of a task's round trip,
errors and wrong answers; exits 1 if any task failed or was answered wrong.
"""
import argparse
import collections
import contextlib
import os
import shutil
import sys
import tempfile
import threading
import time

import numpy as np

EXAMPLES = os.path.dirname(os.path.abspath(__file__))
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

import celery_tasks  # noqa: E402
from load import N_FEATURES, Server, finish  # noqa: E402


class Redis(Server):
    """``redis-server`` on a Unix socket in a new temporary folder (no TCP port, nothing
    saved to disk); ``url`` is the broker URL. ``stop()`` also removes the folder."""

    PORT = None
    READY = r'(?i)ready to accept connections'

    def __init__(self, startup_timeout=30.0, wait=True):
        self.folder = tempfile.mkdtemp(prefix='kfp-redis-')
        self.socket = os.path.join(self.folder, 'redis.sock')
        self.url = 'redis+socket://' + self.socket
        cmd = ['redis-server', '--port', '0', '--unixsocket', self.socket,
               '--unixsocketperm', '700', '--dir', self.folder, '--save', '',
               '--appendonly', 'no', '--daemonize', 'no', '--loglevel', 'notice']
        try:
            self._start(cmd, {}, 1, startup_timeout, wait=wait)
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise

    def stop(self, grace=15.0):
        try:
            super(Redis, self).stop(grace)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


class Worker(Server):
    """``python -m celery -A celery_tasks worker --pool prefork -c N`` (``app``: another module
    that uses celery_tasks' app) on the broker ``url``, plain
    or under ``python -m keras_fastpredict [runner_args]``; ready once every pool process
    has built its model. ``stop()`` waits until the worker is idle (``wait_idle``), then a
    warm shutdown (SIGTERM), then SIGKILL to anything left of its session."""

    PORT = None
    READY = r'celery_tasks: model ready'

    def __init__(self, url, unpatched=False, seed=0, concurrency=2, runner_args=(),
                 env=None, startup_timeout=120.0, wait=True, app='celery_tasks'):
        cmd = [sys.executable]
        if not unpatched:
            cmd += ['-m', 'keras_fastpredict'] + list(runner_args)
        cmd += ['-m', 'celery', '-A', app, 'worker', '--pool', 'prefork',
                '-c', str(concurrency), '-n', '%s@%%h' % ('plain' if unpatched else 'patched'),
                '--without-mingle', '--without-gossip', '--without-heartbeat',
                '-l', 'warning']
        self.url = url
        self.concurrency = concurrency
        self._start(cmd, dict(env or {}, CELERY_BROKER_URL=url, MODEL_SEED=str(seed)),
                    concurrency, startup_timeout, cwd=EXAMPLES, wait=wait)

    def stop(self, grace=15.0):
        """``wait_idle`` (``grace`` s at most) if the worker started, then Server.stop."""
        if self.proc.poll() is None and self.ready >= self.concurrency:
            self.wait_idle(grace)
        super(Worker, self).stop(grace)

    def wait_idle(self, timeout):
        """Whether, within ``timeout`` s, the worker's main process has taken in the result
        of every task (none reserved, then none active: a task goes from one to the other,
        then is done).

        A pool process stores a task's result in Redis before it sends it to the main
        process, so a client that has its last result may stop a worker still reading it.
        Celery 5.2's SIGTERM handler, in a main process with one thread, raises
        WorkerShutdown wherever that thread is: in the middle of taking in a pool
        process' message, it loses it, and that pool process then waits 30 s before it
        exits (billiard 3.6.4's ``_ensure_messages_consumed``), plain or patched: longer
        than stop()'s grace, whose SIGKILL then ends it before it writes its report."""
        deadline = time.monotonic() + timeout

        def idle(ask):
            replies = ask()             # {worker: [task, ...]}, None without an answer
            return replies is not None and not any(replies.values())

        try:
            with client_app(self.url) as app:
                while time.monotonic() < deadline:
                    inspect = app.control.inspect(
                        timeout=max(0.1, min(1.0, deadline - time.monotonic())), limit=1)
                    if idle(inspect.reserved) and idle(inspect.active):
                        return True
        except Exception:               # noqa: BLE001 - (Redis gone): stopped regardless
            pass
        return False


def send(app, task, payload, timeout):
    """One task's round trip (``payload`` its argument, None for none): its result, as a
    numpy array."""
    result = app.send_task('celery_tasks.' + task, args=[] if payload is None else [payload])
    try:
        out = np.asarray(result.get(timeout=timeout, interval=0.002))
        result.forget()                # its key in Redis
        return out
    finally:
        # What the result's __del__ does (unsubscribe from its Redis channel), now: freed
        # later, once Redis is stopped, it would retry to reconnect for minutes.
        result.backend.remove_pending_result(result)
        result.backend = None


@contextlib.contextmanager
def client_app(url):
    """A Celery app of its own for one client thread: Celery 5.2's Redis result backend
    shared by threads loses results now and then (a get() then waits ~1 s)."""
    app = celery_tasks.make_app(url)
    try:
        yield app
    finally:
        app.close()


def payloads(task, clients, rows_per_client, rows_per_task, seed):
    """For each client, its distinct payloads (lists): one row, or ``rows_per_task`` rows."""
    per = 1 if task == 'predict_row' else rows_per_task
    rows = np.random.RandomState(seed).uniform(
        -1, 1, (clients, rows_per_client, per, N_FEATURES)).astype('float32')
    if task == 'predict_row':
        rows = rows[:, :, 0]
    return rows.tolist()


def run_load(url, task='predict_row', clients=16, rows_per_client=8, rows_per_task=32,
             duration=10.0, timeout=30.0, seed=1234, warmup=0.0):
    """Reference pass, an optional unmeasured warm-up, then the closed loop; a dict."""
    work = payloads(task, clients, rows_per_client, rows_per_task, seed)
    with client_app(url) as app:
        reference = [[send(app, task, p, timeout) for p in mine] for mine in work]
    rows_per = 1 if task == 'predict_row' else rows_per_task

    def loop(seconds, record):
        latencies = [[] for _ in range(clients)]
        errors = collections.Counter()
        wrong = [0]
        lock = threading.Lock()
        deadline = time.monotonic() + seconds

        def client(c):
            with client_app(url) as app:
                run(c, app)

        def run(c, app):
            j = 0
            while time.monotonic() < deadline:
                k = j % rows_per_client
                j += 1
                t0 = time.perf_counter()
                try:
                    got = send(app, task, work[c][k], timeout)
                except Exception as exc:        # the task failed, or timed out
                    with lock:
                        errors[type(exc).__name__] += 1
                    continue
                latencies[c].append(time.perf_counter() - t0)
                want = reference[c][k]
                if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5,
                                                              atol=1e-6):
                    with lock:
                        wrong[0] += 1

        start = time.monotonic()
        threads = [threading.Thread(target=client, args=(c,), daemon=True)
                   for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline + timeout + 1 - time.monotonic()))
        elapsed = time.monotonic() - start
        if not record:
            return None
        lat = np.array([x for per in latencies for x in per]) * 1e3
        return {
            'task': task, 'clients': clients, 'rows_per_task': rows_per,
            'ok': int(lat.size), 'errors': sum(errors.values()),
            'error_kinds': dict(errors), 'wrong': wrong[0], 'seconds': elapsed,
            'throughput': lat.size / elapsed if elapsed > 0 else 0.0,
            'rows_per_s': lat.size * rows_per / elapsed if elapsed > 0 else 0.0,
            'p50_ms': float(np.percentile(lat, 50)) if lat.size else float('nan'),
            'p99_ms': float(np.percentile(lat, 99)) if lat.size else float('nan'),
            'stuck_clients': sum(t.is_alive() for t in threads),
        }

    if warmup > 0:
        loop(warmup, False)
    return loop(duration, True)


def describe(name, r):
    return ('%-9s %8.1f tasks/s %9.1f rows/s   p50 %7.2f ms   p99 %7.2f ms   ok %d   '
            'errors %d %s  wrong %d   (%.1f s)'
            % (name, r['throughput'], r['rows_per_s'], r['p50_ms'], r['p99_ms'], r['ok'],
               r['errors'], r['error_kinds'] or '', r['wrong'], r['seconds']))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--unpatched', action='store_true', help='a plain worker')
    parser.add_argument('--both', action='store_true',
                        help='patched then plain worker, and their ratio')
    parser.add_argument('--task', default='predict_row', choices=['predict_row', 'score_rows'])
    parser.add_argument('--rows-per-task', type=int, default=32, help='score_rows')
    parser.add_argument('--concurrency', type=int, default=2, help='worker -c')
    parser.add_argument('--clients', type=int, default=16)
    parser.add_argument('--rows-per-client', type=int, default=8)
    parser.add_argument('--duration', type=float, default=10.0, help='seconds of load')
    parser.add_argument('--warmup', type=float, default=2.0, help='unmeasured seconds first')
    parser.add_argument('--timeout', type=float, default=30.0, help='per task, seconds')
    parser.add_argument('--seed', type=int, default=0, help='model seed')
    parser.add_argument('--row-seed', type=int, default=1234)
    args = parser.parse_args(argv)
    if min(args.clients, args.rows_per_client, args.rows_per_task) < 1 or args.duration <= 0:
        parser.error('--clients, --rows-per-client, --rows-per-task, --duration must be > 0')

    print('%d clients, closed loop of %s tasks (%d row(s) each) for %g s, worker -c %d'
          % (args.clients, args.task, 1 if args.task == 'predict_row' else args.rows_per_task,
             args.duration, args.concurrency), flush=True)
    results = {}
    for unpatched in ([False, True] if args.both else [args.unpatched]):
        redis = worker = None
        try:
            redis = Redis()
            worker = Worker(redis.url, unpatched, args.seed, args.concurrency)
            r = run_load(redis.url, args.task, args.clients, args.rows_per_client,
                         args.rows_per_task, args.duration, args.timeout, args.row_seed,
                         args.warmup)
        except (OSError, RuntimeError) as exc:      # not started, or redis-server missing
            print('celery_load.py: %s' % exc, file=sys.stderr)
            return 2
        finally:
            for server in (worker, redis):
                if server is not None:
                    server.stop()
        results[unpatched] = r
        print(describe('unpatched' if unpatched else 'patched', r), flush=True)
    return finish(results, args.both)


if __name__ == '__main__':
    sys.exit(main())
