"""Real Celery: a prefork worker (``-c 2``) running examples/celery_tasks.py, plainly and
under ``python -m keras_fastpredict``, each with a redis-server of its own (Debian's
package, .ci/run installs it; on a Unix socket in a temporary folder). The same results as
the plain worker and as plain Keras in this process, from concurrent clients; the pool
processes patched, their calls on the fast path (their own reports, written as the worker
shuts down).

Each test starts Redis and the workers and stops them, also on failure; a server outliving
this process gets SIGTERM (load._with_parent). Without redis-server on PATH the test
fails (FileNotFoundError), it is not skipped.
"""
import contextlib
import os
import sys

import numpy as np
import pytest

from keras_fastpredict import processes
from server_support import (EXAMPLES, ROOT, assert_distinct, concurrent_answers, env,
                            plain_keras, side_by_side)

# celery and redis-py come with the `celery` extra (tools/bootstrap.sh installs it): a
# missing one fails these tests, it does not skip them.
import celery  # noqa: E402,F401
import redis  # noqa: E402,F401

SEED = 7
CLIENTS = 8
ROWS_PER_TASK = 16

sys.path.insert(0, EXAMPLES)
try:
    import celery_load
    from load import N_FEATURES
finally:
    sys.path.remove(EXAMPLES)


def _worker(spec):
    """A Redis, then a worker on it."""
    broker = celery_load.Redis()
    yield broker
    yield celery_load.Worker(broker.url, seed=SEED, env=env(**spec.pop('env', {})),
                             wait=False, startup_timeout=150, **spec)


@contextlib.contextmanager
def workers(*specs):
    """A Redis and a worker (``specs``: Worker keyword arguments) per spec, started side
    by side; yields the workers; stops all whatever happens (each worker before its
    Redis)."""
    with side_by_side(specs, _worker) as started:
        yield started[1::2]


def _concurrent_results(url, task, payloads):
    """CLIENTS threads at once, each with its own Celery app, sending its share of the
    payloads one task at a time; the results in payload order."""
    return concurrent_answers(
        len(payloads), [range(c, len(payloads), CLIENTS) for c in range(CLIENTS)],
        lambda app, i: celery_load.send(app, task, payloads[i], timeout=60),
        join_timeout=120, session=lambda: celery_load.client_app(url))


def _whoami(url, n=8):
    with celery_load.client_app(url) as app:
        return {tuple(celery_load.send(app, 'whoami', None, 60).tolist()) for _ in range(n)}


@pytest.mark.timeout(300)
def test_results_equal_plain_and_pool_processes_on_the_fast_path(tmp_path):
    rng = np.random.RandomState(31)
    rows = rng.uniform(-1, 1, (48, N_FEATURES)).astype('float32')
    batches = rng.uniform(-1, 1, (8, ROWS_PER_TASK, N_FEATURES)).astype('float32')
    expected_rows = plain_keras(SEED, rows)
    expected_batches = plain_keras(SEED, batches.reshape(-1, N_FEATURES))
    assert_distinct(expected_rows)
    folder = tmp_path / 'stats'
    folder.mkdir()
    with workers(dict(unpatched=True),
                 dict(env={processes.STATS_DIR_ENV: str(folder)})) as (plain, fast):
        got = {}
        for name, worker in (('plain', plain), ('fast', fast)):
            one = _concurrent_results(worker.url, 'predict_row', rows.tolist())
            many = _concurrent_results(worker.url, 'score_rows', batches.tolist())
            got[name] = (np.stack(one), np.concatenate(many), _whoami(worker.url))
        main_pid = fast.proc.pid
    # The plain worker answers as plain Keras does here; the patched one equals it within
    # the promised tolerance (score_rows' rows are read ahead: run as one batch, their
    # sums may be in another order; README: What "the same result" means).
    np.testing.assert_allclose(got['plain'][0], expected_rows, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got['plain'][1], expected_batches, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got['fast'][0], got['plain'][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got['fast'][1], got['plain'][1], rtol=1e-5, atol=1e-6)
    # The pool processes that answered are patched under the runner, plain without it.
    assert {patched for _, patched in got['plain'][2]} == {False}
    assert {patched for _, patched in got['fast'][2]} == {True}

    # Each pool process reported as the worker shut down: every call fast. (One thread
    # per pool process: the counters are exact. Whether score_rows' loops were read ahead
    # depends on the timing of the engine's warm-up: not asserted. The worker was stopped
    # once idle: a SIGTERM while Celery takes in a result can keep a pool process, plain
    # or patched, 30 s from its exit, past stop()'s SIGKILL; Worker.wait_idle.)
    records = processes.collect(str(folder))
    assert {pid for pid, _ in got['fast'][2]} <= {r['pid'] for r in records}, records
    reports = [r for r in records if r['models']]     # (a process may have served no row)
    assert reports, 'no pool process predicted: %s' % records
    assert all(r['ppid'] == main_pid for r in reports), reports
    mlp = [r['models']['mlp'] for r in reports]
    calls = len(rows) + batches.shape[0] * batches.shape[1]
    assert sum(m['calls'] for m in mlp) == sum(m['fast_calls'] for m in mlp) == calls, mlp
    assert all(m['fallbacks'] == 0 for m in mlp), mlp


# The tasks of examples/celery_tasks.py with the model built when the module is imported:
# in the worker's main process, before the prefork pool forks (the --preload of Celery).
EAGER = """
import celery_tasks
from celery_tasks import app  # noqa: F401
celery_tasks.model()
"""


@pytest.mark.timeout(300)
def test_model_built_before_the_fork_raises_where_plain_celery_hangs(tmp_path):
    (tmp_path / 'eager_tasks.py').write_text(EAGER)
    path = os.pathsep.join([ROOT, EXAMPLES, str(tmp_path)])
    with workers(dict(unpatched=True, app='eager_tasks', env={'PYTHONPATH': path}),
                 dict(app='eager_tasks', env={'PYTHONPATH': path})) as (plain, fast):
        # Under the runner: the task fails at once with the error, raised by get() here.
        with celery_load.client_app(fast.url) as app:
            for _ in range(4):
                with pytest.raises(processes.ForkedAfterSessionError) as caught:
                    celery_load.send(app, 'predict_row', [0.0] * N_FEATURES, timeout=60)
                assert 'after TensorFlow had created a session there' in str(caught.value)
                assert 'was forked from process %d ' % fast.proc.pid in str(caught.value)
        # Plain Keras in the same pool process: predict never returns, nor does the task.
        with celery_load.client_app(plain.url) as app:
            from celery.exceptions import TimeoutError as CeleryTimeout
            with pytest.raises(CeleryTimeout):
                celery_load.send(app, 'predict_row', [0.0] * N_FEATURES, timeout=8)
        plain.stop(grace=3)            # (warm shutdown would wait for the stuck task)
