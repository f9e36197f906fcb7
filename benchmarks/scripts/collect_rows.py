"""A collect loop: one row per call on fresh arrays, Dense(64)x2, each result kept and
used after the loop (``np.concatenate``). The first-pass driver runs it plainly and under
``--auto-batch``. After the loop's passes the script times the hand-batched
``predict(X)`` of the same rows (saved as ``extra_hand_s``). With ``hand`` after the loop
length, the loop is that rewrite itself (``predict(np.stack(rows))``, Keras' batches of
32 as in the seed's second example), timed as the script's loop: its first pass pays
plain Keras' one-time work as the collect loop's does."""
import sys
import time

import numpy as np

import _harness

_harness.seed()
n = _harness.calls(3000)
import keras  # noqa: E402

layers = keras.layers
model = keras.models.Sequential([
    layers.Dense(64, activation='relu', input_shape=(32,)),
    layers.Dense(64, activation='relu'),
    layers.Dense(10, activation='softmax')])
data = np.random.rand(n, 32).astype(np.float32)
rows = [np.array(data[i]) for i in range(n)]          # as if loaded one by one


def loop():
    out = []
    for x in rows:
        out.append(model.predict(np.expand_dims(x, 0)))
    return np.concatenate(out)


def hand_loop():
    return model.predict(np.stack(rows))


def hand_batched():
    # The same rows hand-batched, as a user who rewrote the loop would: one predict(X)
    # after the loop's passes (warm), timed 3 times, the median.
    X = np.stack(rows)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        model.predict(X)
        times.append(time.perf_counter() - start)
    return {'hand_s': sorted(times)[1]}


if sys.argv[2:] == ['hand']:
    _harness.run(hand_loop)
else:
    _harness.run(loop, hand_batched)
