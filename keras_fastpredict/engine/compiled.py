"""The compiled model: one session callable per model, and the cache that holds them.

A ``CompiledModel`` feeds a model's inputs and fetches its outputs through
``Session._make_callable_from_options``, built once on the model's own graph and on the
session its Keras would use, so a call adds no graph ops and skips Keras' per-call
machinery (``get_session``'s variable scan, ``K.function``'s checks, ``predict_loop``).
An adapter (``keras_fastpredict.adapters``) finds the feeds and fetches (those of Keras'
own ``predict_function``), the session and the validation; this module knows no Keras
flavour. Entries are weakly keyed by the model; a model the fast path leaves to Keras
gets a cached ``Refusal``, so the way to Keras costs one lookup.
"""
import atexit
import threading
import time
import weakref

import numpy as np

from .. import counters as _stats
from ..config import settings
from . import batch_safety, inference_graph, verification, warmup, ways, work
from .ways import INLINE, POOL

build_lock = threading.RLock()    # also guards Keras' lazy predict-function build (keras#6124)
_entries = {}          # id(model) -> CompiledModel
by_model_id = _entries  # (the adapters read it without a lock, per call)
_excluded = set()      # id(model) of models the user excluded from batching
_CHECKS = 3            # timed equal runs before the inference graph is used


class Refusal(object):
    """A model left to Keras on this session, and why (decided once)."""
    __slots__ = ('reason', 'session', 'function', 'model_ref', 'stats')
    refused = True

    def __init__(self, model, session, reason):
        self.reason = reason
        self.session = session
        self.function = model.__dict__.get('predict_function')
        self.model_ref = weakref.ref(model)
        self.stats = _stats.for_model(model)


class CompiledModel(object):
    """The fast path for one model on one session."""

    refused = False

    def __init__(self, model, session, adapter, feeds, fetches, updates, target):
        """``updates``: the state updates to run with each call (a stateful model), or
        None; ``target``: what Keras' own callable runs besides its fetches."""
        warmup.expect_batches()     # (where no session ran through us before)
        self.model_ref = weakref.ref(model)
        self.adapter = adapter
        # How the adapter's predict loop puts runs together (Keras 2.2.5's by default).
        self._assemble = getattr(adapter, 'assemble', keras_assembled)
        self.session = session
        self.graph = session.graph
        self.function = model.predict_function
        self.outputs_list = fetches
        self.stats = _stats.for_model(model)
        self.feed_names = list(model._feed_input_names)
        self.feed_dtypes = [np.dtype(t.dtype.as_numpy_dtype) for t in feeds]
        self.feed_shapes = [tuple(s) for s in model._feed_input_shapes]
        self.feed_ndims = [len(s) for s in self.feed_shapes]
        self.single_input = len(feeds) == 1
        self.n_outputs = len(fetches)
        self.output_dtypes = [np.dtype(t.dtype.as_numpy_dtype) for t in fetches]
        # Per output: the shape of one row when TF knows it statically, else None. TF's
        # shapes, not Keras' declared ones (a Lambda's output_shape can be wrong).
        self.row_shapes = [None if t.shape.ndims is None or not t.shape[1:].is_fully_defined()
                           else tuple(t.shape[1:].as_list()) for t in fetches]
        # Signatures (container, per-array dtype and shape past the batch axis) that Keras'
        # own validation accepted once; the same signature is accepted again without it.
        self.signatures = set()
        self.slow_signatures = set()
        # Inputs with a None dimension past the batch axis (variable-length sequences):
        # rows of different calls may not stack, so they are not deferred or read ahead.
        self.fixed_rows = all(None not in s[1:] for s in self.feed_shapes)
        in_bytes = sum(int(np.prod([n or 64 for n in s[1:]], dtype=np.int64)) * d.itemsize
                       for s, d in zip(self.feed_shapes, self.feed_dtypes)) or 1
        self.row_bytes = in_bytes + sum(
            int(np.prod([n or 64 for n in (r or (64,))], dtype=np.int64)) * d.itemsize
            for r, d in zip(self.row_shapes, self.output_dtypes))
        self.large_batch = int(max(32, min(settings.large_batch_max_rows,
                                           settings.large_batch_bytes // in_bytes)))
        # True: rows of several calls may share a run; False: never (each call runs as
        # plain Keras batches it); None: not yet known, verified on distinct rows first.
        # Keras' batch size where its first layer fixes one (Keras' own rule), and its
        # check that a stateful model's rows divide into whole batches.
        self.static_batch = adapter.static_batch_size(model)
        self.stateful = bool(model.stateful)
        # State updates (stateful RNNs) run in the same session run, as Keras' predict
        # function runs them. Such models, and inputs of a fixed batch size, are never
        # merged with other calls or read ahead.
        self.updates = updates
        self.target = target
        verdict = None
        if updates is not None or self.stateful:
            self.batch_safe, self.batching_reason = False, 'stateful'
        else:
            self.batch_safe, self.batching_reason, verdict = _batch_safety(session, feeds,
                                                                           fetches)
            if self.static_batch is not None or any(s[0] is not None for s in self.feed_shapes):
                self.batch_safe, self.batching_reason = False, 'fixed batch size'
        # A live op with side effects (a random draw): each call must be exactly one run,
        # as in plain Keras, so no graph may be checked against another by running both.
        side_effects = verdict == batch_safety.STATEFUL
        # Where a failed run changed nothing, Keras' own method can take the call over and
        # raise exactly its own error (TF names, say, another uninitialised variable first
        # when the same graph runs in another thread).
        self.rerun_on_error = updates is None and not side_effects
        self.verification = None   # the verifier's state while batch_safe is None
        self.warned = False        # told the user once that this model is not batched
        self.excluded = id(model) in _excluded
        self.batcher = None        # the concurrent batcher, made on first use
        # The graph the callables run: (feeds, fetches, whether Keras' target runs too),
        # first on TF's pool as plain Keras runs it, unless a row's work is too small for
        # the pool to gain on it or the graph runs a loop (engine.work); the other way
        # once it may pay (engine.ways).
        self._io = (feeds, self.outputs_list, True)
        inline = work.starts_inline(feeds, fetches, [target] if target is not None else ())
        first = INLINE if inline else POOL
        self._ways = self._new_ways(feeds, self.outputs_list, True, first, self.stats.paid)
        # One-time work in progress: a method every run goes through (the inference graph
        # waiting to pay for itself, or under check), else None. Kept unbound: a bound
        # method would hold this entry (a cycle, outliving the collection of its model).
        self._pending = None
        self._candidate = None
        self.unroll_ready = False  # the inference graph is due: built at the next call
        self.inference_graph = 'off'
        self.inference_graph_ops = 0
        if settings.inference_graph and updates is None and not side_effects:
            self._plan_inference_graph(model, feeds)

    # -- the inference graph: built once it pays, used once equal and faster ----------------

    def _plan_inference_graph(self, model, feeds):
        built = inference_graph.built(model)
        if built is None:
            due, reason = inference_graph.estimate(model, settings.unroll_max_steps,
                                                   self.adapter)
            if reason is not None:
                self.inference_graph = 'not used: ' + reason
                return
            if settings.inference_graph == 'auto':
                # Rent, then buy: build once the runs on the model's own graph have cost
                # what the inference graph could have saved by now (a share of a run), so
                # a short loop never pays more for it than it can gain.
                self._rent_s = 0.0
                self._rent_due = due
                self._pending = CompiledModel._rent
                self.inference_graph = 'waiting: built once runs have cost %.0f ms' % (
                    1e3 * self._rent_due)
                return
        self._prepare_candidate(model, feeds)

    def _rent(self, arrays, pool):
        start = time.perf_counter()
        outs = self._run(arrays, pool)
        self._rent_s += time.perf_counter() - start
        if self._rent_s >= self._rent_due:
            self.unroll_ready = True    # built at the caller's next call (route.serve)
        return outs

    def build_inference_graph(self):
        """Build the inference graph now (the caller's thread, at the top of a call)."""
        with build_lock:
            self.unroll_ready = False     # (a thread still in _rent may set it again:
            if self._pending is not CompiledModel._rent:   # it is cleared here for good)
                return
            self._pending = None
            others = _other_threads()
            if others:
                # TF 1.15 keeps one control-flow context per graph, not per thread: ops
                # built now could land inside another thread's while loop, and its inside
                # ours. Plain Keras builds nothing in the middle of a loop: neither do we.
                self.inference_graph = ('not used: other threads were running when it was '
                                        'due (%s); building it then could break their '
                                        'graph building' % ', '.join(others[:3]))
                return
            model = self.model_ref()
            if model is not None:
                self._prepare_candidate(model, self._io[0], beside=True)

    def _prepare_candidate(self, model, feeds, beside=False):
        """Build the inference graph (or take the one built under an earlier patch) and
        make its callable; ``beside``: made on a thread of its own, the model's own graph
        serving calls meanwhile (TF 1.15 holds the GIL while it makes a callable, so the
        caller's calls slow down, in 5 ms turns, rather than stop)."""
        built = inference_graph.get(model, feeds, settings.unroll_max_steps, self.adapter)
        if built.reason is not None:
            self.inference_graph = 'not used: ' + built.reason
            return
        if built.verdict is False:
            self.inference_graph = 'not used: ' + built.why_not
            return
        self.inference_graph_ops = built.ops
        if not beside or built.verdict is not None:
            self._make_candidate(built)
            return
        self.inference_graph = 'building'
        maker = threading.Thread(target=self._make_candidate, args=(built,), daemon=True,
                                 name='keras_fastpredict-inference-graph')
        with _makers_lock:
            _makers.add(maker)
        maker.start()

    def _make_candidate(self, built):
        stats = self.stats      # (not self: its Ways, which hold this, would hold the entry)

        def paid(name, seconds):    # (a graph checked under an earlier patch: not again)
            if name != 'callable' or built.verdict is None:
                stats.paid('inference graph ' + name, seconds)
        try:
            # Its first callable on the way the model's own graph prefers (so the checks
            # compare like with like).
            made = self._new_ways(built.inputs, built.outputs, False,
                                  self._ways.preferred(), paid)
        except Exception as exc:        # (a session closed meanwhile, say)
            self.inference_graph = 'not used: no callable: %s' % str(exc).split('\n')[0]
            return
        finally:
            with _makers_lock:
                _makers.discard(threading.current_thread())
        if built.verdict is None:
            self.stats.paid('inference graph', built.seconds)
            inference_graph.learn_cost(built.kind, built.ops, built.seconds)
        # [its Ways, built, checks, own s, its s]
        candidate = [made, built, 0, 0.0, 0.0]
        if built.verdict:
            self._adopt(candidate)      # checked under an earlier patch
        else:
            self._candidate = candidate     # (set before the hook that reads it)
            self._pending = CompiledModel._check_candidate
            self.inference_graph = 'checking'

    def _check_candidate(self, arrays, pool):
        """Run the model's own graph (its outputs are returned) and the inference graph,
        each timed; after CHECKS equal answers the inference graph takes over if it was
        the faster (the first pair, a new callable's first run, is not timed, nor a pair
        for which a callable was made)."""
        candidate = self._candidate
        if candidate is None:           # another thread just decided
            return self.call(arrays, pool)
        # Both graphs the same way (the model's own graph's way for this size).
        own_ways, its_ways = self._ways, candidate[0]
        way = POOL if pool else own_ways.way_for(arrays)
        # A pair where either graph's callable for that way is made now is not timed (nor
        # counted): its price and its first run's one-time work are no run's time.
        fresh = not (own_ways.has(way) and its_ways.has(way))
        session = self.session._session
        start = time.perf_counter()
        outs = own_ways.run_on(way, session, arrays)
        middle = time.perf_counter()
        try:
            alt = its_ways.run_on(way, session, arrays)
            end = time.perf_counter()
            same = all(verification.within_tolerance(a, o) for a, o in zip(alt, outs))
        except Exception:
            same = False
        built = candidate[1]
        if not same:
            self._reject(candidate, "its outputs differed from the model's")
            return outs
        if fresh and candidate[2]:
            return outs
        if candidate[2]:
            candidate[3] += middle - start
            candidate[4] += end - middle
        candidate[2] += 1
        if candidate[2] > _CHECKS:
            own, its = candidate[3], candidate[4]
            if its < own or settings.inference_graph is True:
                built.verdict = True
                built.saving = (own - its) / _CHECKS
                self._adopt(candidate)
            else:
                self._reject(candidate, 'no faster than the model\'s own graph '
                                        '(%.3f ms against %.3f ms a run)'
                             % (1e3 * its / _CHECKS, 1e3 * own / _CHECKS))
        return outs

    def _reject(self, candidate, why):
        if self._candidate is candidate:
            self._candidate = self._pending = None
        built = candidate[1]
        built.verdict, built.why_not = False, why
        self.inference_graph = 'not used: ' + why

    def _adopt(self, candidate):
        made, built = candidate[0], candidate[1]
        # Timings of the other graph do not carry over, save one verdict: sizes that
        # settled in the caller's thread stay there (making the pool's callable holds the
        # GIL, so the caller waits: 214 ms at the 1,241st call of a char-RNN loop, LSTM(128)
        # x 40 steps, whose pool lost on both graphs).
        if made.first == INLINE:
            for size in self._ways.settled(INLINE):
                made.choice.setdefault(size, INLINE)
        self._ways = made
        self._io = (built.inputs, built.outputs, False)
        self._candidate = self._pending = None
        self.inference_graph = 'used'
        if built.saving is not None:
            self.inference_graph = 'used: %.3f ms %s a run' % (
                1e3 * abs(built.saving), 'faster' if built.saving >= 0 else 'slower')
        if self.batch_safe is None:     # the unrolled graph may settle it
            safe, reason, _ = _batch_safety(self.session, built.inputs, built.outputs)
            if safe is not None:
                self.batch_safe, self.batching_reason = safe, reason

    def model(self):
        return self.model_ref()

    # -- running ---------------------------------------------------------------------------

    def call(self, arrays, pool=False):
        """One session run; returns the list of outputs. ``pool``: run on TF's inter-op
        pool (for calls made while others run), else wherever this model ran faster."""
        if self._pending is not None:
            return self._pending(self, arrays, pool)
        return self._run(arrays, pool)

    def _run(self, arrays, pool):
        return self._ways.run(self.session._session, arrays, pool)

    def _new_ways(self, feeds, fetches, target, first, paid):
        # (The maker holds the session and Keras' target, not this entry: no cycle.)
        session, target_op = self.session, self.target if target else None

        def make(way):
            return _make_callable(session, feeds, fetches, way == INLINE, target_op)
        return ways.Ways(make, paid, first)

    @property
    def fastest_run_s(self):
        """The fastest session run timed so far (of any size): a model that ran that
        fast once is too quick to gain from queueing concurrent calls."""
        return self._ways.fastest_run_s

    def run(self, arrays, batch_size=None, pool=False, on_batch=False):
        """Predict all rows of ``arrays``: session runs of ``batch_size`` rows (chosen for
        throughput when None), results in one array per output as ``Model.predict`` gives
        them; ``on_batch``: one run, outputs as they come (``predict_on_batch``)."""
        rows = arrays[0].shape[0]
        if on_batch:
            return self.call(arrays, pool)
        if batch_size is None:
            batch_size = self.large_batch if self.batch_safe else 32
        if rows <= batch_size:
            outs = self.call(arrays, pool)
            if self.batch_safe is True or all(o.shape[:1] == (rows,) for o in outs):
                return outs
            return self._assemble([outs], [(0, rows)], rows)
        spans = [(start, min(start + batch_size, rows)) for start in range(0, rows, batch_size)]
        parts = [self.call([a[lo:hi] for a in arrays], pool) for lo, hi in spans]
        return self._assemble(parts, spans, rows)

    # -- inputs ----------------------------------------------------------------------------

    def prepare(self, x):
        """The model's feed arrays for input ``x``, cast as Keras casts them, or None when
        this input is not for the fast path (then the original method handles it, and
        raises whatever Keras raises)."""
        cls = x.__class__
        if cls is np.ndarray:
            if not self.single_input:
                return None
            dtype = x.dtype
            key = (dtype, x.shape[1:])
            if key not in self.signatures:
                if key in self.slow_signatures or not self._accept(key, x, [x]):
                    return None
            feed_dtype = self.feed_dtypes[0]
            return [x if dtype is feed_dtype else np.asarray(x, dtype=feed_dtype)]
        if cls is list or cls is tuple:
            arrays = x
        elif cls is dict:
            try:
                arrays = [x[name] for name in self.feed_names]
            except KeyError:
                return None
        else:
            return None
        if len(arrays) != len(self.feed_names):
            return None
        key = [cls, len(x)]
        rows = None
        for a in arrays:
            if a.__class__ is not np.ndarray or a.ndim == 0:
                return None
            if rows is None:
                rows = a.shape[0]
            elif a.shape[0] != rows:
                return None
            key.append((a.dtype, a.shape[1:]))
        key = tuple(key)
        if key not in self.signatures:
            if key in self.slow_signatures or not self._accept(key, x, arrays):
                return None
        return [a if a.dtype is dt else np.asarray(a, dtype=dt)
                for a, dt in zip(arrays, self.feed_dtypes)]

    def _accept(self, key, x, arrays):
        model = self.model_ref()
        if model is None:
            return False
        try:
            with self.graph.as_default():
                self.adapter.standardize(model, x)
        except Exception:
            # Not cached: every such call goes to Keras, which raises the same error.
            return False
        if any(a.ndim != n for a, n in zip(arrays, self.feed_ndims)):
            self.slow_signatures.add(key)    # e.g. 1-D input that Keras expands
            return False
        if any(a.dtype.kind not in 'biuf' for a in arrays):
            self.slow_signatures.add(key)    # object/str/complex: leave casting to Keras
            return False
        self.signatures.add(key)
        return True


def _other_threads():
    """Names of the live Python threads other than this one and the engine's own."""
    me = threading.current_thread()
    return [t.name for t in threading.enumerate()
            if t is not me and not t.name.startswith('keras_fastpredict-') and t.is_alive()]


def keras_assembled(parts, spans, rows):
    """Outputs put together as Keras' predict loop does: zeros of the first run's row
    shape, each run assigned to its rows (so outputs whose row count is not the input's
    broadcast, or raise, exactly as in plain Keras)."""
    outs = [np.zeros((rows,) + p.shape[1:], p.dtype) for p in parts[0]]
    for part, (lo, hi) in zip(parts, spans):
        for o, p in zip(outs, part):
            o[lo:hi] = p
    return outs


def get(model):
    """The cached entry of ``model`` (a CompiledModel or a Refusal), or None."""
    return _entries.get(id(model))


def store(model, entry):
    key = id(model)
    old = _entries.get(key)
    if old is None or old.model_ref() is not model:
        weakref.finalize(model, _entries.pop, key, None)
    _entries[key] = entry
    return entry


def _batch_safety(session, feeds, fetches):
    """(batch_safe, reason, verdict) from the graph and the ``verify`` option."""
    from tensorflow.python.client import session as tf_session
    run = tf_session.BaseSession.run
    run = getattr(run, '__wrapped__', run)      # ours when patched: no hooks for this

    def run_shapes(tensor, feed_dict):
        return run(session, tensor, feed_dict)

    verdict, reason = batch_safety.analyse(session.graph, feeds, fetches, run_shapes)
    if verdict in (batch_safety.UNSAFE, batch_safety.STATEFUL):
        return False, reason, verdict
    if settings.verify is True or (verdict == batch_safety.UNKNOWN and settings.verify == 'auto'):
        return None, reason or 'checked on distinct rows before batching', verdict
    return True, reason, verdict


def exclude(model):
    """Never batch ``model`` with other calls (it still gets the fast path)."""
    key = id(model)
    if key not in _excluded:
        _excluded.add(key)
        weakref.finalize(model, _excluded.discard, key)
    entry = _entries.get(key)
    if entry is not None:
        entry.excluded = True


def clear_at_exit():
    # Release the TF callables while TF is still whole (their __del__ needs it).
    _entries.clear()


_makers = set()        # threads making an inference graph's callable
_makers_lock = threading.Lock()


def making():
    """Whether an inference graph's callable is being made on another thread now."""
    return bool(_makers)


def _join_makers(timeout=10.0):
    # At exit, not while TensorFlow is torn down around a callable being made.
    with _makers_lock:
        makers = list(_makers)
    deadline = time.monotonic() + timeout
    for maker in makers:
        maker.join(max(0.0, deadline - time.monotonic()))


atexit.register(clear_at_exit)
atexit.register(_join_makers)           # (atexit runs last registered first)


def invalidate(model):
    """Forget the entry of ``model`` (after compile, or when asked)."""
    _entries.pop(id(model), None)


def clear():
    """Drop every cached callable; the next predict rebuilds what it needs."""
    with build_lock:
        _entries.clear()


def entries():
    return [e for e in list(_entries.values()) if not e.refused]


def _make_callable(session, feeds, fetches, inline, target=None):
    from tensorflow.core.protobuf import config_pb2
    options = config_pb2.CallableOptions()
    options.feed.extend(t.name for t in feeds)
    options.fetch.extend(t.name for t in fetches)
    if target is not None:
        # What Keras' own callable runs: its updates (state updates of a stateful model;
        # else a no-op), so TF runs, and fails, exactly as it does for Keras.
        options.target.append(target.name)
    if inline:
        options.run_options.inter_op_thread_pool = -1
    return session._make_callable_from_options(options)
