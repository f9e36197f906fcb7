"""The batching engine: runs many predict calls of one model as few session runs.

Every way in (deferred results, read-ahead, concurrent threads) hands its calls here as
``Request`` objects; each gets back exactly its own rows, or its own exception.
"""
import time

import numpy as np

from . import callables
from .config import settings


class Request(object):
    """One caller's predict call: its feed arrays, then its outputs or its error."""
    __slots__ = ('entry', 'arrays', 'rows', 'outputs', 'error', 'event', 'proxies',
                 'enqueued', 'abandoned', 'scope_ref', '__weakref__')

    def __init__(self, entry, arrays, rows):
        self.entry = entry
        self.arrays = arrays
        self.rows = rows
        self.outputs = None
        self.error = None
        self.event = None
        self.proxies = None
        self.enqueued = 0.0
        self.abandoned = False


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


def run_requests(entry, requests):
    """Fill ``outputs`` or ``error`` of each request, batching them where the model allows."""
    stats = entry.stats
    if len(requests) == 1 or entry.batch_safe is False or entry.excluded:
        for req in requests:
            _run_alone(entry, req)
        return
    start_time = time.perf_counter()
    if len(entry.feed_names) == 1:
        merged = [np.concatenate([r.arrays[0] for r in requests])]
    else:
        merged = [np.concatenate([r.arrays[i] for r in requests])
                  for i in range(len(entry.feed_names))]
    try:
        outs = entry.run(merged, batch_size=max(entry.large_batch, settings.max_batch_size))
    except Exception:
        # Isolate the failure: only the callers whose own rows fail get an error.
        for req in requests:
            _run_alone(entry, req)
        return
    pieces = []
    offset = 0
    for req in requests:
        pieces.append((offset, offset + req.rows))
        offset += req.rows
    if entry.batch_safe is None and not verify(entry, merged, outs, pieces):
        for req in requests:
            _run_alone(entry, req)
        return
    stats.batch(offset, len(requests))
    stats.exec_s += time.perf_counter() - start_time
    for req, (lo, hi) in zip(requests, pieces):
        req.outputs = [o[lo:hi] for o in outs]


def _run_alone(entry, req):
    start_time = time.perf_counter()
    try:
        req.outputs = entry.run(req.arrays)
    except Exception as exc:
        req.error = exc
    entry.stats.batch(req.rows, 1)
    entry.stats.exec_s += time.perf_counter() - start_time
