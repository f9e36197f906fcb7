"""Cases for TensorFlow 1 loops that never call ``predict`` (issue 11): ``Session.run`` and
``K.function`` once per sample, as legacy code writes them.

* ``mlp64/sess-run``: ``sess.run(model.output, {model.input: X[i][None]})`` per row, on
  Keras' session (``K.get_session()``), the results collected.
* ``mlp64/k-function``: ``f = K.function([model.input], [model.output])``, ``f([X[i][None]])``.
* ``mlp64/k-function-layer``: feature extraction, ``K.function([input, K.learning_phase()],
  [hidden layer])`` on fresh one-row copies with the phase fed 0 (no model's outputs:
  the cached callable, no read-ahead).
* ``detector/sess-run``: a small conv net with two outputs (boxes, scores), one image per
  call, ``sess.run([boxes, scores], {input: img[None], K.learning_phase(): 0})``.
* ``mlp64_session/sess-run``: the Dense(64)x2 model in its own graph and a ``tf.Session``
  the script made, the loop under ``with sess.as_default():`` (so Keras uses it), and a
  variant where Keras is never told of the session (the cached callable alone).
"""
import numpy as np

from .cases import Case, Variant, join, raw_callable, row
from . import models

FULL = {
    'mlp64': {'sess-run': 2000, 'k-function': 2000, 'k-function-layer': 2000},
    'detector': {'sess-run': 500},
    'mlp64_session': {'sess-run': 2000},
}
QUICK = 48


def _detector():
    from keras import layers, models as keras_models
    image = layers.Input((32, 32, 3), name='image')
    h = layers.Conv2D(16, 3, activation='relu')(image)
    h = layers.MaxPooling2D()(h)
    h = layers.Conv2D(32, 3, activation='relu')(h)
    h = layers.MaxPooling2D()(h)
    h = layers.Dropout(0.25)(layers.Flatten()(h))
    boxes = layers.Dense(4, name='boxes')(h)
    scores = layers.Dense(10, activation='softmax', name='scores')(h)
    return keras_models.Model(image, [boxes, scores], name='detector')


def per_row(run, X, n):
    """One call per row of one array, in order (``X[i][None]``); results collected."""
    return join([run(X[i][None]) for i in range(n)])


class TF1Case(Case):
    """A case whose loop calls ``Session.run`` or ``K.function`` (never ``predict``)."""

    @property
    def variants(self):
        return self._variants

    @variants.setter
    def variants(self, value):
        # Released with the variants (benchmarks.__main__ drops them while TF is whole).
        self._variants = value
        if value is None:
            self._warm = None

    def setup(self):
        import tensorflow as tf
        from keras import backend as K
        n = self.rows
        if self.model_name == 'mlp64_session':
            self.variants = self._user_session(tf, K, n)
            return
        if self.model_name == 'detector':
            if 'detector' not in models._built:
                np.random.seed(0)
                tf.compat.v1.set_random_seed(0)
                models._built['detector'] = _detector()
        model = self.model = models.get(self.model_name)
        X = models.data(model, n)
        sess = K.get_session()
        loop = self.loop if self.model_name == 'mlp64' else 'two-outputs'
        self.variants = getattr(self, '_' + loop.replace('-', '_'))(model, X, n, sess, K)

    def warm(self, model=None):
        # The first call of a signature goes to the original, the second builds the
        # cached callable: once per process in real use. (``model``: these cases' variants
        # all run the case's own.)
        self._warm()
        self._warm()

    def _sess_run(self, model, X, n, sess, K):
        self._warm = lambda: sess.run(model.output, {model.input: X[0][None]})

        def loop():     # as the issue writes it: the model's attributes on every call
            return per_row(lambda x: sess.run(model.output, {model.input: x}), X, n)
        raw = raw_callable(model, row(X, 0))
        return [
            Variant('unpatched sess.run', 'unpatched', loop, None),
            Variant('raw callable, whole array', 'limit',
                    lambda: [raw(X[:n])], None),
            Variant('patched, readahead off (cached callable)', 'patched', loop,
                    {'readahead': False}),
            Variant('patched (read-ahead)', 'patched', loop, {}),
        ]

    def _k_function(self, model, X, n, sess, K):
        f = K.function([model.input], [model.output])
        self._warm = lambda: f([X[0][None]])

        def loop():
            return per_row(lambda x: f([x])[0], X, n)
        return [
            Variant('unpatched K.function', 'unpatched', loop, None),
            Variant('patched, readahead off (cached callable)', 'patched', loop,
                    {'readahead': False}),
            Variant('patched (read-ahead)', 'patched', loop, {}),
        ]

    def _k_function_layer(self, model, X, n, sess, K):
        f = K.function([model.input, K.learning_phase()], [model.layers[1].output])
        self._warm = lambda: f([X[0][None].copy(), 0])

        def loop():
            return per_row(lambda x: f([x.copy(), 0])[0], X, n)
        return [
            Variant('unpatched K.function', 'unpatched', loop, None),
            Variant('patched (cached callable)', 'patched', loop, {}),
        ]

    def _two_outputs(self, model, X, n, sess, K):
        boxes, scores = model.outputs
        inp, phase = model.input, K.learning_phase()
        self._warm = lambda: sess.run([boxes, scores], {inp: X[0][None], phase: 0})

        def loop():     # boxes, scores = sess.run([...], {...}) per image
            return per_row(lambda img: sess.run([boxes, scores], {inp: img, phase: 0}), X, n)
        raw = raw_callable(model, row(X, 0))
        return [
            Variant('unpatched sess.run', 'unpatched', loop, None),
            Variant('raw callable, whole array', 'limit', lambda: raw(X[:n]), None),
            Variant('patched, readahead off (cached callable)', 'patched', loop,
                    {'readahead': False}),
            Variant('patched (read-ahead)', 'patched', loop, {}),
        ]

    def _user_session(self, tf, K, n):
        graph = tf.Graph()
        sess = tf.compat.v1.Session(graph=graph)
        with graph.as_default():
            np.random.seed(0)
            tf.compat.v1.set_random_seed(0)
            model = models.BUILDERS['mlp64']()
            init = tf.compat.v1.global_variables_initializer()
        sess.run(init)
        self.model = model
        X = models.data(model, n)
        out, inp = model.output, model.input

        def warm():
            with sess.as_default():
                sess.run(out, {inp: X[0][None]})
        self._warm = warm

        def loop():
            with sess.as_default():           # as `with tf.Session() as sess:` does
                return per_row(lambda x: sess.run(out, {inp: x}), X, n)

        def unknown_to_keras():
            return per_row(lambda x: sess.run(out, {inp: x}), X, n)
        return [
            Variant('unpatched sess.run', 'unpatched', loop, None),
            Variant('patched, session unknown to Keras (cached callable)', 'patched',
                    unknown_to_keras, {}),
            Variant('patched (read-ahead)', 'patched', loop, {}),
        ]


def all_cases(quick=False):
    return [TF1Case(model_name, loop, QUICK if quick else n)
            for model_name, loops in FULL.items() for loop, n in loops.items()]
