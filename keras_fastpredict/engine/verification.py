"""Verification: batching a model the graph could not settle, only after checking it.

Until then its calls run unbatched, exactly as Keras runs them. From those calls the
verifier keeps rows that differ from each other in every input position (equal rows
would hide an op that mixes rows, such as subtracting the batch mean) with their outputs;
once it has enough it runs them as one batch and compares. A call of many rows is checked
at once: a sample of its rows is run alone and compared with the batched result. Rows
from before a weight change are dropped. This is a check on a sample: the graph analysis
decides every model it can, and verification covers only what it cannot (while loops,
py_func, unmodelled ops).

The tolerance is the one the project promises for every patched result: per row of each
output, ``|patched - plain| <= RTOL * max|plain row| + ATOL`` (float outputs; others
exactly), since float sums differ in their last digits with batch composition
(keras#13328) and scale with the size of the values.
"""
import threading
import warnings

import numpy as np

from . import hooks
from ..config import settings

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
    """The relative tolerance ``actual`` needed: the largest ``|actual - expected|``
    beyond ATOL, over the largest magnitude in its row of ``expected`` (0 where within
    ATOL; inf where shapes, non-finite values or non-float values differ). What the
    benchmarks report against the promised RTOL."""
    parts = _rows_apart(actual, expected)
    if parts is None or parts is True or parts is False:
        return 0.0 if parts else float('inf')
    diff, scale = parts
    excess = np.maximum(diff - ATOL, 0.0)
    with np.errstate(divide='ignore', invalid='ignore'):
        needed = np.where(excess > 0, excess / scale, 0.0)
    return float(needed.max(initial=0.0))


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


# Rows that differ from each other are not enough: an op may mix rows through one input
# position only (dividing by the batch's largest first feature), so the sample must vary
# in every input position. Rows are kept only when they add variation (a few suffice);
# after this many distinct rows, positions that never varied are taken as constant in the
# data. Until then the model stays unbatched.
_SEEN_ENOUGH = 256
_MAX_KEPT = 32


class _Samples(object):
    """Distinct one-row inputs (one array per feed), chosen to vary in every position."""
    __slots__ = ('generation', 'keys', 'inputs', 'outputs', 'constant', 'seen')

    def __init__(self):
        self.generation = hooks.state.generation
        self.keys = set()
        self.inputs = []       # per sample: list of one-row arrays, one per feed
        self.outputs = []      # per sample: list of one-row outputs (or None)
        self.constant = None   # per feed: positions equal in every sample so far
        self.seen = 0          # distinct rows looked at

    def offer(self, rows, outputs=None):
        """Keep ``rows`` (one-row arrays) if they are new and add variation."""
        key = b''.join(a.tobytes() for a in rows)
        if key in self.keys:
            return False
        self.keys.add(key)
        self.seen += 1
        if self.constant is None:
            self.constant = [np.ones(a.shape, bool) for a in rows]
        else:
            differs = [a != first for a, first in zip(rows, self.inputs[0])]
            adds = any((d & c).any() for d, c in zip(differs, self.constant))
            if not adds and len(self.inputs) >= max(2, settings.verify_rows):
                return False
            for d, c in zip(differs, self.constant):
                c &= ~d
        self.inputs.append([a.copy() for a in rows])
        self.outputs.append(outputs)
        return True

    def ready(self):
        if len(self.inputs) < max(2, settings.verify_rows):
            return False
        varied = not any(c.any() for c in self.constant)
        return varied or self.seen >= _SEEN_ENOUGH or len(self.inputs) >= _MAX_KEPT


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
        if samples.offer(arrays, [o.copy() for o in outs]) and samples.ready():
            batch = [np.concatenate(parts) for parts in zip(*samples.inputs)]
            alone = [np.concatenate(parts) for parts in zip(*samples.outputs)]
            entry.verification = None
            _decide(entry, entry.call(batch), alone)


def _check_call(entry, arrays, outs):
    """A call of several rows: run a sample of its rows alone and compare."""
    samples = _Samples()
    picked = []
    for i in range(min(arrays[0].shape[0], 4 * _SEEN_ENOUGH)):
        if samples.offer([a[i:i + 1] for a in arrays]):
            picked.append(i)
            if samples.ready():
                break
    if not samples.ready():
        return                  # too little variation to prove anything: decide later
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
