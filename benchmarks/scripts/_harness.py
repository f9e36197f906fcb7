"""What each legacy script hands the first-pass driver: its loop's times and outputs.

A script builds its model and data, then hands its loop (a function of no arguments that
returns the outputs) to ``run``, which times it as the script's author would: the first
call inside the loop, nothing warmed. ``KFP_BENCH_PASSES`` runs the loop that many times in
the process (the last pass is the steady state); ``KFP_BENCH_OUT`` names the ``.npz`` file
where the driver (``benchmarks.first_pass``) reads the times and the first pass's outputs.
"""
import os
import sys
import time

import numpy as np


def calls(default):
    """The loop length: the script's first argument, else its default."""
    return int(sys.argv[1]) if len(sys.argv) > 1 else default


def seed(value=0):
    """Fixed seeds, so that the plain and the patched process build the same model."""
    import random
    random.seed(value)
    np.random.seed(value)
    import tensorflow as tf
    tf.compat.v1.set_random_seed(value)


def run(loop, extra=None):
    """``extra``: a function called after the passes, returning more figures to save
    (name -> float, saved as ``extra_<name>``)."""
    passes = int(os.environ.get('KFP_BENCH_PASSES', '1'))
    times, first = [], None
    for _ in range(passes):
        start = time.perf_counter()
        outputs = loop()
        times.append(time.perf_counter() - start)
        if first is None:
            first = outputs
    print('loop: %s s' % ', '.join('%.3f' % t for t in times))
    figures = extra() if extra is not None else {}
    for name, value in figures.items():
        print('%s: %.4f' % (name, value))
    out = os.environ.get('KFP_BENCH_OUT')
    if out:
        first = first if isinstance(first, (list, tuple)) else [first]
        arrays = {'out%d' % i: np.asarray(o) for i, o in enumerate(first)}
        arrays.update(('extra_' + k, np.array(v)) for k, v in figures.items())
        np.savez(out, times=np.array(times), **arrays)
