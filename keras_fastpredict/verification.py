"""Verification: batching a model the graph could not settle, only after checking it.

Until then its calls run unbatched, exactly as Keras runs them. From those calls the
verifier keeps rows that differ from each other (equal rows would hide an op that mixes
rows, such as subtracting the batch mean) with their outputs; once it has
``settings.verify_rows`` of them it runs them as one batch and compares. A call of many
rows is checked at once: some of its distinct rows are run alone and compared with the
batched result. Rows from before a weight change are dropped.

The tolerance is the one the project promises for every patched result: per row of each
output, ``|patched - plain| <= RTOL * max|plain row| + ATOL`` (float outputs; others
exactly), since float sums differ in their last digits with batch composition
(keras#13328) and scale with the size of the values.
"""
import threading
import warnings

import numpy as np

from . import hooks
from .config import settings

RTOL = 1e-5
ATOL = 1e-6
_lock = threading.Lock()


def within_tolerance(actual, expected, rtol=RTOL, atol=ATOL):
    """True when ``actual`` equals ``expected`` within the promised tolerance."""
    parts = _rows_apart(actual, expected)
    if parts is None or parts is True or parts is False:
        return bool(parts)
    diff, scale = parts
    return bool((diff <= rtol * scale + atol).all())


def scaled_difference(actual, expected):
    """The largest ``|actual - expected|`` over the largest magnitude in its row of
    ``expected`` (0 for equal arrays, inf where shapes, non-finite values or non-float
    values differ): what the benchmarks report against the promised RTOL."""
    parts = _rows_apart(actual, expected)
    if parts is None or parts is True or parts is False:
        return 0.0 if parts else float('inf')
    diff, scale = parts
    return float((diff / np.maximum(scale, np.finfo(np.float64).tiny)).max(initial=0.0))


def _rows_apart(actual, expected):
    """Per-element |a - e| and per-row scale, or a verdict (bool) where that is moot."""
    a = np.asarray(actual)
    e = np.asarray(expected)
    if a.shape != e.shape:
        return False
    if e.dtype.kind not in 'fc' or e.size == 0:
        return bool(np.array_equal(a, e))
    a = a.reshape(len(a), -1) if a.ndim > 1 else a.reshape(-1, 1)
    e = e.reshape(len(e), -1) if e.ndim > 1 else e.reshape(-1, 1)
    finite = np.isfinite(e)
    if not np.array_equal(np.isfinite(a), finite) or not np.array_equal(
            np.isnan(a), np.isnan(e)) or not np.array_equal(a[np.isinf(e)], e[np.isinf(e)]):
        return False
    e = np.where(finite, e, 0).astype(np.float64)
    a = np.where(finite, a, 0).astype(np.float64)
    return np.abs(a - e), np.abs(e).max(axis=1, keepdims=True)


class _Samples(object):
    __slots__ = ('generation', 'keys', 'inputs', 'outputs')

    def __init__(self):
        self.generation = hooks.state.generation
        self.keys = set()
        self.inputs = []       # per sample: list of one-row arrays, one per feed
        self.outputs = []      # per sample: list of one-row outputs


def observe(entry, arrays, outs):
    """Learn from an unbatched run of ``arrays`` (the model's feeds) that gave ``outs``."""
    rows = arrays[0].shape[0]
    with _lock:
        if entry.batch_safe is not None:
            return
        if rows > 1:
            _check_call(entry, arrays, outs)
            return
        samples = entry.verification
        if samples is None or samples.generation != hooks.state.generation:
            samples = entry.verification = _Samples()
        key = b''.join(a.tobytes() for a in arrays)
        if key in samples.keys:
            return
        samples.keys.add(key)
        samples.inputs.append([a.copy() for a in arrays])
        samples.outputs.append([o.copy() for o in outs])
        if len(samples.inputs) >= max(2, settings.verify_rows):
            batch = [np.concatenate(parts) for parts in zip(*samples.inputs)]
            alone = [np.concatenate(parts) for parts in zip(*samples.outputs)]
            entry.verification = None
            _decide(entry, entry.call(batch), alone)


def _check_call(entry, arrays, outs):
    """A call of several rows: run some of its distinct rows alone and compare."""
    picked, keys = [], set()
    for i in range(min(arrays[0].shape[0], 64)):
        key = b''.join(a[i].tobytes() for a in arrays)
        if key not in keys:
            keys.add(key)
            picked.append(i)
            if len(picked) == max(2, settings.verify_rows):
                break
    if len(picked) < 2:
        return                  # equal rows prove nothing: decide on a later call
    alone = [entry.call([a[i:i + 1] for a in arrays]) for i in picked]
    alone = [np.concatenate(parts) for parts in zip(*alone)]
    _decide(entry, [o[picked] for o in outs], alone)


def _decide(entry, batched, alone):
    same = all(b.shape == a.shape and within_tolerance(b, a) for b, a in zip(batched, alone))
    entry.batch_safe = same
    if same:
        entry.stats.verified += 1
        entry.batching_reason = 'verified on distinct rows'
    else:
        entry.batching_reason = ('batched and one-by-one results differ on distinct rows '
                                 '(beyond the promised tolerance)')
        warnings.warn('keras_fastpredict: model %r is not batched: %s'
                      % (entry.stats.name, entry.batching_reason), RuntimeWarning,
                      stacklevel=4)
