import os
import warnings

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
warnings.filterwarnings('ignore', category=FutureWarning)
warnings.filterwarnings('ignore', category=DeprecationWarning)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.compat.v1.logging.set_verbosity(tf.compat.v1.logging.ERROR)

import keras  # noqa: E402
from keras import layers  # noqa: E402
from keras.engine import training  # noqa: E402

import keras_fastpredict as kfp  # noqa: E402
from keras_fastpredict.config import settings  # noqa: E402
from keras_fastpredict.engine.verification import within_tolerance  # noqa: E402

from keras.backend import tensorflow_backend  # noqa: E402

# The original methods, captured before any test patches them.
ORIGINAL = {name: training.Model.__dict__[name] for name in ('predict', 'predict_on_batch')}
ORIGINAL_CALL = tensorflow_backend.Function.__dict__['__call__']     # K.function's
RTOL, ATOL = 1e-5, 1e-6


class _PlainFunction(object):
    """A model's own predict function called as unpatched Keras calls it: its class's
    original ``__call__`` (the patched one would serve the call through our engine)."""

    def __init__(self, function, original_call):
        self._function = function
        self._call = original_call

    def __call__(self, inputs):
        return self._call(self._function, inputs)

    def __getattr__(self, name):
        return getattr(self._function, name)


def plain_twin(model, original_call):
    """A shallow copy of ``model`` (its layers, weights and graph shared) whose predict
    function is the model's own, called through ``original_call``: the original predict
    and predict_on_batch run on it are plain Keras whatever the patch state, and other
    threads' calls of ``model`` (patched or not) are left as they are."""
    if not model.built:
        # Plain predict builds the model it is given (a twin would be built alone).
        assert not kfp.is_patched(), 'a plain reference while patched needs a built model'
        return model
    # (Not copy.copy: Keras 2.2.5's models copy by pickling, a new model and graph.)
    twin = object.__new__(type(model))
    twin.__dict__.update(model.__dict__)

    def make_predict_function():
        model._make_predict_function()          # (on the model, as plain Keras would)
        object.__setattr__(twin, 'predict_function',
                           _PlainFunction(model.predict_function, original_call))
    # Instance attributes of the twin only (object's setattr: tf.keras' tracking of
    # attributes would count them in the dict the twin shares with the model).
    object.__setattr__(twin, '_make_predict_function', make_predict_function)
    return twin


def on_plain_twin(method, model, original_call, *args, **kwargs):
    """``method`` (an original) run on ``model``'s plain twin. The twin is emptied after:
    it shares the model's tensors, and the engine's heap scan for the model a
    ``Session.run`` or ``K.function`` call belongs to (models made before patching) would
    find the twin instead while it lives (its closure keeps it until a collection)."""
    twin = plain_twin(model, original_call)
    try:
        return method(twin, *args, **kwargs)
    finally:
        if twin is not model:
            twin.__dict__.clear()


def counting_embedding_model(embeddings_initializer='uniform'):
    """On a graph of its own: a model with an op that counts its runs (the variable
    ``runs``) before an Embedding, which fails in TF's run on an index out of range (10
    rows). Returns (graph, counter, model)."""
    graph = tf.Graph()
    with graph.as_default():
        counter = tf.compat.v1.Variable(0, name='runs')

        def counted(t):
            with tf.control_dependencies([tf.compat.v1.assign_add(counter, 1)]):
                return tf.identity(t)
        inp = layers.Input((3,), dtype='int32')
        model = keras.models.Model(inp, layers.Flatten()(layers.Embedding(
            10, 2, embeddings_initializer=embeddings_initializer)(layers.Lambda(counted)(inp))))
    return graph, counter, model


def unpatched_predict(model, x, **kwargs):
    """Plain Keras' answer, whatever the patch state."""
    return on_plain_twin(ORIGINAL['predict'], model, ORIGINAL_CALL, x, **kwargs)


def unpatched_predict_on_batch(model, x):
    return on_plain_twin(ORIGINAL['predict_on_batch'], model, ORIGINAL_CALL, x)


def assert_same(actual, expected):
    if isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_same(a, e)
        return
    assert isinstance(actual, np.ndarray)
    actual = np.asarray(actual)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    # The promise (docs/same-result.md): per row, within RTOL of the row's largest magnitude
    # (+ ATOL).
    if not within_tolerance(actual, expected, RTOL, ATOL):
        np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def overlapping_blocks(block_a, block_b, in_a=None, in_b=None):
    """Thread a enters ``block_a()`` (a context manager); thread b enters ``block_b()``
    while a is inside; a runs ``in_a()`` and leaves first, then b runs ``in_b()`` still
    inside its block, and leaves. Returns (in_a's result, in_b's result); raises the first
    exception either thread raised."""
    import threading
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    got, errors = [None, None], []

    def a():
        try:
            with block_a():
                a_in.set()
                assert b_in.wait(10)
                got[0] = in_a() if in_a is not None else None
        except BaseException as exc:
            errors.append(exc)
        a_out.set()

    def b():
        try:
            assert a_in.wait(10)
            with block_b():
                b_in.set()
                assert a_out.wait(10)
                got[1] = in_b() if in_b is not None else None
        except BaseException as exc:
            errors.append(exc)
    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]
    return got


def run_in_threads(n, work):
    """``work(t)`` for t in range(n), each in its own thread, all started before any is
    joined; returns the exceptions they raised."""
    import threading
    errors = []

    def guarded(t):
        try:
            work(t)
        except Exception as exc:  # noqa: BLE001 - collected for the caller to assert on
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return errors


def raised(fn, *args, **kwargs):
    """(exception type, message) raised by fn, or None."""
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the point is to compare any exception
        return type(exc), str(exc)
    return None


def build_models(keras=keras, layers=layers):
    """The model pool, of either flavour (``keras``, or ``tf.keras`` and its layers)."""
    np.random.seed(0)
    dense = keras.models.Sequential([
        layers.Dense(64, activation='relu', input_shape=(32,)),
        layers.Dense(64, activation='relu'),
        layers.Dense(10, activation='softmax')])
    conv = keras.models.Sequential([
        layers.Conv2D(8, 3, activation='relu', input_shape=(16, 16, 3)),
        layers.MaxPooling2D(),
        layers.Flatten(),
        layers.Dense(5)])
    lstm = keras.models.Sequential([
        layers.LSTM(12, input_shape=(7, 4)),
        layers.Dense(3)])
    a = layers.Input((6,), name='a')
    b = layers.Input((4,), name='b')
    joined = layers.concatenate([layers.Dense(8)(a), layers.Dense(8)(b)])
    multi_in = keras.models.Model([a, b], layers.Dense(2)(joined))
    c = layers.Input((5,), name='c')
    hidden = layers.Dense(16, activation='tanh')(c)
    multi_out = keras.models.Model(c, [layers.Dense(3, name='o1')(hidden),
                                       layers.Dense(1, name='o2')(hidden)])
    dropout = keras.models.Sequential([
        layers.Dense(16, input_shape=(8,)), layers.Dropout(0.5), layers.Dense(2)])
    return {'dense': dense, 'conv': conv, 'lstm': lstm, 'multi_in': multi_in,
            'multi_out': multi_out, 'dropout': dropout}


def inputs_for(name, rows, seed=1):
    rng = np.random.RandomState(seed)
    shapes = {'dense': [(32,)], 'conv': [(16, 16, 3)], 'lstm': [(7, 4)],
              'multi_in': [(6,), (4,)], 'multi_out': [(5,)], 'dropout': [(8,)]}[name]
    arrays = [rng.rand(rows, *s).astype('float32') for s in shapes]
    return arrays if len(arrays) > 1 else arrays[0]


@pytest.fixture(scope='session')
def models():
    return FLAVOURS['keras'].models


# -- Both Keras flavours: Keras 2.2.5 and tf.keras (TensorFlow 1.15, graph mode) ---------------

from tensorflow.python.keras import backend as tf_backend  # noqa: E402
from tensorflow.python.keras.engine import training as tf_training  # noqa: E402

TF_ORIGINAL = {name: tf_training.Model.__dict__[name] for name in ('predict', 'predict_on_batch')}
TF_ORIGINAL_CALL = tf_backend.GraphExecutionFunction.__dict__['__call__']


class Flavour(object):
    """One Keras flavour: its modules, its original methods and its model pool."""

    def __init__(self, name, keras_module, original, original_call):
        self.name = name
        self.keras = keras_module
        self.layers = keras_module.layers
        self.backend = keras_module.backend
        self.original = original
        self.original_call = original_call
        self._models = None

    @property
    def models(self):
        if self._models is None:
            self._models = build_models(self.keras, self.layers)
        return self._models

    def unpatched_predict(self, model, x, **kwargs):
        """Plain Keras' answer, whatever the patch state."""
        return on_plain_twin(self.original['predict'], model, self.original_call, x,
                             **kwargs)

    def unpatched_predict_on_batch(self, model, x):
        return on_plain_twin(self.original['predict_on_batch'], model, self.original_call, x)

    def __repr__(self):
        return self.name


FLAVOURS = {'keras': Flavour('keras', keras, ORIGINAL, ORIGINAL_CALL),
            'tf.keras': Flavour('tf.keras', tf.keras, TF_ORIGINAL, TF_ORIGINAL_CALL)}


@pytest.fixture(scope='session', params=sorted(FLAVOURS))
def flavour(request):
    return FLAVOURS[request.param]


@pytest.fixture(autouse=True, scope='session')
def _kernels_warm():
    """Read-ahead opens no window while TF's multi-row kernels are still being generated
    (engine.warmup, on a thread of its own): tests that count windows start after it."""
    from keras_fastpredict.engine import warmup
    warmup.start()
    assert warmup.done.wait(60)


@pytest.fixture(autouse=True)
def _restore():
    """Every test starts and ends unpatched, with default settings and fresh counters."""
    kfp.unpatch()
    settings.reset()
    kfp.reset_stats()
    yield
    kfp.unpatch()
    settings.reset()
    assert training.Model.__dict__['predict'] is ORIGINAL['predict']
    assert tf_training.Model.__dict__['predict'] is TF_ORIGINAL['predict']
    assert tensorflow_backend.Function.__dict__['__call__'] is ORIGINAL_CALL
    assert tf_backend.GraphExecutionFunction.__dict__['__call__'] is TF_ORIGINAL_CALL
