"""examples/flask_server.py's app as a WSGI module for gunicorn, as legacy code writes it:
the model is built when the module is imported, and each request predicts on the model's
graph (the classic workaround that makes plain Keras work in request threads).

    gunicorn --chdir examples -b 127.0.0.1:8000 -w 2 wsgi:app                    # plain
    python -m keras_fastpredict -m gunicorn --chdir examples -b 127.0.0.1:8000 -w 2 wsgi:app

There is no ``patch()`` line: under ``python -m keras_fastpredict`` gunicorn's master and
its workers are patched by the runner. Without ``--preload`` each worker imports this
module, so builds its model, after its fork. With ``--preload`` the master builds the model
(and so a TensorFlow session) before forking: TensorFlow 1.15 does not work in such a
worker, see docs/servers.md. ``MODEL_SEED`` (default 0) seeds the weights, as
flask_server.py's ``--seed`` does.
"""
import logging
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import tensorflow as tf  # noqa: E402

import flask_server  # noqa: E402

tf.compat.v1.logging.set_verbosity(tf.compat.v1.logging.ERROR)
logging.getLogger('werkzeug').setLevel(logging.ERROR)

model = flask_server.build_model(int(os.environ.get('MODEL_SEED', '0')))
model._make_predict_function()
graph = tf.get_default_graph()
app = flask_server.create_app(model, graph)
# One write: the workers' lines must not run together.
os.write(1, b'wsgi: model ready (pid %d)\n' % os.getpid())
