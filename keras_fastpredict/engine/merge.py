"""The batching engine: runs many predict calls of one model as few session runs.

Every way in (deferred results, read-ahead, concurrent threads) hands its calls here;
each gets back exactly its own rows, in arrays of its own (as plain Keras returns a fresh
array per call), or its own exception. Only models whose rows are known to be independent
(``entry.batch_safe is True``) are merged.
"""
import time

import numpy as np

from ..config import settings


class Request(object):
    """One caller's predict call: its feed arrays, then its outputs or its error. The
    concurrent batcher's bookkeeping rides along: the caller's batch_size, its wake-up
    lock, when it queued, whether it was chosen to lead a batch, when it was woken."""
    __slots__ = ('entry', 'arrays', 'rows', 'outputs', 'error', 'event', 'enqueued',
                 'batch_size', 'lead', 'released')

    def __init__(self, entry, arrays, rows):
        self.entry = entry
        self.arrays = arrays
        self.rows = rows
        self.outputs = None
        self.error = None
        self.event = None
        self.enqueued = 0.0
        self.batch_size = None
        self.lead = False
        self.released = 0.0


def run_merged(entry, arrays, pieces):
    """Run the rows of several calls as one batch. ``pieces`` holds each call's (start,
    stop) rows in ``arrays``; returns, per call, its list of outputs or its exception."""
    stats = entry.stats
    start_time = time.perf_counter()
    if len(pieces) == 1 or entry.batch_safe is not True or entry.excluded:
        return [_alone(entry, arrays, lo, hi) for lo, hi in pieces]
    try:
        outs = entry.run(arrays, batch_size=max(entry.large_batch, settings.max_batch_size))
    except Exception:
        # Isolate the failure: only the calls whose own rows fail get an error.
        return [_alone(entry, arrays, lo, hi) for lo, hi in pieces]
    stats.batch(pieces[-1][1], len(pieces))
    stats.exec_s += time.perf_counter() - start_time
    if len(outs) == 1:
        out = outs[0]
        return [[out[lo:hi].copy()] for lo, hi in pieces]
    return [[o[lo:hi].copy() for o in outs] for lo, hi in pieces]


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
