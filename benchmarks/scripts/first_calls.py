"""Where a fresh process's first calls go: a one-row loop on fresh rows, Dense(64)x2, with
TensorFlow's C entry points, Keras' one-time steps and the engine's timed (perf_counter
around each; the same wrappers plain and under the runner). Arguments: the way in
(``predict``, ``sess.run``, ``K.function``, or ``collect``: predict, each result kept and
concatenated after the loop) and the loop length. Writes, to ``KFP_BENCH_OUT`` (JSON), each
call's time and each phase's time and count after the first call, the second and the
loop. Run by ``benchmarks.first_call``."""
import collections
import json
import os
import sys
import time

import numpy as np

import _harness

_harness.seed()
way = sys.argv[1] if len(sys.argv) > 1 else 'predict'
n = int(sys.argv[2]) if len(sys.argv) > 2 else 100
spent = collections.defaultdict(float)
counts = collections.Counter()


def timed(owner, name, label):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - start
            counts[label] += 1
    setattr(owner, name, wrapper)


from tensorflow.python import pywrap_tensorflow  # noqa: E402

for name, label in [('TF_NewSessionRef', 'TF: session made'),
                    ('ExtendSession', 'TF: graph sent to the session'),
                    ('TF_SessionRun_wrapper', 'TF: Session.run runs (executors made)'),
                    ('TF_SessionMakeCallable', 'TF: callables made (executors)'),
                    ('TF_SessionRunCallable', 'TF: callable runs')]:
    timed(pywrap_tensorflow, name, label)
import keras  # noqa: E402
from keras.backend import tensorflow_backend  # noqa: E402
from keras.engine import training  # noqa: E402

timed(tensorflow_backend, 'get_session', "Keras: get_session (session, variables' init)")
keras.backend.get_session = tensorflow_backend.get_session
timed(training.Model, '_make_predict_function', 'Keras: _make_predict_function')
timed(training.Model, '_standardize_user_data', 'Keras: _standardize_user_data')
if 'keras_fastpredict' in sys.modules:      # under the runner
    from keras_fastpredict.adapters import model_path
    from keras_fastpredict.engine import batch_safety, compiled, warmup
    timed(compiled.CompiledModel, '__init__', 'ours: model entry (its callable included)')
    timed(batch_safety, 'analyse', 'ours: graph analysis')
    timed(model_path, 'model_of', 'ours: model found for the call')
    timed(warmup, '_prepare', "ours: multi-row kernels' product prepared")

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
spent.clear()
counts.clear()
times, out, after = [], [], {}
for i, x in enumerate(rows):
    start = time.perf_counter()
    y = predict(np.expand_dims(x, 0))
    times.append(time.perf_counter() - start)
    out.append(y if way == 'collect' else y[0])
    if i < 2:
        after['call %d' % (i + 1)] = (dict(spent), dict(counts))
result = np.concatenate(out) if way == 'collect' else np.array(out)
after['loop'] = (dict(spent), dict(counts))
with open(os.environ.get('KFP_BENCH_OUT', os.devnull), 'w') as f:
    json.dump({'times': times, 'after': after, 'checksum': float(result.sum())}, f)
