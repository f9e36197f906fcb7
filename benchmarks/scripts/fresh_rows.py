"""One row per call on fresh arrays, Dense(64)x2, by the way in given as the second
argument: ``predict`` (default), ``sess.run``, ``K.function`` or ``tf.keras``."""
import sys

import numpy as np

import _harness

_harness.seed()
n = _harness.calls(2000)
way = sys.argv[2] if len(sys.argv) > 2 else 'predict'
if way == 'tf.keras':
    from tensorflow import keras
else:
    import keras
layers, K = keras.layers, keras.backend
model = keras.models.Sequential([
    layers.Dense(64, activation='relu', input_shape=(32,)),
    layers.Dense(64, activation='relu'),
    layers.Dense(10, activation='softmax')])
data = np.random.rand(n, 32).astype(np.float32)
rows = [np.array(data[i]) for i in range(n)]          # as if loaded one by one
if way == 'sess.run':
    sess = K.get_session()

    def predict(x):
        return sess.run(model.output, feed_dict={model.input: x})
elif way == 'K.function':
    f = K.function([model.input], [model.output])

    def predict(x):
        return f([x])[0]
else:
    predict = model.predict


def loop():
    out = []
    for x in rows:
        y = predict(np.expand_dims(x, 0))
        out.append(y[0])
    return np.array(out)


_harness.run(loop)
