"""The batching engine: runs many predict calls of one model as few session runs.

Every way in (deferred results, read-ahead, concurrent threads) hands its calls here;
each gets back exactly its own rows, or its own exception.
"""
import time

import numpy as np

from . import callables
from .config import settings


class Request(object):
    """One caller's predict call: its feed arrays, then its outputs or its error."""
    __slots__ = ('entry', 'arrays', 'rows', 'outputs', 'error', 'event', 'enqueued')

    def __init__(self, entry, arrays, rows):
        self.entry = entry
        self.arrays = arrays
        self.rows = rows
        self.outputs = None
        self.error = None
        self.event = None
        self.enqueued = 0.0


def verify(entry, arrays, outputs, pieces):
    """Decide once per model whether batching changes its results: the first ``pieces``
    ((start, stop) row ranges of separate calls) are run alone and compared with the
    batched ``outputs``. Returns True when batched results may be used."""
    if entry.batch_safe is not None:
        return entry.batch_safe
    for start, stop in pieces[:settings.verify_rows]:
        alone = entry.call([a[start:stop] for a in arrays])
        for batched, ref in zip(outputs, alone):
            if not np.allclose(batched[start:stop], ref, rtol=1e-5, atol=1e-6, equal_nan=True):
                entry.batch_safe = False
                callables.warn_unbatchable(
                    entry, 'its output for a row depends on the rest of the batch '
                    '(batched and one-by-one results differ beyond rtol 1e-5)')
                return False
    entry.batch_safe = True
    entry.stats.verified += 1
    return True


def run_merged(entry, arrays, pieces):
    """Run the rows of several calls as one batch. ``pieces`` holds each call's (start,
    stop) rows in ``arrays``; returns, per call, its list of outputs or its exception."""
    stats = entry.stats
    start_time = time.perf_counter()
    if len(pieces) == 1 or entry.batch_safe is False or entry.excluded:
        return [_alone(entry, arrays, lo, hi) for lo, hi in pieces]
    try:
        outs = entry.run(arrays, batch_size=max(entry.large_batch, settings.max_batch_size))
    except Exception:
        # Isolate the failure: only the calls whose own rows fail get an error.
        return [_alone(entry, arrays, lo, hi) for lo, hi in pieces]
    if entry.batch_safe is None and not verify(entry, arrays, outs, pieces):
        return [_alone(entry, arrays, lo, hi) for lo, hi in pieces]
    stats.batch(pieces[-1][1], len(pieces))
    stats.exec_s += time.perf_counter() - start_time
    if len(outs) == 1:
        out = outs[0]
        return [[out[lo:hi]] for lo, hi in pieces]
    return [[o[lo:hi] for o in outs] for lo, hi in pieces]


def _alone(entry, arrays, lo, hi):
    start_time = time.perf_counter()
    try:
        result = entry.run([a[lo:hi] for a in arrays])
    except Exception as exc:
        result = exc
    entry.stats.batch(hi - lo, 1)
    entry.stats.exec_s += time.perf_counter() - start_time
    return result


def run_requests(entry, requests):
    """Fill ``outputs`` or ``error`` of each request (calls from several threads)."""
    pieces = []
    offset = 0
    for req in requests:
        pieces.append((offset, offset + req.rows))
        offset += req.rows
    n_feeds = len(entry.feed_names)
    if len(requests) == 1:
        merged = requests[0].arrays
    elif not entry.fixed_rows and len({tuple(a.shape[1:] for a in r.arrays)
                                       for r in requests}) > 1:
        # Variable-length inputs of different lengths do not stack: run them apart.
        for req in requests:
            run_requests(entry, [req])
        return
    else:
        merged = [np.concatenate([r.arrays[i] for r in requests]) for i in range(n_feeds)]
    for req, result in zip(requests, run_merged(entry, merged, pieces)):
        if isinstance(result, Exception):
            req.error = result
        else:
            req.outputs = result
