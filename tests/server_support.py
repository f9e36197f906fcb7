"""What the real-server tests (gunicorn, Celery) share."""
import os
import sys

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        'examples')


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
