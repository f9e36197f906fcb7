"""Real gunicorn (``-w 2``, sync and gthread workers) serving examples/wsgi.py, plainly and
under ``python -m keras_fastpredict``: the same answers as the plain server and as plain
Keras in this process, the workers' calls on the fast path (their own reports), and
``--preload``: under the runner a worker's predict raises ForkedAfterSessionError (HTTP
500, the error in gunicorn's log) where the plain worker never answers.

Each test starts its servers (loopback, ports the OS picks) and stops them, also on
failure; a server outliving this process gets SIGTERM (load._with_parent).
"""
import os
import re
import socket
import urllib.error

import numpy as np
import pytest

from keras_fastpredict import processes
from server_support import (assert_distinct, concurrent_answers, env, example,
                            plain_keras, side_by_side)

# flask and gunicorn come with the `examples` extra (tools/bootstrap.sh installs it): a
# missing one fails these tests, it does not skip them.
import flask  # noqa: E402,F401
import gunicorn  # noqa: E402,F401

SEED = 5
CLIENTS = 8
REQUESTS = 10                      # per client, each of its own row

load = example('load')


def _gunicorn(spec):
    yield load.Gunicorn(seed=SEED, env=env(**spec.pop('env', {})), wait=False,
                        startup_timeout=150, **spec)


def servers(*specs):
    """Starts gunicorn servers side by side (``specs``: Gunicorn keyword arguments), waits
    for all, yields them, stops them all whatever happens."""
    return side_by_side(specs, _gunicorn)


def _concurrent_answers(port, rows):
    """CLIENTS threads at once, each posting its own REQUESTS rows one by one."""
    return np.concatenate(concurrent_answers(
        len(rows), [range(c * REQUESTS, (c + 1) * REQUESTS) for c in range(CLIENTS)],
        lambda _, i: load.post(port, rows[i:i + 1], timeout=60), join_timeout=120))


@pytest.mark.timeout(300)
@pytest.mark.parametrize('worker_class', ['sync', 'gthread'])
def test_answers_equal_plain_and_workers_on_the_fast_path(worker_class, tmp_path):
    rows = np.random.RandomState(21).uniform(
        -1, 1, (CLIENTS * REQUESTS, load.N_FEATURES)).astype('float32')
    expected = plain_keras(SEED, rows)
    assert_distinct(expected)
    folder = tmp_path / 'stats'
    folder.mkdir()
    common = dict(workers=2, worker_class=worker_class, threads=4)
    with servers(dict(common, unpatched=True),
                 dict(common, env={processes.STATS_DIR_ENV: str(folder)})) as (plain, fast):
        plain_answers = _concurrent_answers(plain.port, rows)
        fast_answers = _concurrent_answers(fast.port, rows)
        master = fast.proc.pid
    # Plain gunicorn answers as plain Keras does here. The patched workers' answers equal
    # them within the promised tolerance: concurrent calls merged into one session run
    # may sum in another order (README: What "the same result" means).
    np.testing.assert_allclose(plain_answers, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fast_answers, plain_answers, rtol=1e-5, atol=1e-6)

    # Each worker reported at its exit (gunicorn's graceful stop): its calls, fast.
    reports = [r for r in processes.collect(str(folder)) if r['models']]
    assert reports, 'no worker wrote a report: %s' % os.listdir(str(folder))
    assert all(r['ppid'] == master and r['pid'] != master for r in reports), reports
    assert len(reports) <= 2
    mlp = [r['models']['mlp'] for r in reports]
    calls = sum(m['calls'] for m in mlp)
    assert all(m['fallbacks'] == 0 and m['fallback_reasons'] == {} for m in mlp), mlp
    assert all(m['rejected'] == 0 and m['timeouts'] == 0 for m in mlp), mlp
    if worker_class == 'sync':
        # One request at a time per worker: the counters are exact.
        assert calls == len(rows) and sum(m['fast_calls'] for m in mlp) == calls, mlp
        assert all(m['batches'] == 0 for m in mlp), mlp
    else:
        # Request threads bump the counters without a lock: a rare increment may be lost.
        assert 0 < calls <= len(rows) and all(m['fast_calls'] > 0 for m in mlp), mlp


def _post_raw(port, timeout):
    """(status, body) of one /predict request; a timeout raises socket.timeout."""
    try:
        return 200, load.post(port, np.zeros((1, load.N_FEATURES), 'float32'), timeout)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode('utf-8', 'replace')


@pytest.mark.timeout(300)
def test_preload_raises_the_fork_error_where_plain_gunicorn_hangs():
    # --preload: the master builds the model (a TensorFlow session), then forks.
    # --timeout 120: gunicorn does not restart the hung plain worker during the test.
    common = dict(workers=2, preload=True, timeout=120, graceful_timeout=2)
    with servers(dict(common, unpatched=True),
                 dict(common, worker_class='sync'),
                 dict(common, worker_class='gthread', threads=4)) as (plain, sync, gthread):
        for fast in (sync, gthread):
            # Every request fails at once with the error, and the workers stay up.
            for _ in range(4):
                status, body = _post_raw(fast.port, timeout=60)
                assert status == 500, (status, body)
            log = fast.tail()
            assert 'keras_fastpredict.processes.ForkedAfterSessionError: keras_fastpredict: ' \
                   'process' in log, log
            message = re.search(r'process (\d+) was forked from process (\d+) after '
                                r'TensorFlow had created a session there', log)
            assert message and int(message.group(2)) == fast.proc.pid, log
            assert 'gunicorn without --preload' in log
            assert 'WORKER TIMEOUT' not in log and 'Worker exiting' not in log, log
        # Plain Keras in the same worker: predict never returns (TensorFlow 1.15 after a
        # fork), so the request gets no answer; its worker is still there, stuck.
        with pytest.raises(socket.timeout):
            _post_raw(plain.port, timeout=8)
        assert plain.proc.poll() is None
        assert 'ForkedAfterSessionError' not in plain.tail()
