"""Walk the rows of a loaded array, one call each, using each result at once (read-ahead's
case): ``np.argmax(model.predict(X[i:i+1]))`` on Dense(64)x2 or, with the second argument
``lstm``, on LSTM(32) over 20 steps."""
import sys

import numpy as np
from keras import layers, models

import _harness

_harness.seed()
n = _harness.calls(2000)
if len(sys.argv) > 2 and sys.argv[2] == 'lstm':
    model = models.Sequential([layers.LSTM(32, input_shape=(20, 8)),
                               layers.Dense(8, activation='tanh')])
    X = np.random.rand(n, 20, 8).astype(np.float32)
else:
    model = models.Sequential([layers.Dense(64, activation='relu', input_shape=(32,)),
                               layers.Dense(64, activation='relu'),
                               layers.Dense(10, activation='softmax')])
    X = np.random.rand(n, 32).astype(np.float32)


def loop():
    labels, out = [], []
    for i in range(len(X)):
        y = model.predict(X[i:i + 1])
        labels.append(int(np.argmax(y)))
        out.append(y[0])
    return np.array(labels), np.array(out)


_harness.run(loop)
