"""The batching engine: runs many predict calls of one model as few session runs.

Every way in (deferred results, read-ahead, concurrent threads) hands its calls here;
each gets back exactly its own rows, in arrays of its own (as plain Keras returns a fresh
array per call), or its own exception. Only models whose rows are known to be independent
(``entry.batch_safe is True``) are merged.
"""
import time

import numpy as np

from ..config import settings
from . import warmup


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


def run_calls(entry, arrays, stops):
    """Run the rows of several calls as one batch. ``stops``: where each call's rows end
    in ``arrays``. Returns each call's outputs in call order, ``entry.n_outputs`` a call,
    a call's exception in place of each of its outputs."""
    stats = entry.stats
    start_time = time.perf_counter()
    if len(stops) == 1 or entry.batch_safe is not True or entry.excluded:
        return _each_alone(entry, arrays, stops)
    if not warmup.ready():
        return _each_alone(entry, arrays, stops, until_ready=True)
    try:
        outs = entry.run(arrays, batch_size=max(entry.large_batch, settings.max_batch_size))
    except Exception:
        # Isolate the failure: only the calls whose own rows fail get an error.
        return _each_alone(entry, arrays, stops)
    stats.batch(stops[-1], len(stops))
    stats.exec_s += time.perf_counter() - start_time
    parts = [_split(out, stops) for out in outs]
    return parts[0] if len(parts) == 1 else [o for call in zip(*parts) for o in call]


_copy = np.ndarray.copy


def _split(out, stops):
    """``out``'s rows of each call, each in an array of its own (as plain Keras returns
    a fresh array per call)."""
    rows = stops[0]
    if (rows and out.shape[:1] == (stops[-1],) and stops[-1] == rows * len(stops)
            and stops == list(range(rows, stops[-1] + 1, rows))):
        # Calls of as many rows each (one row, usually): copied in one pass of C.
        return list(map(_copy, out.reshape((len(stops), rows) + out.shape[1:])))
    parts = []
    lo = 0
    for hi in stops:
        parts.append(out[lo:hi].copy())
        lo = hi
    return parts


def _alone(entry, arrays, lo, hi):
    start_time = time.perf_counter()
    try:
        result = entry.run([a[lo:hi] for a in arrays])
    except Exception as exc:
        result = exc
    entry.stats.batch(hi - lo, 1)
    entry.stats.exec_s += time.perf_counter() - start_time
    return result


def _each_alone(entry, arrays, stops, until_ready=False):
    """Each call in a run of its own. ``until_ready``: TF's multi-row kernels are being
    made on their thread (engine/warmup.py), and a run of several rows would wait for
    them, up to 25-40 ms (more on a loaded machine): calls run alone meanwhile, each as
    plain Keras runs it, and those left once the kernels are made run as one batch, so a
    merge never waits longer than one call's own run."""
    results = []
    lo = 0
    for k, hi in enumerate(stops):
        if until_ready and k and warmup.done.is_set():
            rest = run_calls(entry, [a[lo:] for a in arrays], [s - lo for s in stops[k:]])
            return results + rest
        result = _alone(entry, arrays, lo, hi)
        results += [result] * entry.n_outputs if isinstance(result, Exception) else result
        lo = hi
    return results


def run_requests(entry, requests):
    """Fill ``outputs`` or ``error`` of each request (calls from several threads)."""
    stops = []
    offset = 0
    for req in requests:
        offset += req.rows
        stops.append(offset)
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
    results = run_calls(entry, merged, stops)
    k = entry.n_outputs
    for i, req in enumerate(requests):
        outputs = results[i * k:(i + 1) * k]
        if isinstance(outputs[0], Exception):
            req.error = outputs[0]
        else:
            req.outputs = outputs
