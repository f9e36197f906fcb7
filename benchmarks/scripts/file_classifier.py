"""Classify images one file at a time, as a folder-scoring script does: load, scale,
``np.expand_dims``, predict, argmax."""
import os
import shutil
import tempfile

import numpy as np
from keras import layers, models

import _harness

_harness.seed()
n = _harness.calls(300)
model = models.Sequential([
    layers.Conv2D(16, 3, activation='relu', input_shape=(48, 48, 3)),
    layers.MaxPooling2D(),
    layers.Conv2D(32, 3, activation='relu'),
    layers.MaxPooling2D(),
    layers.Flatten(),
    layers.Dense(64, activation='relu'),
    layers.Dense(10, activation='softmax')])
folder = tempfile.mkdtemp()
for i in range(n):
    np.save(os.path.join(folder, '%05d.npy' % i),
            np.random.randint(0, 256, (48, 48, 3), dtype=np.uint8))


def loop():
    labels, probs = [], []
    for name in sorted(os.listdir(folder)):
        img = np.load(os.path.join(folder, name)).astype('float32') / 255.
        p = model.predict(np.expand_dims(img, axis=0))
        labels.append(int(np.argmax(p)))
        probs.append(p[0])
    return np.array(labels), np.array(probs)


try:
    _harness.run(loop)
finally:
    shutil.rmtree(folder)
