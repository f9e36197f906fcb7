"""Scenarios for tests/test_autobatch.py: each is run plainly (``python``) and under
``python -m keras_fastpredict --auto-batch``, and what it produced is compared.

    python autobatch_script.py OUT.pkl SCENARIO [SCENARIO...]

Writes a pickle: scenario -> what it produced (arrays, exception type and message, the
place an exception was raised), plus '<scenario>:deferred', the calls auto-batch deferred
for it (0 when plain), and '<scenario>:sites', what the report says of its sites.
"""
import atexit
import os
import pickle
import sys
import threading

import numpy as np

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
import tensorflow as tf  # noqa: E402

tf.compat.v1.logging.set_verbosity(tf.compat.v1.logging.ERROR)
import keras  # noqa: E402
from keras import layers  # noqa: E402

N = 200                     # calls per loop: auto-batch starts after the sample (64)


def dense(seed=0, n_in=16):
    np.random.seed(seed)
    return keras.models.Sequential([layers.Dense(32, activation='relu', input_shape=(n_in,)),
                                    layers.Dense(8)])


def rows(n=N, seed=1, n_in=16):
    data = np.random.RandomState(seed).rand(n, n_in).astype('float32')
    return [np.array(r) for r in data]          # fresh arrays, as if loaded one by one


def deferred_calls(model):
    import keras_fastpredict
    if not keras_fastpredict.is_patched():
        return 0
    return keras_fastpredict.stats(model)['deferred']


# -- results kept -----------------------------------------------------------------------

def in_list():
    model = dense()
    out = []
    for x in rows():
        out.append(model.predict(x[None]))
    return model, {'concatenate': np.concatenate(out), 'stack': np.stack(out),
                   'array': np.array(out), 'sum': sum(float(y.sum()) for y in out)}


def in_dict():
    model = dense()
    out = {}
    for i, x in enumerate(rows()):
        out['row%d' % i] = model.predict(x[None])
    return model, {k: np.asarray(v) for k, v in sorted(out.items())}


def from_generator():
    model = dense()

    def scores(data):
        for x in data:
            yield model.predict(x[None])
    return model, np.concatenate(list(scores(rows())))


def returned_then_weights_change():
    # Results returned from a function, still pending when it returns: the weights change
    # (set_weights) before they are read. Plain Keras computed them at the calls.
    model = dense()

    def score(data):
        return [model.predict(x[None]) for x in data]
    results = score(rows())
    model.set_weights([w * 2 for w in model.get_weights()])
    after = model.predict(rows(4)[0][None])
    return model, {'results': np.concatenate(results), 'after': np.asarray(after)}


def original_predict(model, x):
    # Plain Keras' predict whatever the patch state (a training step's numbers differ
    # between plain and patched processes: the answer is taken in the same process).
    # As conftest.plain_twin: the original predict on a shallow twin of the model whose
    # predict function is called through Function's original __call__ (called on the model,
    # Keras' predict function inside would be served by our K.function adapter).
    from keras.backend.tensorflow_backend import Function
    from keras.engine.training import Model
    predict, call = Model.__dict__['predict'], Function.__dict__['__call__']
    predict, call = getattr(predict, '__wrapped__', predict), getattr(call, '__wrapped__', call)
    model._make_predict_function()
    function = model.predict_function
    twin = object.__new__(type(model))
    twin.__dict__.update(model.__dict__)
    twin.predict_function = lambda inputs: call(function, inputs)
    twin._make_predict_function = lambda: None
    try:
        return predict(twin, x)
    finally:
        twin.__dict__.clear()       # (as conftest.on_plain_twin: never found as the model)


def returned_then_trained():
    model = dense()
    model.compile('sgd', 'mse')
    data = rows()

    def score(data):
        return [model.predict(x[None]) for x in data]
    results = score(data)
    want = original_predict(model, np.array(data))
    model.train_on_batch(np.ones((4, 16), 'float32'), np.ones((4, 8), 'float32'))
    return model, {'got': np.concatenate(results), 'want': want}


def pickled():
    model = dense()
    out = [model.predict(x[None]) for x in rows()]
    return model, np.concatenate(pickle.loads(pickle.dumps(out)))


def saved(tmp):
    model = dense()
    out = []
    for x in rows():
        out.append(model.predict(x[None]))
    path = os.path.join(tmp, 'one.npy')
    np.save(path, out[-1])
    np.save(os.path.join(tmp, 'all.npy'), np.array(out))
    return model, {'one': np.load(path), 'all': np.load(os.path.join(tmp, 'all.npy'))}


def every_tenth():
    model = dense()
    out, seen = [], []
    for i, x in enumerate(rows(400)):
        y = model.predict(x[None])
        out.append(y)
        if i % 10 == 9:
            seen.append(float(y[0, 0]))
    return model, {'out': np.concatenate(out), 'seen': np.array(seen)}


def threads():
    model = dense()
    model._make_predict_function()
    got = {}

    graph = tf.compat.v1.get_default_graph()
    # Plain Keras 2.2.5's predict is not thread-safe (a thread may fail with IndexError,
    # or break the model's graph for the others): plainly, the threads take turns.
    import contextlib
    import keras_fastpredict
    turns = contextlib.suppress() if keras_fastpredict.is_patched() else threading.Lock()

    def work(t):
        out = []
        with graph.as_default():        # (plain Keras 2.2.5 needs it in a new thread)
            for x in rows(seed=10 + t):
                with turns:
                    out.append(model.predict(x[None]))
        got[t] = np.concatenate(out)
    ts = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    return model, {'got': {str(t): got[t] for t in sorted(got)},
                   'want': {str(t): original_predict(model, np.array(rows(seed=10 + t)))
                            for t in range(4)}}


def in_callback():
    model = dense()
    model.compile('sgd', 'mse')
    data = rows(100)
    seen, want = [], []

    class Watch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            out = []
            for x in data:
                out.append(self.model.predict(x[None]))
            seen.append(out)
            want.append(original_predict(self.model, np.array(data)))
    X = np.random.RandomState(3).rand(64, 16).astype('float32')
    Y = np.random.RandomState(4).rand(64, 8).astype('float32')
    model.fit(X, Y, epochs=3, batch_size=16, verbose=0, callbacks=[Watch()], shuffle=False)
    return model, {'got': np.concatenate([np.concatenate(out) for out in seen]),
                   'want': np.concatenate(want)}


def library_call():
    # predict_proba calls predict from Keras' own code: the call is Keras', not the site's.
    model = dense()
    out = [model.predict_proba(x[None], verbose=0) for x in rows()]
    return model, np.concatenate(out)


def use_at_once():
    model = dense()
    total = []
    for x in rows():
        y = model.predict(x[None])
        total.append(float(y.sum()))
    return model, np.array(total)


def collect_then_feedback():
    # One line: collect first (auto-batched after the sample), then each result feeds the
    # next input (read at once: lone flushes, back to the fast path).
    model = dense(n_in=8)
    data = rows(n_in=8)
    out, x = [], data[0][None]
    for i in range(300):
        y = model.predict(x if i >= 150 else data[i % len(data)][None])
        if i < 150:
            out.append(y)
        else:
            x = np.tanh(y)
            out.append(x.copy())
    return model, np.concatenate(out)


def asarray_reads():
    # np.asarray(y) of the result itself is not seen by the sample's watch: taken for a
    # collect loop, then each deferred call is read at once (lone flushes): back it goes.
    model = dense()
    out = []
    for x in rows(300):
        y = np.asarray(model.predict(x[None]))
        out.append(float(y.sum()))
    return model, np.array(out)


def bad_input():
    model = dense()
    out = []
    for x in rows():
        out.append(model.predict(x[None]))
    found = {}
    try:
        model.predict(np.ones((1, 5), 'float32'))
    except Exception as exc:
        found['wrong shape'] = (type(exc).__name__, str(exc))
    try:
        model.predict(np.ones((1, 16), 'float32'), batch_size=0)
    except Exception as exc:
        found['batch_size 0'] = (type(exc).__name__, str(exc))
    found['before'] = np.concatenate(out)
    return model, found


def run_error():
    # A run error (an index out of range in a gather): plain Keras raises it at the call;
    # a deferred call raises it where its result is first used (deferral's one
    # documented difference). The other calls' results are the same.
    np.random.seed(0)
    model = keras.models.Sequential([layers.Embedding(10, 4, input_length=3),
                                     layers.Flatten(), layers.Dense(2)])
    data = np.random.RandomState(2).randint(0, 10, size=(N, 3)).astype('int32')
    out, found = [], {}
    for i, x in enumerate(data):
        x = np.array(x[None])
        if i == N - 5:
            x[0, 1] = 99
        try:
            out.append(model.predict(x))
        except Exception as exc:
            found['at call'] = (type(exc).__name__, str(exc).split('\n')[0])
            out.append(None)
    for i, y in enumerate(out):
        if y is None:
            continue
        try:
            float(y.sum())
        except Exception as exc:
            found['at use'] = (type(exc).__name__, str(exc).split('\n')[0])
            out[i] = None
    found['kept'] = np.concatenate([y for y in out if y is not None])
    return model, found


def stateful_rnn():
    np.random.seed(0)
    model = keras.models.Sequential([
        layers.LSTM(4, stateful=True, batch_input_shape=(1, 3, 2)), layers.Dense(2)])
    data = np.random.RandomState(5).rand(N, 3, 2).astype('float32')
    out = [model.predict(np.array(x[None])) for x in data]
    return model, np.concatenate(out)


def batchnorm_training_phase():
    # Built in the training phase: BatchNormalization normalises over the batch, rows mix.
    keras.backend.set_learning_phase(1)
    np.random.seed(0)
    model = keras.models.Sequential([layers.Dense(8, input_shape=(16,)),
                                     layers.BatchNormalization(), layers.Dense(3)])
    out = [model.predict(x[None]) for x in rows()]
    return model, np.concatenate(out)


def forked():
    # Results pending at a fork are read in the child (which cannot run a session).
    model = dense()
    out = [model.predict(x[None]) for x in rows()]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.write(w, pickle.dumps(np.concatenate(out)))
        os._exit(0)
    os.close(w)
    data = b''
    while True:
        chunk = os.read(r, 1 << 16)
        if not chunk:
            break
        data += chunk
    os.waitpid(pid, 0)
    return model, pickle.loads(data)


SCENARIOS = {f.__name__: f for f in (
    in_list, in_dict, from_generator, returned_then_weights_change, returned_then_trained,
    pickled, saved, every_tenth, threads, in_callback, library_call, use_at_once,
    collect_then_feedback, asarray_reads, bad_input, run_error, stateful_rnn,
    batchnorm_training_phase, forked)}


def sites_of(model):
    import keras_fastpredict
    if not keras_fastpredict.is_patched():
        return []
    return [s.get('auto_batch') for s in keras_fastpredict.report()['sites']
            if s['model'] == model.name]


def main():
    out_path, names = sys.argv[1], sys.argv[2:]
    results = {}
    import keras_fastpredict
    for name in names:
        if keras_fastpredict.is_patched():
            keras_fastpredict.reset_stats()     # (each scenario's own sites and counts)
        fn = SCENARIOS[name]
        model, value = fn(os.path.dirname(out_path)) if name == 'saved' else fn()
        results[name] = value
        results[name + ':deferred'] = deferred_calls(model)
        results[name + ':sites'] = sites_of(model)
        keras.backend.clear_session()
    with open(out_path, 'wb') as f:
        pickle.dump(results, f)


def exits_pending(code):
    """A script that ends with calls pending: by sys.exit, by an exception, and with its
    results saved by an atexit handler."""
    model = dense()
    out = [model.predict(x[None]) for x in rows()]
    atexit.register(lambda: np.save(sys.argv[2], np.concatenate(out)))
    if code == 'raise':
        raise KeyError('pending at the raise')
    sys.exit(int(code))


if __name__ == '__main__':
    if sys.argv[1] == 'exit':
        exits_pending(sys.argv[3])
    main()
