"""Character generation as Keras' examples/lstm_text_generation.py writes it: each step
one-hot encodes the last 40 characters into a fresh float64 array, predicts, and picks
the next character from the result (greedily here, so that plain and patched runs pick
the same characters)."""
import numpy as np
from keras import layers, models

import _harness

MAXLEN, CHARS = 40, 57
_harness.seed()
steps = _harness.calls(1600)
model = models.Sequential([layers.LSTM(128, input_shape=(MAXLEN, CHARS)),
                           layers.Dense(CHARS, activation='softmax')])
model.compile(loss='categorical_crossentropy', optimizer='rmsprop')
seed_text = list(np.random.randint(0, CHARS, MAXLEN))


def loop():
    sentence = list(seed_text)
    generated, odds = [], []
    for i in range(steps):
        x_pred = np.zeros((1, MAXLEN, CHARS))
        for t, char in enumerate(sentence):
            x_pred[0, t, char] = 1.
        preds = model.predict(x_pred, verbose=0)[0]
        next_index = int(np.argmax(preds))
        generated.append(next_index)
        odds.append(preds)
        sentence = sentence[1:] + [next_index]
    return np.array(generated), np.array(odds)


_harness.run(loop)
