"""A tf.keras LSTM forecaster with Dropout, as public time-series tutorials write it:
stream over overlapping windows of one 1-D series, then forecast autoregressively."""
import numpy as np
import tensorflow as tf

import _harness

W = 60
_harness.seed()
stream_calls = _harness.calls(500)
ahead_calls = stream_calls * 3 // 5

model = tf.keras.models.Sequential([
    tf.keras.layers.LSTM(50, return_sequences=True, input_shape=(W, 1)),
    tf.keras.layers.Dropout(0.2),
    tf.keras.layers.LSTM(50),
    tf.keras.layers.Dropout(0.2),
    tf.keras.layers.Dense(1),
])
model.compile(optimizer='adam', loss='mean_squared_error')
t = np.arange(W + stream_calls, dtype=np.float32)
series = np.sin(t / 10.0) + 0.1 * np.random.rand(len(t)).astype(np.float32)


def loop():
    streamed = []
    for i in range(W, W + stream_calls):
        window = series[i - W:i].reshape(1, W, 1)
        streamed.append(model.predict(window)[0, 0])
    frame = series[-W:].copy()
    forecast = []
    for _ in range(ahead_calls):
        y = model.predict(frame[np.newaxis, :, np.newaxis])[0, 0]
        forecast.append(y)
        frame = np.append(frame[1:], y)
    return np.array(streamed), np.array(forecast)


_harness.run(loop)
