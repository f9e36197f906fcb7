"""Routing: which way a fast-path call takes through the engine.

A model whose rows are not known to be independent runs unbatched, exactly as Keras
batches it (and, until the graph or a check settles it, teaches the verifier). Any other
call tries, in order: read-ahead (a one-row view of a larger array), deferral (inside a
batching scope or with ``defer=True``), the concurrent batcher (calls from several
threads), or a plain run. Every adapter hands its calls here.
"""
import os
import sys
import warnings

import numpy as np
import wrapt.wrappers

from . import concurrent_batcher
from ..config import settings
from . import deferred, readahead, verification, warmup

_ndarray = np.ndarray


_PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '')
# and wrapt's Python wrappers' (WRAPT_DISABLE_EXTENSIONS=1: its C ones add no frame)
_NOT_CALLERS = (_PACKAGE, wrapt.wrappers.__file__)


def _warn_not_batched(entry):
    # Once per model: batching was asked for, and this model's calls run one by one.
    # Shown at the caller's line: the first frame outside this package.
    entry.warned = True
    level, f = 2, sys._getframe(1)
    while f is not None and f.f_code.co_filename.startswith(_NOT_CALLERS):
        level, f = level + 1, f.f_back
    warnings.warn('keras_fastpredict: model %r is not batched: %s'
                  % (entry.stats.name, entry.batching_reason), RuntimeWarning,
                  stacklevel=level)


# A fast call whose TensorFlow run failed and changed nothing: the caller's original method
# answers instead (and raises its own error, in its own words).
RERUN = object()


def serve(entry, x, arrays, rows, batch_size):
    """One counted fast-path call, routed (see the module docs). ``batch_size``: None lets
    the fast path choose, 0 is ``predict_on_batch``. Returns the outputs, or RERUN (above);
    any other failure, or one of a model whose failed run may have changed state,
    propagates. (One function: it is on every call's path.)"""
    if entry.unroll_ready:          # one-time work that has paid for itself: done here,
        entry.build_inference_graph()   # at the top of a caller's own call
    stats = entry.stats
    stats.calls += 1
    stats.fast_calls += 1
    try:
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
        # Read-ahead first: where a loop walks an array it batches as well as deferral
        # does, and gives back plain arrays. It looks at the caller's arrays, before any
        # cast.
        if readahead_on and rows == 1:
            if type(x) is _ndarray:
                # A row that is no view of a larger array cannot be read ahead.
                outs = None if x.base is None else _readahead(entry, [x],
                                                               settings.readahead_max)
            elif type(x) is dict:
                outs = _readahead(entry, [x[name] for name in entry.feed_names],
                                  settings.readahead_max)
            else:
                outs = _readahead(entry, x, settings.readahead_max)
            if outs is not None:
                return outs
        if scope is not None and rows < scope.max_batch_size and scope.wants(entry):
            warmup.start()          # TF's multi-row kernels, made while calls queue up
            return scope.defer(entry, arrays, rows)
        batch_size = batch_size or (rows if batch_size == 0 else None)
        if settings.concurrent:
            batcher = entry.batcher
            if batcher is None:
                return concurrent_batcher.submit(entry, arrays, rows, batch_size)
            # Settled (concurrent_batcher.Batcher._review): the call runs as with
            # concurrent=False, with no call into the batcher (one thread measured 0.97x
            # of concurrent=False with it, in paired blocks).
            i = next(batcher.calls)
            if i < batcher.bypass_end:
                return entry.run(arrays, batch_size)
            return concurrent_batcher.submit(entry, arrays, rows, batch_size, i)
        return entry.run(arrays, batch_size)
    except entry.adapter.OpError:
        if not entry.rerun_on_error:
            raise
        stats.fast_calls -= 1
        stats.calls -= 1
        return RERUN


_readahead = readahead.serve
