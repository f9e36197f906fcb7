"""The main job: a legacy per-sample predict loop, unpatched and then patched.

    python examples/legacy_loop.py [--rows N]

The loop is the kind found in deployed code (one row per call, results collected), on a
model built in code (no downloads). It runs once on plain Keras 2.2.5 and once under
``keras_fastpredict.patched()``, in this process, and prints the time per call, the
speed-up and the largest difference between the two runs' outputs.
"""
import argparse
import os
import time
import warnings

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
warnings.filterwarnings('ignore')

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.compat.v1.logging.set_verbosity(tf.compat.v1.logging.ERROR)

import keras  # noqa: E402
from keras import layers  # noqa: E402

import keras_fastpredict  # noqa: E402
from keras_fastpredict.engine.verification import scaled_difference, within_tolerance  # noqa: E402


def build_model():
    np.random.seed(0)
    model = keras.models.Sequential([
        layers.Dense(64, activation='relu', input_shape=(32,)),
        layers.Dense(64, activation='relu'),
        layers.Dense(10, activation='softmax')])
    model.compile('adam', 'categorical_crossentropy')
    return model


def legacy_loop(model, data):
    """Untouched legacy code: one sample per predict call."""
    predictions = []
    for x in data:
        y = model.predict(np.expand_dims(x, 0))
        predictions.append(y)
    return np.concatenate(predictions)


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rows', type=int, default=3000)
    args = parser.parse_args(argv)

    model = build_model()
    data = np.random.RandomState(1).rand(args.rows, 32).astype('float32')
    legacy_loop(model, data[:50])                      # warm up both sides alike

    # Under the runner (python -m keras_fastpredict) Keras is patched already: take the
    # baseline unpatched all the same, then restore the runner's patch.
    was_patched = keras_fastpredict.is_patched()
    keras_fastpredict.unpatch()
    plain, t_plain = timed(legacy_loop, model, data)
    if was_patched:
        keras_fastpredict.patch()
    with keras_fastpredict.patched():
        legacy_loop(model, data[:50])
        keras_fastpredict.reset_stats()
        fast, t_fast = timed(legacy_loop, model, data)
        deferred_fn = keras_fastpredict.fast_predict(legacy_loop)
        batched, t_batched = timed(deferred_fn, model, data)
        stats = keras_fastpredict.stats(model)

    per_call = 1e6 / args.rows
    diff = max(scaled_difference(fast, plain), scaled_difference(batched, plain))
    same = within_tolerance(fast, plain) and within_tolerance(batched, plain)
    print('legacy loop: %d x model.predict(np.expand_dims(x, 0)) on Dense(64)-Dense(64)-Dense(10)'
          % args.rows)
    print('  unpatched Keras 2.2.5            %8.1f us per call' % (t_plain * per_call))
    print('  keras_fastpredict.patch()        %8.1f us per call   speed-up %5.1fx'
          % (t_fast * per_call, t_plain / t_fast))
    print('  patch() + @fast_predict (batched)%8.1f us per call   speed-up %5.1fx'
          % (t_batched * per_call, t_plain / t_batched))
    print('  largest difference from unpatched outputs: %.3g of the row\'s largest value'
          '  (within the promised 1e-5: %s)' % (diff, 'yes' if same else 'NO'))
    print('  what was sped up: %d calls on the fast path: %d served from %d read-ahead '
          'windows, %d deferred and run in %d batch(es); %d left to Keras'
          % (stats['fast_calls'], stats['readahead_hits'], stats['readahead_windows'],
             stats['deferred'], stats['deferred_batches'], stats['fallbacks']))
    return 0 if same else 1


if __name__ == '__main__':
    raise SystemExit(main())
