"""Load generator for examples/flask_server.py, on loopback only (127.0.0.1).

    python examples/load.py --spawn --both            # patched and unpatched, side by side
    python examples/load.py --spawn [--unpatched]     # one variant, server started here
    python examples/load.py --spawn --both --gunicorn [--worker-class gthread]
                                                      # examples/wsgi.py under gunicorn -w 2
    python examples/load.py --port 5000               # a server already running

``--clients`` threads (16) each send ``--requests`` requests (200) of one row each, for
``--duration`` seconds at most. Every answer is checked: each client owns
``--rows-per-client`` distinct rows, and the prediction for each row is first fetched
once, sequentially (no concurrency, so no batching), from the same server; under load
every answer must equal the reference of the row that client sent (rtol 1e-5), so an
answer holding another caller's row counts as wrong. Reports throughput, p50/p99
latency, errors and wrong answers; exits 1 if any request failed or was answered wrong.
"""
import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np

HOST = '127.0.0.1'
N_FEATURES = 32
SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'flask_server.py')
# No proxy, ever: the server is on loopback.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def post(port, rows, timeout):
    body = json.dumps({'instances': np.asarray(rows).tolist()}).encode()
    req = urllib.request.Request('http://%s:%d/predict' % (HOST, port), data=body,
                                 headers={'Content-Type': 'application/json'})
    with _opener.open(req, timeout=timeout) as resp:
        return np.asarray(json.loads(resp.read().decode())['predictions'])


def get_stats(port, timeout=10.0):
    with _opener.open('http://%s:%d/stats' % (HOST, port), timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def _with_parent(cmd):
    """``cmd`` run so that it gets SIGTERM when the thread that started it ends (its
    process dies, even of SIGKILL): a gunicorn master, a Celery worker or Redis then shut
    down as on stop(). util-linux's setpriv where there is one; else as it is."""
    setpriv = shutil.which('setpriv')
    return [setpriv, '--pdeathsig', 'TERM', '--'] + cmd if setpriv else cmd


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False


class Server(object):
    """examples/flask_server.py in a subprocess; its output is kept for error reports.

    The process gets a session of its own, so that stop() also ends any worker it forked
    (a gunicorn master's, see Gunicorn). With ``wait=False`` the constructor returns at
    once and ``wait_ready()`` waits: several servers then start side by side."""

    PORT = r'listening on http://127\.0\.0\.1:(\d+)'     # the line that gives the port
    READY = PORT                                            # a line per ready process

    def __init__(self, unpatched=False, seed=0, startup_timeout=120.0, wait=True):
        cmd = [sys.executable, SERVER, '--port', '0', '--seed', str(seed)]
        if unpatched:
            cmd.append('--unpatched')
        self._start(cmd, {}, 1, startup_timeout, wait=wait)

    def _start(self, cmd, env, ready, startup_timeout, cwd=None, wait=True):
        """Runs ``cmd``; ready once it printed its port (if PORT) and ``ready`` READY
        lines. ``env`` is added to this process' environment (a None value removes)."""
        env = {k: v for k, v in dict(os.environ, **env).items() if v is not None}
        env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
        self.cmd = cmd
        self.proc = subprocess.Popen(_with_parent(cmd), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     universal_newlines=True, start_new_session=True)
        self.output = collections.deque(maxlen=400)
        self.port = None
        self.ready = 0
        self._needed = ready
        self._deadline = time.monotonic() + startup_timeout
        self._found = found = threading.Event()

        def read():
            for line in self.proc.stdout:      # drained to the end: the pipe never fills
                self.output.append(line.rstrip())
                m = self.PORT and re.search(self.PORT, line)
                if m and self.port is None:
                    self.port = int(m.group(1))
                # (Lines of processes writing at once may run together.)
                self.ready += len(re.findall(self.READY, line))
                if (self.port is not None or not self.PORT) and self.ready >= ready:
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        if wait:
            self.wait_ready()

    def wait_ready(self):
        """Returns once the server is ready; stops it and raises RuntimeError if it is not
        by its start-up deadline (or exited)."""
        try:
            self._found.wait(max(0.0, self._deadline - time.monotonic()))
            if self.ready < self._needed or (self.PORT and self.port is None):
                raise RuntimeError('%s did not start in time:\n%s'
                                   % (' '.join(self.cmd[:6]), self.tail()))
        except BaseException:
            self.stop()
            raise
        return self

    def tail(self):
        return '\n'.join(self.output)

    def stop(self, grace=15.0):
        """SIGTERM, then SIGKILL to the process and all it started (its session)."""
        deadline = time.monotonic() + grace
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # Its workers may outlive it by a moment (a prefork pool's processes write their
        # reports as they end): they get the rest of the grace time, then SIGKILL.
        while time.monotonic() < deadline and _group_alive(self.proc.pid):
            time.sleep(0.05)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)   # workers left behind, if any
        except OSError:                                # none: the group is gone
            pass
        self.proc.wait()


class Gunicorn(Server):
    """examples/wsgi.py under real gunicorn (``python -m gunicorn``), plain or under the
    runner (``python -m keras_fastpredict [runner_args] -m gunicorn``). Ready once every
    worker (with ``preload``: the master) has built its model."""

    PORT = r'Listening at: http://127\.0\.0\.1:(\d+)'
    READY = r'wsgi: model ready'

    def __init__(self, unpatched=False, seed=0, workers=2, worker_class='sync', threads=4,
                 preload=False, timeout=30, graceful_timeout=10, runner_args=(), env=None,
                 startup_timeout=120.0, wait=True):
        cmd = [sys.executable]
        if not unpatched:
            cmd += ['-m', 'keras_fastpredict'] + list(runner_args)
        cmd += ['-m', 'gunicorn', '--chdir', os.path.dirname(SERVER), '-b', '%s:0' % HOST,
                '-w', str(workers), '-k', worker_class, '--timeout', str(timeout),
                '--graceful-timeout', str(graceful_timeout)]
        if worker_class == 'gthread':
            cmd += ['--threads', str(threads)]
        if preload:
            cmd.append('--preload')
        cmd.append('wsgi:app')
        self.workers = workers
        self._start(cmd, dict(env or {}, MODEL_SEED=str(seed)), 1 if preload else workers,
                    startup_timeout, wait=wait)


def run_load(port, clients, requests, rows_per_client, duration, timeout, seed):
    """Reference pass, then the concurrent load; returns a dict of results."""
    rng = np.random.RandomState(seed)
    rows = rng.uniform(-1, 1, (clients * rows_per_client, N_FEATURES)).astype('float32')
    # Reference: each row once, one request at a time.
    reference = [post(port, rows[i:i + 1], timeout)[0] for i in range(len(rows))]

    latencies = [[] for _ in range(clients)]
    errors = collections.Counter()
    wrong = [0]
    cut = [0]
    lock = threading.Lock()
    start = time.monotonic()
    deadline = start + duration

    def client(c):
        mine = latencies[c]
        for j in range(requests):
            now = time.monotonic()
            if now >= deadline:
                with lock:
                    cut[0] += requests - j
                return
            i = c * rows_per_client + j % rows_per_client
            t0 = time.perf_counter()
            try:
                pred = post(port, rows[i:i + 1], min(timeout, max(0.05, deadline - now)))
            except Exception as exc:            # HTTP error, refused, timed out
                with lock:
                    if time.monotonic() >= deadline:
                        cut[0] += requests - j
                        return
                    errors[type(exc).__name__] += 1
                continue
            mine.append(time.perf_counter() - t0)
            if pred.shape != (1,) + reference[i].shape or not np.allclose(
                    pred[0], reference[i], rtol=1e-5, atol=1e-6):
                with lock:
                    wrong[0] += 1

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline + timeout + 1 - time.monotonic()))
    elapsed = time.monotonic() - start
    lat = np.array([x for per in latencies for x in per]) * 1e3
    return {
        'planned': clients * requests,
        'ok': int(lat.size),
        'errors': sum(errors.values()),
        'error_kinds': dict(errors),
        'wrong': wrong[0],
        'cut': cut[0],
        'seconds': elapsed,
        'throughput': lat.size / elapsed if elapsed > 0 else 0.0,
        'p50_ms': float(np.percentile(lat, 50)) if lat.size else float('nan'),
        'p99_ms': float(np.percentile(lat, 99)) if lat.size else float('nan'),
    }


def describe(name, r, stats):
    lines = ['%-9s %8.1f req/s   p50 %7.2f ms   p99 %7.2f ms   ok %d/%d   errors %d   '
             'wrong %d   cut by --duration %d   (%.1f s)'
             % (name, r['throughput'], r['p50_ms'], r['p99_ms'], r['ok'], r['planned'],
                r['errors'], r['wrong'], r['cut'], r['seconds'])]
    if r['error_kinds']:
        lines.append('          errors: %s' % r['error_kinds'])
    for model, s in sorted(stats.items()):
        lines.append('          %s: calls %d, fast %d, fallbacks %d, batches %d, mean batch '
                     '%.2f, histogram %s, queue wait %.2f ms, exec %.2f ms, rejected %d, '
                     'timeouts %d' % (model, s['calls'], s['fast_calls'], s['fallbacks'],
                                      s['batches'], s['mean_batch_size'],
                                      s['batch_size_histogram'], s['mean_queue_wait_ms'],
                                      s['mean_exec_ms'], s['rejected'], s['timeouts']))
    return '\n'.join(lines)


def finish(results, both):
    """The end of a run, here and in celery_load.py: with ``both``, prints the ratio of the
    patched run (``results[False]``, run_load's dict) to the unpatched one
    (``results[True]``). Returns the exit status: 1 if any run had an error, a wrong
    answer or no answer at all, else 0."""
    if both:
        fast, slow = results[False], results[True]
        print('ratio: throughput patched/unpatched x%.2f; latency unpatched/patched: '
              'p50 x%.2f, p99 x%.2f' % (
                  fast['throughput'] / slow['throughput'] if slow['throughput'] else 0.0,
                  slow['p50_ms'] / fast['p50_ms'], slow['p99_ms'] / fast['p99_ms']))
    bad = any(r['errors'] or r['wrong'] or r['ok'] == 0 for r in results.values())
    return 1 if bad else 0


def run_variant(args, unpatched):
    name = 'unpatched' if unpatched else 'patched'
    server = None
    if args.spawn and args.gunicorn:
        server = Gunicorn(unpatched, args.seed, workers=args.workers,
                          worker_class=args.worker_class, threads=args.threads,
                          preload=args.preload)
    elif args.spawn:
        server = Server(unpatched, args.seed)
    try:
        port = server.port if server else args.port
        result = run_load(port, args.clients, args.requests, args.rows_per_client,
                          args.duration, args.timeout, args.row_seed)
        try:
            stats = get_stats(port)
        except (OSError, ValueError):
            stats = {}
        if server is not None and server.proc.poll() is not None:
            print('server exited early:\n' + server.tail(), file=sys.stderr)
        print(describe(name if server else 'server', result, stats), flush=True)
        return result
    finally:
        if server is not None:
            server.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--port', type=int, help='a server already on 127.0.0.1:PORT')
    parser.add_argument('--spawn', action='store_true', help='start examples/flask_server.py')
    parser.add_argument('--unpatched', action='store_true', help='with --spawn: plain Keras')
    parser.add_argument('--both', action='store_true',
                        help='with --spawn: patched then unpatched, and their ratio')
    parser.add_argument('--gunicorn', action='store_true',
                        help='with --spawn: examples/wsgi.py under gunicorn (plain, or under '
                             'python -m keras_fastpredict)')
    parser.add_argument('--workers', type=int, default=2, help='gunicorn -w')
    parser.add_argument('--worker-class', default='sync', choices=['sync', 'gthread'])
    parser.add_argument('--threads', type=int, default=4, help='gunicorn --threads (gthread)')
    parser.add_argument('--preload', action='store_true', help='gunicorn --preload')
    parser.add_argument('--clients', type=int, default=16)
    parser.add_argument('--requests', type=int, default=200, help='per client')
    parser.add_argument('--rows-per-client', type=int, default=16)
    parser.add_argument('--duration', type=float, default=60.0,
                        help='hard cap in seconds on the load phase (per variant)')
    parser.add_argument('--timeout', type=float, default=10.0, help='per request, seconds')
    parser.add_argument('--seed', type=int, default=0, help='model seed of a spawned server')
    parser.add_argument('--row-seed', type=int, default=1234)
    args = parser.parse_args(argv)
    if args.spawn == (args.port is not None):
        parser.error('give either --spawn or --port')
    if (args.unpatched or args.both or args.gunicorn) and not args.spawn:
        parser.error('--unpatched, --both and --gunicorn go with --spawn')
    if min(args.clients, args.requests, args.rows_per_client) < 1 or args.duration <= 0:
        parser.error('--clients, --requests, --rows-per-client and --duration must be > 0')

    print('%d clients x %d requests of 1 row, %d distinct rows per client, at most %g s'
          % (args.clients, args.requests, args.rows_per_client, args.duration), flush=True)
    variants = [False, True] if args.both else [args.unpatched]
    try:
        results = {unpatched: run_variant(args, unpatched) for unpatched in variants}
    except (OSError, RuntimeError) as exc:     # server down, or it did not start
        print('load.py: %s' % exc, file=sys.stderr)
        return 2
    return finish(results, args.both)


if __name__ == '__main__':
    sys.exit(main())
