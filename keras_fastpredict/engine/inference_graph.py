"""An inference graph per model: the model's own layers applied once more to new inputs,
with recurrent layers unrolled and the learning phase fixed to inference.

A recurrent layer runs a ``tf.while_loop`` whose per-step machinery dominates a small
model's run (LSTM(128) over 40 steps: 1257 µs as built, 804 µs unrolled, outputs equal
bit for bit). Unrolling needs a static number of time steps. A Keras model whose layers
read the learning phase (BatchNormalization, Dropout) runs both of each such layer's
branches' switches in every run; with the phase fixed, only the inference branch is
built (MobileNet 128x128: 17.7 ms a row as built, 12.5 ms; a conv net with
BatchNormalization 356 -> 257 µs; outputs equal bit for bit). The new ops share the
model's variables, so every weight change is seen; they are built on plain placeholders
under the name scope ``keras_fastpredict_inference``, so Keras' layer nodes and automatic
names stay exactly as plain Keras has them (the graph does hold the extra ops: their
count is in ``stats()``).
The caller checks the graph's outputs against the model's own on the first calls before
using it.
"""
import collections.abc
import threading
import weakref

from . import step_copies

_lock = threading.Lock()
# Per model, for the model's life: (inputs, outputs, ops added) or a reason, and whether
# the graph was checked equal. Built once: patch()/unpatch() cycles (and @fast_predict
# calls) must not add ops again.
_built = weakref.WeakKeyDictionary()
_SCOPE = 'keras_fastpredict_inference'


class _InferencePhase(collections.abc.MutableMapping):
    """Keras' learning phases per graph, with ``graph``'s read as 0 (inference) by the
    thread that builds its inference graph alone; every other read and write goes to
    Keras' own mapping, so other threads see the phases as plain Keras leaves them."""

    def __init__(self, phases, graph):
        self._phases = phases
        self._graph = graph
        self._thread = threading.get_ident()

    def _fixed(self, graph):
        return graph is self._graph and threading.get_ident() == self._thread

    def __contains__(self, graph):
        return self._fixed(graph) or graph in self._phases

    def __getitem__(self, graph):
        return 0 if self._fixed(graph) else self._phases[graph]

    def __setitem__(self, graph, value):
        self._phases[graph] = value

    def __delitem__(self, graph):
        del self._phases[graph]

    def __iter__(self):
        return iter(list(self._phases.keys()))

    def __len__(self):
        return len(self._phases)


# What unrolling costs its caller and saves, for deciding when it pays (``estimate``).
# Building the ops costs the caller's thread about 0.1 ms per op added on this machine
# (step_copies: 0.08 ms for an LSTM(128) over 40 steps, 0.15 ms for two tf.keras LSTM(50)
# over 60; its callable is made beside it, on a thread of its own); the figure is updated
# from each build. A run of the unrolled graph saved at most about half of a run of the
# model's own (LSTM(128) over 40 steps: 1.5 ms -> 0.8 ms; two LSTM(50) over 60 steps
# read ahead in windows: none).
# Applying the layers again with the phase fixed costs more per op (Keras' own layer
# calls: 0.46 ms an op for MobileNet, 2,097 ops in 990 ms, and for a conv net with
# BatchNormalization, 167 in 77 ms) and saves less of a run (MobileNet 23-38%, the conv
# net 17-28%, Dense layers with Dropout 17-23%): a tenth is counted, so it is built once
# the runs have cost ten times the build, and a loop that ends just then paid a tenth more
# (where the fast path alone gains more than that on plain Keras: MobileNet 1.17x).
UNROLL, PHASE = 'unroll', 'phase'
_cost = {UNROLL: 0.12e-3, PHASE: 0.46e-3}      # seconds per op added
_GAIN = {UNROLL: 0.5, PHASE: 0.1}
# A loop body's control flow and TensorArray ops are not copied per time step.
_LOOP_OPS = ('Enter', 'Exit', 'Merge', 'Switch', 'NextIteration', 'LoopCond')


class Built(object):
    __slots__ = ('inputs', 'outputs', 'ops', 'reason', 'verdict', 'seconds', 'saving',
                 'why_not', 'kind', 'of')

    def __init__(self, inputs=None, outputs=None, ops=0, reason=None, kind=None):
        self.inputs, self.outputs, self.ops, self.reason = inputs, outputs, ops, reason
        self.kind = kind            # UNROLL or PHASE
        self.verdict = None        # None: not yet checked; True: used; False: not used
        self.seconds = 0.0         # what building it took
        self.saving = None         # seconds a run saved, as measured by the check
        self.why_not = None        # why it is not used (verdict False)
        self.of = None             # the model's inputs and outputs it was built for


def _layers(layer, found, layer_class, wrapper=None):
    """Every layer reachable from ``layer`` -> the wrapper it runs inside (or None)."""
    if id(layer) in found:
        return
    found[id(layer)] = (layer, wrapper)
    for sub in getattr(layer, 'layers', None) or []:
        _layers(sub, found, layer_class)
    for name in ('layer', 'forward_layer', 'backward_layer'):
        sub = getattr(layer, name, None)
        if isinstance(sub, layer_class):
            _layers(sub, found, layer_class, layer)


def _time_steps(layer, wrapper):
    """A recurrent layer's static number of steps, or None. Wrappers call their inner
    layer without registering nodes: its input shape follows from theirs."""
    owner = wrapper if wrapper is not None else layer
    nodes = owner._inbound_nodes
    if len(nodes) != 1 or not nodes[0].input_shapes:
        return None
    shapes = nodes[0].input_shapes
    # The sequence (initial states may follow); tf.keras keeps one input's shape unlisted.
    shape = shapes if isinstance(shapes, tuple) else shapes[0]
    if type(wrapper).__name__ == 'TimeDistributed':
        shape = shape[:1] + shape[2:]
    return shape[1] if len(shape) >= 3 else None


def _plan(model, max_steps, adapter):
    """(kind, (recurrent layers, every layer by id, (owner, time steps) per recurrent
    layer)), or (None, why nothing is worth building): recurrent layers to unroll, else a
    Keras model whose outputs read the learning phase (Keras 2.2.5's own flag; tf.keras
    models have none, and are left as they are)."""
    layer_class, RNN = adapter.layer_classes()
    found = {}
    _layers(model, found, layer_class)
    layers = {k: v[0] for k, v in found.items()}
    rnns = [(layer, wrapper) for layer, wrapper in found.values()
            if isinstance(layer, RNN) and not layer.unroll]
    if not rnns:
        if getattr(model, 'uses_learning_phase', False) is True:
            return PHASE, ([], layers, [])
        return None, 'no recurrent layer to unroll'
    steps_of = []           # (the layer or its wrapper, its time steps)
    for layer, wrapper in rnns:
        if layer.stateful:
            return None, 'stateful recurrent layer'
        steps = _time_steps(layer, wrapper)
        if steps is None or steps > max_steps:
            return None, 'time steps not static or above %d' % max_steps
        steps_of.append((wrapper if wrapper is not None else layer, steps))
    return UNROLL, ([layer for layer, _ in rnns], layers, steps_of)


def _io_names(model):
    return tuple(t.name for t in list(model.inputs or ()) + list(model.outputs or ()))


def built(model):
    """The model's inference graph if it was built already (an earlier patch) for the
    model as it is now, or None."""
    made = _built.get(model)
    # Sequential.add/pop (then compile) make new outputs: the old graph is not theirs.
    return made if made is not None and made.of == _io_names(model) else None


def estimate(model, max_steps, adapter):
    """(seconds of runs of the model's own graph after which building it pays, None), or
    (None, why it cannot be built): what building would take over the share of a run it
    may save. The ops it adds are about each recurrent layer's loop body once per time
    step; with the phase fixed alone, about the model's own ops."""
    kind, found = _plan(model, max_steps, adapter)
    if kind is None:
        return None, found
    graph = model.outputs[0].graph
    # The graph's own index of its ops by name: each op's name and type read through TF's
    # C API cost 2 µs (MobileNet's 3,143 ops: 8 ms at the model's first call).
    by_name = getattr(graph, '_nodes_by_name', None)
    if by_name is None:
        by_name = {op.name: op for op in graph.get_operations()}
    ops = 0
    if kind is PHASE:
        prefixes = tuple(layer.name + '/' for layer in found[1].values()
                         if layer is not model)
        ops = sum(1 for name in by_name if name.startswith(prefixes)) if prefixes else 0
    for owner, steps in found[2]:
        prefix = owner.name + '/'
        types = [by_name[name].type for name in list(by_name)
                 if name.startswith(prefix) and '/while' in name]
        body = sum(1 for op_type in types
                   if op_type not in _LOOP_OPS and not op_type.startswith('TensorArray'))
        ops += steps * (body or 64)
    return max(ops, 1) * _cost[kind] / _GAIN[kind], None


def learn_cost(kind, ops, seconds):
    """A build's measured cost: the next estimate of its kind uses it."""
    if ops > 0:
        _cost[kind] = seconds / ops


def get(model, feeds, max_steps, adapter):
    """The model's ``Built`` inference graph (``.reason`` says why there is none), made
    on first use."""
    made = built(model)
    if made is None:
        with _lock:
            made = built(model)
            if made is None:
                made = _built[model] = _build(model, feeds, max_steps, adapter)
                made.of = _io_names(model)
    return made


def _drop_own(nodes, start):
    """Removes from ``nodes`` (past ``start``) the nodes of the inference graph."""
    for node in nodes[start:]:
        tensors = getattr(node, 'output_tensors', None) or []
        if any(getattr(t, 'name', '').startswith(_SCOPE + '/') for t in tensors):
            nodes.remove(node)


# What applying a Keras 2.2.5 layer adds to it: its updates and losses (BatchNormalization's
# moving averages, activity regularisers), a network's caches of its calls.
_ADDED = ('_updates', '_losses', '_per_input_updates', '_per_input_losses',
          '_output_tensor_cache', '_output_mask_cache', '_output_shape_cache')


def _kept(layers):
    """(list or dict, its length or its keys' list lengths) for each of ``_ADDED``."""
    kept = []
    for layer in layers:
        for name in _ADDED:
            value = layer.__dict__.get(name)
            if type(value) is list:
                kept.append((value, len(value)))
            elif type(value) is dict:
                kept.append((value, {k: len(v) if type(v) is list else None
                                     for k, v in value.items()}))
    return kept


def _restore(kept):
    # Cut back to the lengths before the build (when due, it is built only while no
    # other thread of the user's runs: CompiledModel.build_inference_graph).
    for value, was in kept:
        if type(was) is int:
            del value[was:]
            continue
        for key in [k for k in value if k not in was]:
            del value[key]
        for key, n in was.items():
            if n is not None and key in value:
                del value[key][n:]


def _no_new_variables(next_creator, **kwargs):
    # Plain Keras makes none when it predicts: one made here would show in the graph's
    # variables (a Saver would save it, or look for it in a plain checkpoint).
    raise ValueError('a layer made a variable (%s)' % kwargs.get('name'))


def _build(model, feeds, max_steps, adapter):
    kind, found = _plan(model, max_steps, adapter)
    if kind is None:
        return Built(reason=found)
    layers = found[1]
    import time
    import tensorflow as tf
    start = time.perf_counter()
    graph = feeds[0].graph
    before = len(graph.get_operations())
    nodes = {key: (len(l._inbound_nodes), len(l._outbound_nodes)) for key, l in layers.items()}
    kept = _kept(layers.values())
    # Plain placeholders, under a name scope of its own: Keras' name counters (input_1,
    # input_2...) and the user's op names stay as plain Keras leaves them, and Keras adds
    # no nodes for tensors without Keras history.
    # Variables (BatchNormalization's zero-debias ones) are the model's own, or none: reuse
    # and the creator hold in this thread alone.
    v1 = tf.compat.v1
    with graph.as_default(), v1.variable_scope(v1.get_variable_scope(), reuse=True,
                                               auxiliary_name_scope=False), \
            v1.variable_creator_scope(_no_new_variables), tf.name_scope(_SCOPE):
        inputs = [tf.placeholder(t.dtype.base_dtype, t.shape, name='input') for t in feeds]
        module = adapter.learning_phase_module()
        phases = module._GRAPH_LEARNING_PHASES
        # in_train_phase picks the inference branch: the phase reads 0 in this thread only
        view = module._GRAPH_LEARNING_PHASES = _InferencePhase(phases, graph)
        try:
            # The recurrent layers unroll in this thread only (step_copies): their own
            # `unroll` stays as it is for every other thread (and for to_json()).
            with step_copies.copying_steps(adapter.K, graph):
                outputs = model(inputs if len(inputs) > 1 else inputs[0])
        except Exception as exc:       # a layer that cannot be applied again: don't use it
            return Built(reason='could not apply the layers again: %s'
                         % str(exc).split('\n')[0])
        finally:
            if module._GRAPH_LEARNING_PHASES is view:    # (not rebound by clear_session)
                module._GRAPH_LEARNING_PHASES = phases
            for key, layer in layers.items():     # in case a layer registered one anyway
                inbound, outbound = nodes[key]    # (only those made here: other threads
                _drop_own(layer._inbound_nodes, inbound)   # may build on the layers)
                _drop_own(layer._outbound_nodes, outbound)
            _restore(kept)
    outputs = outputs if isinstance(outputs, list) else [outputs]
    for t in outputs:
        # Keras' history names the model and the node just dropped: kept, it would hold
        # the model (through the graph and this cache) for as long as the graph lives.
        t.__dict__.pop('_keras_history', None)
    made = Built(inputs, outputs, len(graph.get_operations()) - before, kind=kind)
    made.seconds = time.perf_counter() - start
    return made
