"""python -m benchmarks.window_cost [--repeats N]

What a read-ahead window of recurrent rows costs against the same rows one at a time
(issue 20, item 3): the sliding-window forecaster of ``scripts/sliding_window_forecast.py``
(tf.keras, two LSTM(50) over 60 steps, Dropout), its rows the overlapping windows of one
1-D series. Times one session run of N rows on the model's own graph, per row, for N of
1 (the fast path alone), 8, 32, 84 (the window the issue saw) and 256; the median of
``--repeats`` runs, interleaved.
"""
import argparse
import os
import sys
import time

import numpy as np

W = 60


def main(argv=None):
    parser = argparse.ArgumentParser(prog='python -m benchmarks.window_cost',
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--repeats', type=int, default=15)
    args = parser.parse_args(argv)
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    import tensorflow as tf
    import keras_fastpredict as kfp
    from keras_fastpredict.adapters import tf_keras
    model = tf.keras.models.Sequential([
        tf.keras.layers.LSTM(50, return_sequences=True, input_shape=(W, 1)),
        tf.keras.layers.Dropout(0.2),
        tf.keras.layers.LSTM(50),
        tf.keras.layers.Dropout(0.2),
        tf.keras.layers.Dense(1)])
    series = np.sin(np.arange(W + 300, dtype=np.float32) / 10.0)
    windows = np.lib.stride_tricks.as_strided(series, (300, W, 1), (4, 4, 4))
    kfp.patch(inference_graph=False)
    model.predict(np.array(windows[:1]))
    entry = tf_keras.adapter.lookup(model)
    sizes = (1, 8, 32, 84, 256)
    times = {n: [] for n in sizes}
    batches = {n: [np.array(windows[:n])] for n in sizes}
    for n in sizes:
        entry.call(batches[n])                  # first run of each size: not timed
    for _ in range(args.repeats):
        for n in sizes:
            start = time.perf_counter()
            entry.call(batches[n])
            times[n].append((time.perf_counter() - start) / n)
    one = np.median(times[1])
    print('rows per run   ms per row   against one row per run')
    for n in sizes:
        per_row = np.median(times[n])
        print('%12d %12.3f %12.2fx' % (n, 1e3 * per_row, one / per_row))
    kfp.unpatch()
    return 0


if __name__ == '__main__':
    sys.exit(main())
