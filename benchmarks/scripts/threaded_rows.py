"""A server's first burst: 16 threads share the rows of an array, one row per
``model.predict`` call each (as request handlers call it), on Dense(2048)x2, a model whose
row is bound by reading its weights (where merging concurrent calls pays). Plain Keras in
threads needs the graph set in each (``graph.as_default()``); the outputs are put back in
row order."""
import threading

import numpy as np
import tensorflow as tf
from keras import layers, models

import _harness

THREADS = 16

_harness.seed()
n = _harness.calls(1000)
model = models.Sequential([layers.Dense(2048, activation='relu', input_shape=(256,)),
                           layers.Dense(2048, activation='relu'),
                           layers.Dense(10, activation='softmax')])
X = np.random.standard_normal((n, 256)).astype(np.float32)
requests = [np.array(X[i:i + 1]) for i in range(n)]      # copies, as a request's are
model.predict(requests[0])      # a server loads and checks its model before serving
graph = tf.compat.v1.get_default_graph()


def loop():
    out = [None] * n

    def work(k):
        with graph.as_default():
            for i in range(k, n, THREADS):
                out[i] = model.predict(requests[i])
    threads = [threading.Thread(target=work, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return np.concatenate(out)


_harness.run(loop)
