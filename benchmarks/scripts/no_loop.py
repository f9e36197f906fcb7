"""No loop at all: import Keras and build a model. What the runner adds to a process."""
from keras import layers, models

import _harness

model = models.Sequential([layers.Dense(64, activation='relu', input_shape=(32,)),
                           layers.Dense(10, activation='softmax')])
_harness.run(lambda: [])
