"""A collect loop: one row per call on fresh arrays, Dense(64)x2, each result kept and
used after the loop (``np.concatenate``). The first-pass driver runs it plainly and under
``--auto-batch``. The script also times, after its loop, the hand-batched ``predict(X)``
of the same rows (written to ``KFP_BENCH_OUT`` as ``hand_s``)."""
import os
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


_harness.run(loop)
