"""Celery tasks that predict per row, as legacy scoring code writes them, with Redis as
broker and result backend (``CELERY_BROKER_URL``, default ``redis://127.0.0.1:6379/0``;
a Unix socket is ``redis+socket:///path/to/redis.sock``).

    cd examples
    python -m celery -A celery_tasks worker --pool prefork -c 2                      # plain
    python -m keras_fastpredict -m celery -A celery_tasks worker --pool prefork -c 2

Each pool process builds its model when it starts (Celery's ``worker_process_init``, after
the prefork pool forked it). A model built when this module is imported would be built in
the worker's main process before the fork, where TensorFlow 1.15 cannot serve the children
(docs/servers.md). ``MODEL_SEED`` (default 0) seeds the weights: flask_server.py's MLP.

Tasks: ``predict_row(row)`` predicts one row; ``score_rows(rows)`` scores a list of rows
with one ``model.predict(x[i:i + 1])`` call per row (a loop over records). Both return
lists. ``whoami()`` tells a pool process' pid and whether it is patched.

(kombu's filesystem transport, which needs no server, was tried first: with kombu 5.2.4 its
consumer reads message files that are still being written, and under concurrent load the
worker died of a JSONDecodeError, kombu issue #1551. Celery's file result backend writes
its files in place the same way.)
"""
import os
import sys

import numpy as np
from celery import Celery, signals

BROKER = os.environ.get('CELERY_BROKER_URL', 'redis://127.0.0.1:6379/0')


def make_app(broker):
    app = Celery('celery_tasks', broker=broker, backend=broker)
    app.conf.update(
        task_serializer='json', result_serializer='json', accept_content=['json'],
        worker_hijack_root_logger=False,
        # A pool process imports TensorFlow as it starts: more than Celery's default 4 s.
        worker_proc_alive_timeout=120,
    )
    return app


app = make_app(BROKER)
_model = None


def model():
    """This process' model, built at its first use."""
    global _model
    if _model is None:
        import tensorflow as tf                 # not imported by clients of the tasks
        tf.compat.v1.logging.set_verbosity(tf.compat.v1.logging.ERROR)
        from flask_server import build_model
        _model = build_model(int(os.environ.get('MODEL_SEED', '0')))
    return _model


@signals.worker_process_init.connect
def _build_model(**_):
    model()
    # One write to the worker's own stdout (Celery redirects sys.stdout to its log): the
    # pool processes' lines must not run together.
    os.write(1, b'celery_tasks: model ready (pid %d)\n' % os.getpid())


@app.task
def predict_row(row):
    return model().predict(np.asarray([row], dtype='float32'))[0].tolist()


@app.task
def score_rows(rows):
    m, x = model(), np.asarray(rows, dtype='float32')
    return [m.predict(x[i:i + 1])[0].tolist() for i in range(len(x))]


@app.task
def whoami():
    patching = sys.modules.get('keras_fastpredict.patching')
    return os.getpid(), bool(patching is not None and patching.is_patched())
