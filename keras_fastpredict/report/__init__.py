"""The call-site report: which line of the user's code makes the predict calls, which way
each call took, what it cost against plain Keras, and advice where it was measured.

On with ``patch(report=True)``, ``KERAS_FASTPREDICT_REPORT=1``, or the runner's ``--stats``
and ``--stats-json FILE``. Off, nothing is wrapped and no frame is ever looked at.

The parts: ``sites`` (a call site's counts and the tables), ``frames`` (which frame is
the user's), ``predict_calls`` and ``announced`` (the two recorders; ``_steady.c`` is
their usual call in C, ``calls`` what they share), ``plain`` (plain Keras' cost),
``sampling`` and ``watch`` (a site's sample, watched results), ``advice``, ``output``
(data, table, JSON).

How it works, generic over adapters: when the report is on, ``patching`` wraps each call
entry point's wrapper (``wrap``) with a recorder. Call entries are ``Model.predict`` and
``predict_on_batch`` (``CALL_PATHS``: the model is the call's instance) and wrappers marked
``announcing`` (``Session.run``, ``K.function``: the adapter announces which of its cached
states serves the call, and that state's counters are read). Per call the recorder

* attributes the call to the first frame outside Keras, TensorFlow, numpy, wrapt and this
  package (``file:line in function``), found by walking ``sys._getframe`` with a per-code
  cache; a call made inside another recorded call (Keras' own session run) is not counted
  again;
* reads one counter before and after (``fast_calls``): a call the adapter did not serve is
  "left to Keras" (or TF) with the reason whose count grew. Which way the served calls
  went (read-ahead, deferred, merged across threads, else the fast path alone) is read
  from the model's counters once per run of calls from one site, not per call (see
  ``sites.take``). Other threads' calls move the same counters, so paths of calls that overlap
  in time are approximate;
* times the call, and estimates what plain Keras would have spent: calls left to Keras
  are their own measure; otherwise the original (unpatched) method is timed once per
  model (or cached signature) and power-of-two row count, on the rows of the first such
  call (1024 at most, scaled by rows), 1 warm-up then the median of 3 runs, outside the
  call's own timing, not while our own one-time work runs on another thread, and again
  at the end of the site's sample (the lower figure kept). Where an extra run would
  change what the program sees (stateful models, random draws or variable writes, runs
  with side effects) nothing is timed, and the report says so.

Measured advice, on a sample of each site's first calls (``WATCH_CALLS`` results watched;
the sample ends after ``SAMPLE_CALLS`` calls whatever the loop, then the site's calls take
the usual path: the steps inlined at the top of each recorder's ``rest``, looked up in
``by_line`` (``predict_calls.hot_tuple``) or, for announced calls, ``by_lasti``
(``announced._steady_at``). The extension ``_steady`` runs these steps in C and leaves
every other call to ``rest``; without it, the same Python runs them):

* Whether results are read before the next call: a returned plain array is handed back as
  a view of itself of an ndarray subclass that records its first use (numpy functions,
  ufuncs, methods, conversions, iteration, printing, pickling, indexing and slicing;
  shape, dtype and len are not uses, as a deferred result answers them without running).
  ``np.asarray(y)`` of the result itself is not seen (numpy makes the plain array without
  a call the subclass sees); of a view it cannot happen, as taking the view is a use. Values,
  dtype, shape and memory are the array's own; anything computed from it is a plain
  ndarray; it pickles as a plain ndarray; only ``type(y) is np.ndarray`` is false (as for
  deferred results). Not done where deferral is on. "Batch size it would reach": calls
  made between a result and the first use that would have flushed it.
* Which function spans consecutive calls (the one ``@fast_predict`` would batch): frames
  of the previous sampled call are held until the next one; the innermost frame present
  in both that is a named function (not a comprehension or lambda).
* Whether one-row inputs that read-ahead could not serve are fresh copies of consecutive
  rows of one array: arrays of that row shape are looked up in the locals of the site
  and its two callers, and their rows compared.
"""

from . import announced, passing, predict_calls, sites
from .announced import stop_announcing
from .output import (JSON_ENV, at_exit, child_path, format_table, in_child, report, reset,
                     write_json)
from .watch import Watched

# Entry points attributed as calls (by ``class.attribute`` path) unless a wrapper says so
# itself with ``_kfp_call``.
CALL_PATHS = frozenset(('Model.predict', 'Model.predict_on_batch'))


def announcing(fn):
    """Marks an adapter's entry wrapper whose calls the report attributes through the
    adapter's ``announce`` (``Session.run``, ``K.function``): the adapter calls
    ``self.announce(state, x)`` once it knows which of its states (with ``stats``, and a
    ``compiled`` model entry where the call goes to a model) serves the call, before it
    serves it. ``announce`` is None while the report is off (one attribute test)."""
    fn._kfp_call = 'announced'
    return fn


def forget_steady():
    """Each site's usual-call tuple is made again at its next call (the report or
    auto-batch turned on or off: what the tuples hold depends on them)."""
    with sites.lock:
        for _, by_line in sites.tables.values():
            by_line.clear()


def is_call_entry(path, wrapper):
    return bool(getattr(wrapper, '_kfp_call', False)) or path in CALL_PATHS


def wrap(path, wrapper):
    """The recorder around a call entry's wrapper; other entries' wrapper gated (the
    original while this thread times plain Keras: ``passing``)."""
    if not is_call_entry(path, wrapper):
        return passing.gate(wrapper)
    entry_name = path.rsplit('.', 1)[-1]
    with sites.lock:      # kept across patch cycles
        table, by_line = sites.tables.setdefault(path, ({}, {}))
    if getattr(wrapper, '_kfp_call', None) == 'announced':
        return announced.recorder(wrapper, table, by_line, entry_name)
    return predict_calls.recorder(wrapper, table, by_line, entry_name)


__all__ = ['CALL_PATHS', 'JSON_ENV', 'Watched', 'announcing', 'at_exit', 'child_path',
           'forget_steady', 'format_table', 'in_child', 'is_call_entry', 'report', 'reset',
           'stop_announcing', 'wrap', 'write_json']
