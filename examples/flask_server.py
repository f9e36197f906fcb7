"""A small Keras 2.2 prediction server, written the way legacy Flask + Keras code is.

    python examples/flask_server.py [--port 0] [--seed 0] [--unpatched]

    POST /predict  {"instances": [[32 floats], ...]}  ->  {"predictions": [[10 floats], ...]}
    GET  /stats    keras_fastpredict.stats() as JSON

The change keras_fastpredict asks for is the one ``keras_fastpredict.patch()`` line in
main(): with it, request threads calling ``model.predict`` at once share session runs.
``--unpatched`` runs plain Keras with the classic workaround instead (the predict function
built up front, each request on the model's graph). The weights come from ``--seed``, so
a client can check every answer (see examples/load.py). Loopback only.
"""
import argparse
import logging
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from flask import Flask, abort, jsonify, request  # noqa: E402
from keras.layers import Dense  # noqa: E402
from keras.models import Sequential  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402

import keras_fastpredict  # noqa: E402

N_FEATURES = 32


def build_model(seed=0):
    """A Dense MLP, 32 -> 64 -> 64 -> 10, with weights drawn from ``seed`` (no training)."""
    model = Sequential([
        Dense(64, activation='relu', input_shape=(N_FEATURES,)),
        Dense(64, activation='relu'),
        Dense(10, activation='softmax'),
    ], name='mlp')
    rng = np.random.RandomState(seed)
    model.set_weights([rng.uniform(-0.5, 0.5, w.shape).astype('float32')
                       for w in model.get_weights()])
    return model


def create_app(model, graph=None):
    """The Flask app serving ``model``; ``graph``: run each request on it (the workaround)."""
    app = Flask(__name__)

    @app.route('/predict', methods=['POST'])
    def predict():
        body = request.get_json(force=True, silent=True) or {}
        try:
            x = np.asarray(body['instances'], dtype='float32')
        except (KeyError, TypeError, ValueError):
            abort(400, 'expected {"instances": [[%d floats], ...]}' % N_FEATURES)
        if x.ndim != 2 or x.shape[1] != N_FEATURES:
            abort(400, 'expected {"instances": [[%d floats], ...]}' % N_FEATURES)
        if graph is None:
            y = model.predict(x)
        else:
            with graph.as_default():
                y = model.predict(x)
        return jsonify(predictions=y.tolist())

    @app.route('/stats')
    def stats():
        return jsonify(keras_fastpredict.stats())

    return app


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--host', default='127.0.0.1', choices=['127.0.0.1'])
    parser.add_argument('--port', type=int, default=0, help='0: any free port (printed)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the model weights')
    parser.add_argument('--unpatched', action='store_true', help='plain Keras, for comparison')
    args = parser.parse_args(argv)

    tf.compat.v1.logging.set_verbosity(tf.compat.v1.logging.ERROR)
    logging.getLogger('werkzeug').setLevel(logging.ERROR)   # no line per request
    if not args.unpatched:
        keras_fastpredict.patch()
    model = build_model(args.seed)
    graph = None
    if args.unpatched:
        model._make_predict_function()
        graph = tf.get_default_graph()
    app = create_app(model, graph)

    # What app.run(threaded=True) does, keeping hold of the server to print its port.
    server = make_server(args.host, args.port, app, threaded=True)
    print('listening on http://%s:%d (%s)' % (args.host, server.server_port,
                                             'unpatched' if args.unpatched else 'patched'),
          flush=True)
    server.serve_forever()


if __name__ == '__main__':
    main()
