"""Dispatch: the wrappers behind the patched predict methods.

Each call either takes the fast path (the cached callable, with deferral, read-ahead or
concurrent batching on top for models whose rows are independent) or goes to the original
Keras method untouched. Everything the fast path does not handle exactly is left to
Keras: unusual arguments, inputs Keras' own validation rejects (so the same exception is
raised), stateful models, outputs whose rows are not the input's rows.
"""
import threading
import warnings

import numpy as np

from . import callables, concurrent_batcher, deferred, readahead, verification
from . import counters as _stats
from .config import settings

_local = threading.local()       # .keras_default: batch_size=32 came from Keras, not the user
_ndarray = np.ndarray


def _bind_predict(x, batch_size=None, verbose=0, steps=None, callbacks=None,
                  max_queue_size=10, workers=1, use_multiprocessing=False):
    return x, batch_size, verbose, steps, callbacks


def predict(wrapped, instance, args, kwargs):
    """Wrapper of ``Model.predict``."""
    if len(args) == 1 and not kwargs:
        return _predict(wrapped, instance, args, kwargs, args[0], None)
    try:
        x, batch_size, verbose, steps, callbacks = _bind_predict(*args, **kwargs)
    except TypeError:
        return wrapped(*args, **kwargs)
    if verbose or steps is not None or callbacks is not None:
        return _fallback(wrapped, instance, args, kwargs, 'verbose, steps or callbacks')
    if batch_size is not None:
        if type(batch_size) is not int or batch_size < 1:
            return _fallback(wrapped, instance, args, kwargs, 'batch_size')
        if batch_size == 32 and getattr(_local, 'keras_default', False):
            batch_size = None
    return _predict(wrapped, instance, args, kwargs, x, batch_size)


def predict_on_batch(wrapped, instance, args, kwargs):
    """Wrapper of ``Model.predict_on_batch``: the whole input in one run, as Keras does."""
    if len(args) != 1 or kwargs:
        return wrapped(*args, **kwargs)
    return _predict(wrapped, instance, args, kwargs, args[0], 0)


def keras_default_batch_size(wrapped, instance, args, kwargs):
    """Wrapper of ``Sequential.predict_proba`` and ``predict_classes``: they pass their own
    default ``batch_size=32`` to predict; when the caller gave none, predict may choose."""
    if len(args) > 1 or 'batch_size' in kwargs:
        return wrapped(*args, **kwargs)
    _local.keras_default = True
    try:
        return wrapped(*args, **kwargs)
    finally:
        _local.keras_default = False


def _fallback(wrapped, model, args, kwargs, reason):
    stats = _stats.for_model(model)
    stats.calls += 1
    stats.fallback(reason)
    outputs = getattr(model, 'outputs', None)
    if not outputs:
        return wrapped(*args, **kwargs)
    # Any thread can predict: Keras builds its predict function in the thread's default
    # graph, which in a new thread may be another (keras#2397), and not thread-safely
    # (keras#6124); so it is built once under a lock and Keras runs on the model's graph.
    # Only where Keras' session is on the model's graph: elsewhere plain Keras fails, and
    # so must this call, in the same way.
    graph = outputs[0].graph
    session = callables.current_session()
    if session is None or session.graph is not graph:
        return wrapped(*args, **kwargs)
    if getattr(model, 'built', False):
        callables.ensure_predict_function(model, graph)
    if callables.default_graph() is graph:
        return wrapped(*args, **kwargs)
    with graph.as_default():
        return wrapped(*args, **kwargs)



def _plain_arrays(x):
    """Deferred results resolved, and memory-mapped arrays (datasets too big to load, as
    Keras treats them) viewed as plain ndarrays, in lists, tuples and dicts too."""
    kind = type(x)
    if kind is np.memmap:
        return x.view(_ndarray)
    if kind is list or kind is tuple:
        return kind(_plain_arrays(v) for v in x)
    if kind is dict:
        return {k: _plain_arrays(v) for k, v in x.items()}
    return deferred.resolve(x)


def _predict(wrapped, model, args, kwargs, x, batch_size):
    """``batch_size``: None lets the fast path choose, 0 means all rows in one run."""
    entry = callables.lookup(model)
    if entry.refused:
        return _fallback(wrapped, model, args, kwargs, entry.reason)
    if type(x) is not _ndarray:
        x = _plain_arrays(x)
    arrays = entry.prepare(x)
    if arrays is None:
        return _fallback(wrapped, model, args, kwargs, 'input Keras handles itself')
    rows = arrays[0].shape[0]
    if rows == 0:
        return _fallback(wrapped, model, args, kwargs, 'empty input')
    if entry.static_batch is not None or entry.stateful:
        batch_size = _keras_batch_size(entry, rows, batch_size)
        if batch_size is None:
            return _fallback(wrapped, model, args, kwargs, 'Keras raises for this batch size')
    stats = entry.stats
    stats.calls += 1
    stats.fast_calls += 1
    try:
        outs = _route(entry, x, arrays, rows, batch_size)
    except callables.OpError:        # TensorFlow's run failed (not our own errors)
        if not entry.rerun_on_error:
            raise
        stats.fast_calls -= 1
        stats.calls -= 1
        return _fallback(wrapped, model, args, kwargs, 'the run failed: Keras raises')
    return outs[0] if entry.n_outputs == 1 else outs


def _warn_not_batched(entry):
    # Once per model: batching was asked for, and this model's calls run one by one.
    entry.warned = True
    warnings.warn('keras_fastpredict: model %r is not batched: %s'
                  % (entry.stats.name, entry.batching_reason), RuntimeWarning, stacklevel=5)


def _keras_batch_size(entry, rows, batch_size):
    """The batch size Keras' predict runs a fixed-batch or stateful model in (0 for
    predict_on_batch: all rows), or None where Keras raises instead (Keras 2.2.5
    ``_validate_or_infer_batch_size`` and ``predict``)."""
    if batch_size == 0:
        return 0
    if batch_size is None and getattr(_local, 'keras_default', False):
        batch_size = 32              # predict_classes/predict_proba pass it to Keras
    static = entry.static_batch
    if static is not None:
        if batch_size is not None and batch_size != static:
            return None
        batch_size = static
    batch_size = batch_size or 32
    if entry.stateful and rows > batch_size and rows % batch_size:
        return None
    return batch_size


def _route(entry, x, arrays, rows, batch_size):
    """``batch_size``: None lets the fast path choose, 0 is ``predict_on_batch``."""
    safe = entry.batch_safe
    if safe is not True or entry.excluded:
        if safe is False and not entry.warned and (settings.defer or deferred.current()):
            _warn_not_batched(entry)
        # Unbatched, as Keras runs it; a model not yet verified learns from the call.
        outs = entry.run(arrays, batch_size, on_batch=batch_size == 0)
        if safe is None:
            verification.observe(entry, arrays, outs)
        return outs
    scope = deferred.current()
    if scope is None and settings.defer:
        scope = deferred.implicit_scope()
    readahead_on = settings.readahead
    if scope is not None and scope.readahead is not None:
        readahead_on = scope.readahead
    # Read-ahead first: where a loop walks an array it batches as well as deferral does,
    # and gives back plain arrays. It looks at the caller's arrays, before any cast.
    if readahead_on and rows == 1:
        if type(x) is _ndarray:
            # A row that is no view of a larger array cannot be read ahead.
            outs = None if x.base is None else readahead.serve(entry, [x],
                                                               settings.readahead_max)
        elif type(x) is dict:
            outs = readahead.serve(entry, [x[name] for name in entry.feed_names],
                                   settings.readahead_max)
        else:
            outs = readahead.serve(entry, x, settings.readahead_max)
        if outs is not None:
            return outs
    if scope is not None and rows < scope.max_batch_size and scope.wants(entry):
        return scope.defer(entry, arrays, rows)
    batch_size = batch_size or (rows if batch_size == 0 else None)
    if settings.concurrent:
        return concurrent_batcher.submit(entry, arrays, rows, batch_size)
    return entry.run(arrays, batch_size)
