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


def _char_rnn():
    # Character generation: 40 one-hot characters of 50 -> the next character's odds.
    from keras import layers, models
    return models.Sequential([
        layers.LSTM(128, input_shape=(40, 50)),
        layers.Dense(50, activation='softmax')], name='char_rnn')


def _seq2seq_decoder():
    # The decoder of a seq2seq model, one step per call: [token, h, c] -> [odds, h, c]
    # (the Keras blog's inference loop).
    from keras import layers, models
    token = layers.Input((1, 40), name='token')
    h = layers.Input((128,), name='h')
    c = layers.Input((128,), name='c')
    out, h2, c2 = layers.LSTM(128, return_state=True, return_sequences=True)(
        token, initial_state=[h, c])
    odds = layers.Dense(40, activation='softmax')(out)
    return models.Model([token, h, c], [odds, h2, c2], name='seq2seq_decoder')


def _stateful_lstm():
    # Online prediction: one step at a time, the state carried by the layer.
    from keras import layers, models
    return models.Sequential([
        layers.LSTM(32, stateful=True, batch_input_shape=(1, 1, 8)),
        layers.Dense(8)], name='stateful_lstm')


def _subclassed():
    # A subclassed model: Keras serves it (the fast path needs a graph network).
    import keras

    class Scorer(keras.Model):
        def __init__(self):
            super(Scorer, self).__init__(name='subclassed')
            self.hidden = keras.layers.Dense(64, activation='relu')
            self.out = keras.layers.Dense(10, activation='softmax')

        def call(self, inputs):
            return self.out(self.hidden(inputs))

    model = Scorer()
    model.predict(np.zeros((1, 32), 'float32'))       # builds it
    model._feed_input_shapes = [(None, 32)]           # for data() below
    return model


def _tf_keras_mlp(name, features, width):
    """The same MLP in tf.keras (TensorFlow 1.15's own Keras, graph mode)."""
    from tensorflow.python.keras import layers, models
    return models.Sequential([
        layers.Dense(width, activation='relu', input_shape=(features,)),
        layers.Dense(width, activation='relu'),
        layers.Dense(10, activation='softmax')], name=name)


def is_tf_keras(model):
    from tensorflow.python.keras.engine.training import Model
    return isinstance(model, Model)


BUILDERS = {
    'mlp64': lambda: _mlp('mlp64', 32, 64),          # Dense(64)-Dense(64)-Dense(10) on 32
    'tfk_dense64': lambda: _tf_keras_mlp('tfk_dense64', 32, 64),   # the same in tf.keras
    'mlp64_verbose': lambda: _mlp('mlp64_verbose', 32, 64),   # the same, predict(verbose=1)
    'mlp1024': lambda: _mlp('mlp1024', 256, 1024),
    'mlp2048': lambda: _mlp('mlp2048', 256, 2048),
    'cnn': _cnn,
    'mobilenet': _mobilenet,
    'lstm': _lstm,
    'two_io': _two_io,
    'char_rnn': _char_rnn,
    'seq2seq': _seq2seq_decoder,
    'stateful_lstm': _stateful_lstm,
    'subclassed': _subclassed,
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
    if name in ('mlp64', 'tfk_dense64'):     # slide the 32 features along by the 10 outputs
        return np.concatenate([x[:, 10:], y], axis=1)
    if name == 'lstm':         # drop the oldest step, append the predicted one
        return np.concatenate([x[:, 1:], y[:, None, :]], axis=1)
    if name == 'char_rnn':     # append the likeliest character, one-hot
        return np.concatenate([x[:, 1:], np.eye(50, dtype=x.dtype)[None, y.argmax(-1)]], axis=1)
    if name == 'seq2seq':      # the likeliest token, one-hot, and the new state
        odds, h, c = y
        token = np.eye(40, dtype=odds.dtype)[odds[:, -1].argmax(-1)][:, None, :]
        return [token, h, c]
    raise KeyError(name)
