"""From the tensors of a ``Session.run`` or ``K.function`` call to the Keras model they are
the inputs and outputs of, and that model's engine entry: what both adapters share to
send such calls down the model's engine path (read-ahead, deferral, merging)."""
import gc
import sys
import threading
import weakref

from ..engine import compiled
from .keras import adapter as keras_adapter

_scan_lock = threading.Lock()
_known = weakref.WeakSet()                      # Keras models found so far
_scanned = weakref.WeakKeyDictionary()          # graph -> its version at the last scan


class _Noting(object):
    # True while every Keras graph network made in this process was noted as it was made
    # (patched since keras.engine.network was imported): then no scan can find another.
    complete = False


noting = _Noting()


def note_model(wrapped, instance, args, kwargs):
    """Wrapper of ``Network._init_graph_network``: each model is known as it is made, so
    a ``Session.run`` of its tensors finds it without scanning the heap (``gc`` over every
    object: 20-60 ms once TensorFlow is loaded, paid inside the loop's first call)."""
    result = wrapped(*args, **kwargs)
    with _scan_lock:
        _known.add(instance)
    return result


def _match(model, graph, feeds, fetches):
    if not getattr(model, '_is_graph_network', False) or not getattr(model, 'outputs', None):
        return None
    inputs = model._feed_inputs
    if (len(inputs) != len(feeds) or len(model.inputs) != len(inputs)
            or model.outputs[0].graph is not graph):
        return None
    position = {id(t): i for i, t in enumerate(feeds)}
    feed_order = [position.get(id(t)) for t in inputs]
    if None in feed_order or len(set(feed_order)) != len(feeds):
        return None
    outputs = {}
    for j, t in enumerate(model.outputs):
        outputs.setdefault(id(t), j)
    output_index = [outputs.get(id(t)) for t in fetches]
    if None in output_index:
        return None
    return model, feed_order, output_index


def model_of(feeds, fetches, phase_index):
    """``find_model`` for a call whose feeds hold Keras' learning phase at
    ``phase_index`` (or None): the model's feed order indexes the call's feeds. None where
    there is no model, or looking for one failed (the call then runs as it is)."""
    try:
        found = find_model([t for i, t in enumerate(feeds) if i != phase_index], fetches)
    except Exception:
        return None
    if found is None or phase_index is None:
        return found
    model, feed_order, outputs = found
    return model, [i if i < phase_index else i + 1 for i in feed_order], outputs


def find_model(feeds, fetches):
    """``(model, feed_order, output_index)`` for a Keras model whose inputs are exactly the
    placeholders ``feeds`` and whose outputs include every tensor of ``fetches``:
    ``feed_order[i]`` is the position in ``feeds`` of the model's i-th input,
    ``output_index[k]`` the model output that ``fetches[k]`` is. None if there is none.

    Models are found among those the fast path knows, else by one scan of the live
    objects per graph version (a tensor does not know the model it is an output of)."""
    if not feeds or not fetches:
        return None
    if not all(hasattr(t, '_keras_history') for t in fetches) or not all(
            t.op.type == 'Placeholder' and hasattr(t, '_keras_history') for t in feeds):
        return None
    if 'keras.engine.network' not in sys.modules:
        return None
    graph = fetches[0].graph
    seen = set()
    with _scan_lock:                    # (_known is added to under it, by other threads)
        known = list(_known)
    candidates = [e.model_ref() for e in compiled.entries()
                  if e.adapter is keras_adapter] + known
    for model in candidates:
        if model is not None and id(model) not in seen:
            seen.add(id(model))
            found = _match(model, graph, feeds, fetches)
            if found is not None:
                return found
    if noting.complete:
        return None
    with _scan_lock:
        if _scanned.get(graph) != graph.version:
            _scanned[graph] = graph.version
            for model in _scan():
                _known.add(model)
        known = list(_known)        # (scanned here or, meanwhile, by another thread)
    for model in known:
        if id(model) not in seen:
            found = _match(model, graph, feeds, fetches)
            if found is not None:
                return found
    return None


def _scan():
    from keras.engine.network import Network
    objects = gc.get_objects()
    try:
        kinds = {kind for kind in {type(o) for o in objects} if issubclass(kind, Network)}
        return [o for o in objects if type(o) in kinds]
    finally:
        del objects


def model_entry(model, session):
    """The model's ``CompiledModel`` on ``session``, or None where the model path does not
    apply: ``session`` is not the one Keras uses now, or the model is left to Keras, or
    its calls update state (a stateful model: a plain run of its outputs updates none)."""
    ka = keras_adapter
    try:
        if ka.current_session() is not session or session._closed:
            return None
        entry = compiled.get(model)
        if not (entry is not None and entry.session is session and entry.model_ref() is model
                and entry.function is model.__dict__.get('predict_function')):
            # Not K.get_session(): it would initialise variables plain TF leaves alone.
            entry = keras_adapter.build_on(model, session)
    except Exception:
        return None
    if entry.refused or entry.updates is not None or entry.stateful:
        return None
    return entry
