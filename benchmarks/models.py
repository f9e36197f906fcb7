"""The benchmark models, built in code (no downloads), and their inputs.

All models live in Keras' default graph and session, as in a legacy script. Each is built
once per process, on first use, with fixed seeds.
"""
import numpy as np

_built = {}


def _mlp(name, features, width):
    from keras import layers, models
    return models.Sequential([
        layers.Dense(width, activation='relu', input_shape=(features,)),
        layers.Dense(width, activation='relu'),
        layers.Dense(10, activation='softmax')], name=name)


def _cnn():
    from keras import layers, models
    return models.Sequential([
        layers.Conv2D(16, 3, activation='relu', input_shape=(32, 32, 3)),
        layers.MaxPooling2D(),
        layers.Conv2D(32, 3, activation='relu'),
        layers.MaxPooling2D(),
        layers.Flatten(),
        layers.Dense(64, activation='relu'),
        layers.Dense(10, activation='softmax')], name='cnn')


def _mobilenet():
    from keras.applications.mobilenet import MobileNet
    return MobileNet(weights=None, input_shape=(128, 128, 3))


def _lstm():
    # 20 steps of 8 features -> the next step's 8 features (so it can run autoregressively).
    from keras import layers, models
    return models.Sequential([
        layers.LSTM(32, input_shape=(20, 8)),
        layers.Dense(8, activation='tanh')], name='lstm')


def _two_io():
    from keras import layers, models
    a = layers.Input((16,), name='a')
    b = layers.Input((8,), name='b')
    hidden = layers.Dense(64, activation='relu')(layers.concatenate([a, b]))
    return models.Model([a, b], [layers.Dense(10, activation='softmax', name='label')(hidden),
                                 layers.Dense(1, name='score')(hidden)], name='two_io')


BUILDERS = {
    'mlp64': lambda: _mlp('mlp64', 32, 64),          # Dense(64)-Dense(64)-Dense(10) on 32
    'mlp1024': lambda: _mlp('mlp1024', 256, 1024),
    'mlp2048': lambda: _mlp('mlp2048', 256, 2048),
    'cnn': _cnn,
    'mobilenet': _mobilenet,
    'lstm': _lstm,
    'two_io': _two_io,
}


def get(name):
    """The model called ``name``, built on first use."""
    if name not in _built:
        import tensorflow as tf
        np.random.seed(0)
        tf.compat.v1.set_random_seed(0)
        _built[name] = BUILDERS[name]()
    return _built[name]


def data(model, rows, seed=1):
    """Random float32 inputs: an array, or a list of arrays for a multi-input model."""
    rng = np.random.RandomState(seed)
    arrays = [rng.standard_normal((rows,) + tuple(shape[1:])).astype('float32')
              for shape in model._feed_input_shapes]
    return arrays[0] if len(arrays) == 1 else arrays


def next_input(name, x, y):
    """The autoregressive step: the next input built from the last input and output."""
    if name == 'mlp64':        # slide the 32 features along by the 10 outputs
        return np.concatenate([x[:, 10:], y], axis=1)
    if name == 'lstm':         # drop the oldest step, append the predicted one
        return np.concatenate([x[:, 1:], y[:, None, :]], axis=1)
    raise KeyError(name)
