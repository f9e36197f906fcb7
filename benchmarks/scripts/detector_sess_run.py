"""A per-image detector loop in TF1 style: a Keras conv net with two heads (boxes and
scores), run with ``sess.run([boxes, scores], feed_dict=...)`` one image at a time."""
import numpy as np
from keras import backend as K
from keras import layers, models

import _harness

_harness.seed()
n = _harness.calls(300)
image = layers.Input((64, 64, 3))
h = layers.Conv2D(16, 3, strides=2, activation='relu')(image)
h = layers.Conv2D(32, 3, strides=2, activation='relu')(h)
h = layers.GlobalAveragePooling2D()(h)
boxes = layers.Dense(4 * 8, name='boxes')(h)
scores = layers.Dense(8, activation='sigmoid', name='scores')(h)
model = models.Model(image, [boxes, scores])
sess = K.get_session()
images = [np.random.rand(64, 64, 3).astype(np.float32) for _ in range(n)]


def loop():
    found_boxes, found_scores = [], []
    for img in images:
        b, s = sess.run([boxes, scores], feed_dict={image: img[None]})
        found_boxes.append(b[0].reshape(8, 4))
        found_scores.append(s[0] * (s[0] > 0.5))
    return np.array(found_boxes), np.array(found_scores)


_harness.run(loop)
