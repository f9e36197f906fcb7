"""What the real-server tests (the Flask example, gunicorn, Celery) share: the examples'
modules, the servers' environment and start/stop, concurrent clients, and plain Keras'
answers to compare with."""
import contextlib
import importlib.util
import os
import sys
import threading

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, 'examples')


def example(name):
    """examples/<name>.py, loaded afresh as module ``example_<name>``."""
    spec = importlib.util.spec_from_file_location(
        'example_' + name, os.path.join(EXAMPLES, name + '.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def env(**extra):
    """A server's environment: this checkout's package first (for its workers too), no
    options inherited (a None value removes the variable), then ``extra``."""
    out = {k: None for k in os.environ if k.startswith('KERAS_FASTPREDICT_')}
    out.update(PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='3', PYTHONWARNINGS='ignore')
    out.update(extra)
    return out


@contextlib.contextmanager
def side_by_side(specs, start):
    """The servers ``start(spec)`` yields for each spec (a copy), started with
    ``wait=False``, all started before any is waited for; yields them in start order once
    all are ready. Stops them all whatever happens, the last started first, and checks
    that each process ended."""
    started = []
    try:
        for spec in specs:
            for server in start(dict(spec)):
                started.append(server)      # at once: stopped even if the next one fails
        for server in started:
            server.wait_ready()
        yield started
    finally:
        for server in reversed(started):
            server.stop()
        for server in started:
            assert server.proc.returncode is not None, server.cmd


def concurrent_answers(count, shares, ask, join_timeout, session=contextlib.nullcontext):
    """One client thread per share (a list of indices into ``count`` items of work), the
    threads sending at once (a barrier): each enters ``session()`` (a Celery app of its
    own, say), then calls ``ask(s, i)`` (``s`` what the session gave) for each of its
    indices in turn. Asserts that every thread ended within ``join_timeout`` s of its
    join, none raised and each of the ``count`` items got its answer; returns the answers
    in index order."""
    answers, failures = {}, []
    barrier = threading.Barrier(len(shares))

    def client(c):
        try:
            with session() as s:
                barrier.wait(30)
                for i in shares[c]:
                    answers[i] = ask(s, i)
        except Exception as exc:           # reported below, with the thread
            failures.append((c, repr(exc)))

    threads = [threading.Thread(target=client, args=(c,), daemon=True)
               for c in range(len(shares))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join_timeout)
    assert not any(t.is_alive() for t in threads), \
        'clients still waiting after %g s' % join_timeout
    # (Messages of their own: pytest rewrites the asserts of test modules only.)
    assert failures == [], failures
    assert sorted(answers) == list(range(count)), \
        'unanswered %s, unasked %s' % (sorted(set(range(count)) - set(answers)),
                                       sorted(set(answers) - set(range(count))))
    return [answers[i] for i in range(count)]


def assert_distinct(predictions):
    """Distinct rows have clearly distinct predictions: a swapped answer cannot pass."""
    gaps = np.abs(predictions[:, None, :] - predictions[None, :, :]).max(axis=2)
    closest = gaps[~np.eye(len(predictions), dtype=bool)].min()
    assert closest > 1e-4, 'two rows predict within %g of each other' % closest


def plain_keras(seed, rows):
    """The examples' seeded model in this process, on its own graph: plain ``Model.predict``
    (unpatched even if patched here)."""
    import tensorflow as tf
    from keras.engine.training import Model
    sys.path.insert(0, EXAMPLES)
    try:
        import flask_server
    finally:
        sys.path.remove(EXAMPLES)
    predict = Model.__dict__['predict']
    predict = getattr(predict, '__wrapped__', predict)
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph).as_default() as session:
        try:
            return predict(flask_server.build_model(seed), rows)
        finally:
            session.close()
