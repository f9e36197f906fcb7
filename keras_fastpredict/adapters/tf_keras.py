"""The adapter for ``tf.keras`` on TensorFlow 1.15 (``tensorflow.python.keras``), graph mode.

``KerasAdapter`` does the work; this names where ``tf.keras`` keeps its classes and backend,
and what it does differently from Keras 2.2.5:

* its session is per thread (``backend._SESSION.session``), and is replaced by a new one
  whenever it is not on the caller's default graph (``get_session``): the session
  ``tf.keras`` would use is found the same way, without making one;
* its predict function feeds no learning phase (a ``placeholder_with_default(False)``);
* ``predict`` validates input with ``_standardize_user_data(x, check_steps=True, ...)``,
  and puts a single batch's outputs together without a copy, raising when an output has
  not the input's number of rows (``SliceAggregator``);
* what it runs elsewhere goes to ``tf.keras`` untouched: eager execution, ``run_eagerly``,
  functions run eagerly, distribution strategies, ``dynamic`` layers, the v2 loop
  (``experimental_run_tf_function`` under eager), datasets, iterators, generators and
  ``Sequence`` inputs, symbolic or composite (ragged, sparse) tensors.
"""
import numpy as np

from ..engine import compiled
from .keras import KerasAdapter

_ndarray = np.ndarray
_CONTAINERS = (list, tuple, dict)


class TfKerasAdapter(KerasAdapter):
    """``tf.keras`` (TensorFlow 1.15's ``tensorflow.python.keras``)."""

    rescue_new_threads = False        # tf.keras has a session per thread: its own rules
    name = 'tf.keras'
    training = 'tensorflow.python.keras.engine.training'
    sequential = 'tensorflow.python.keras.engine.sequential'
    backend = 'tensorflow.python.keras.backend'
    network = 'tensorflow.python.keras.engine.network'
    training_utils = 'tensorflow.python.keras.engine.training_utils'

    def bind(self):
        from tensorflow.python.eager import context, def_function
        from tensorflow.python.keras import backend as K
        self.K = K
        self.tfb = K
        self._executing_eagerly = context.executing_eagerly
        self._def_function = def_function     # RUN_FUNCTIONS_EAGERLY: run_eagerly for all
        self._bind_tf()

    def current_session(self):
        """The session ``tf.keras`` would use now (``backend._get_session``): the default
        session, else this thread's ``tf.keras`` session if it is on the default graph;
        None where ``tf.keras`` would make a new one."""
        if self.tfb is None:
            self.bind()
        session = self._default_session()
        if session is not None:
            return session
        session = getattr(self.tfb._SESSION, 'session', None)
        if session is not None and session.graph is self.default_graph():
            return session
        return None

    def layer_classes(self):
        from tensorflow.python.keras.engine.base_layer import Layer
        from tensorflow.python.keras.layers.recurrent import RNN
        return Layer, RNN

    def standardize(self, model, x):
        """tf.keras ``predict``'s own validation (``predict_on_batch`` validates the same
        way for arrays)."""
        model._standardize_user_data(x, check_steps=True, steps_name='steps', steps=None)

    @staticmethod
    def assemble(parts, spans, rows):
        """Outputs put together as tf.keras' ``SliceAggregator`` does: one batch is taken as
        it is, and raises if an output's rows are not the input's; several are assigned
        to their rows (broadcasting, or raising, as numpy does)."""
        if len(parts) == 1:
            for out in parts[0]:
                if out.shape[:1] != (rows,):
                    raise ValueError(
                        'Mismatch between expected batch size and model output batch size. '
                        'Output shape = {}, expected output shape = shape {}'.format(
                            out.shape, (rows,) + out.shape[1:]))
            return list(parts[0])
        return compiled.keras_assembled(parts, spans, rows)

    def entry_points(self):
        """Keras' model methods at tf.keras' places, and its backend function (which no
        K.function adapter owns for tf.keras)."""
        return KerasAdapter.entry_points(self) + (
            (self.backend, 'GraphExecutionFunction.__call__', self.backend_function),
        )

    # -- what tf.keras runs elsewhere --------------------------------------------------------

    def lookup(self, model):
        """As ``KerasAdapter.lookup``, after what is checked on every call because it is a
        state of the process or of the caller's context, not of the model (refusals for
        those are not cached): eager execution, functions run eagerly, a distribution
        strategy's scope."""
        if self.tfb is None:
            self.bind()
        if self._executing_eagerly():
            return compiled.Refusal(model, None, 'eager execution')
        if self._def_function.RUN_FUNCTIONS_EAGERLY:
            return compiled.Refusal(model, None, 'functions run eagerly')
        graph = self.default_graph()
        if graph._distribution_strategy_stack:
            return compiled.Refusal(model, None, 'distribution strategy scope')
        if not getattr(model, '_is_compiled', True) and getattr(model, 'optimizer', None):
            # Compiled, then changed (Sequential.pop): tf.keras' predict compiles it again
            # on this call, with a new predict function the next call's lookup finds.
            return compiled.Refusal(model, None, 'tf.keras recompiles it on this call')
        session = self._default_session()
        if session is None:
            session = getattr(self.tfb._SESSION, 'session', None)
            if session is not None and session.graph is not graph:
                session = None
        return self._cached(model, session) or self._build(model)

    def unsupported_reason(self, model):
        from tensorflow.python.framework import ops
        if getattr(model, '_distribution_strategy', None) is not None:
            return 'distribution strategy'
        if getattr(model, '_run_eagerly', None):
            return 'run_eagerly'
        if getattr(model, 'dynamic', False):
            return 'dynamic layers (run eagerly)'
        reason = super(TfKerasAdapter, self).unsupported_reason(model)
        if reason is not None:
            return reason
        if not all(isinstance(t, ops.Tensor) for t in list(model.inputs) + list(model.outputs)):
            return 'composite (ragged or sparse) inputs or outputs'
        try:
            model._check_call_args('predict')
        except Exception:
            return 'call() with more positional arguments (tf.keras raises)'
        return None

    # tf.keras' own loops may call predict_on_batch (run eagerly, say): within a call left
    # to tf.keras, such inner calls are tf.keras' own, not the user's (not counted either).
    def predict(self, wrapped, instance, args, kwargs):
        if getattr(self._local, 'inside', False):
            return wrapped(*args, **kwargs)
        return super(TfKerasAdapter, self).predict(wrapped, instance, args, kwargs)

    def predict_on_batch(self, wrapped, instance, args, kwargs):
        if getattr(self._local, 'inside', False):
            return wrapped(*args, **kwargs)
        return super(TfKerasAdapter, self).predict_on_batch(wrapped, instance, args, kwargs)

    def _fallback(self, wrapped, model, args, kwargs, reason):
        local = self._local
        local.inside = True
        try:
            return super(TfKerasAdapter, self)._fallback(wrapped, model, args, kwargs, reason)
        finally:
            local.inside = False

    def _predict(self, wrapped, model, args, kwargs, x, batch_size):
        kind = type(x)
        if kind is not _ndarray and kind not in _CONTAINERS:
            reason = _input_reason(x)
            if reason is not None:
                return self._fallback(wrapped, model, args, kwargs, reason)
        return super(TfKerasAdapter, self)._predict(wrapped, model, args, kwargs, x,
                                                    batch_size)


def _input_reason(x):
    """Why tf.keras takes another loop for input ``x`` (a dataset, say), or None."""
    from tensorflow.python.data.ops import dataset_ops, iterator_ops
    from tensorflow.python.framework import tensor_util
    from tensorflow.python.keras.utils import data_utils
    if isinstance(x, (dataset_ops.DatasetV1, dataset_ops.DatasetV2)):
        return 'tf.data dataset input'
    if isinstance(x, (iterator_ops.Iterator, iterator_ops.IteratorV2)):
        return 'tf.data iterator input'
    if data_utils.is_generator_or_sequence(x):
        return 'generator or Sequence input'
    if tensor_util.is_tensor(x):
        return 'symbolic tensor input'
    return None


adapter = TfKerasAdapter()
