"""keras_fastpredict: fast legacy ``model.predict`` loops on Keras 2.2.5 / TensorFlow 1.15.

One line, results as plain Keras gives them (within float tolerance)::

    import keras_fastpredict
    keras_fastpredict.patch()                 # or: with keras_fastpredict.patched(): ...

or none: ``python -m keras_fastpredict script.py args...``.

Ways in, all over one engine (a cached session callable per model):

* ``patch()`` / ``unpatch()`` / ``patched()``: the fast path for ``Model.predict``,
  ``predict_on_batch``, ``Sequential.predict_proba`` and ``predict_classes``; read-ahead for
  loops over the rows of an array; batching of calls made from several threads at once.
* ``@fast_predict`` / ``batching()``: deferred results, run as batches.
* ``FastPredict()``: a Keras callback, for predictions made during ``fit``
  (``TfKerasFastPredict()`` for ``tf.keras``).

``tf.keras`` models (TensorFlow 1.15, graph mode) are served as Keras 2.2.5 models are.

Options (keyword arguments of ``patch``, or ``KERAS_FASTPREDICT_<NAME>`` for the runner)
are listed with their defaults in ``keras_fastpredict.config.DEFAULTS``.
"""
from . import counters as _stats
from .batching import batching, fast_predict
from .engine.compiled import clear as clear_cache
from .engine.compiled import exclude
from .engine.concurrent_batcher import PredictTimeoutError, QueueFullError
from .config import DEFAULTS
from .engine.pending import DeferredArray
from .patching import is_patched, patch, patched, unpatch
from .report import report   # the function: internal code imports from .report by name
from .processes import ForkedAfterSessionError   # also guards forks after a session

__version__ = '0.1.0'

__all__ = ['patch', 'unpatch', 'patched', 'is_patched', 'fast_predict', 'batching',
           'FastPredict', 'TfKerasFastPredict', 'exclude', 'clear_cache', 'stats',
           'reset_stats', 'DeferredArray',
           'QueueFullError', 'PredictTimeoutError', 'ForkedAfterSessionError', 'DEFAULTS',
           'report']


def stats(model=None):
    """Counters per model: calls, fast calls, fallbacks (with reasons), deferred calls and
    their batches, read-ahead hits, misses and windows, session runs serving several calls
    ('batches', mean size, histogram), verifications, queue wait and run times.

    ``stats()`` maps model names to counters (a name shared by several live models gets
    ``'`` marks); ``stats(model)`` gives that model's counters, and how the fast path
    serves it now: ``batched`` (True, False, or None while it is being checked), with
    ``batching_reason``, and the ``inference_graph`` state with the ops it added."""
    if model is not None:
        out = _stats.for_model(model).as_dict()
        from .engine import compiled
        entry = compiled.get(model)
        if entry is not None and not entry.refused:
            out.update(batched=entry.batch_safe, batching_reason=entry.batching_reason,
                       inference_graph=entry.inference_graph,
                       inference_graph_ops=entry.inference_graph_ops)
        return out
    return _stats.snapshot()


def reset_stats():
    _stats.reset()
    from .report import reset
    reset()


def __getattr__(name):
    # The callback imports keras; keep `import keras_fastpredict` free of that cost.
    if name in ('FastPredict', 'TfKerasFastPredict'):   # the latter for tf.keras' fit
        from . import callback
        return getattr(callback, name)
    raise AttributeError(name)
