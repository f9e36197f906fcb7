"""What must happen before anything else runs or changes the graph.

Deferred predictions are computed first (so none sees weights from a later training step
or ``set_weights``), and read-ahead windows are dropped (their rows were predicted with
the weights of their time). ``generation`` counts such events for read-ahead.
"""
from . import callables


class _State(object):
    generation = 0


state = _State()
_flush_all = None          # set by deferred: resolves every scope's pending requests


def graph_event():
    state.generation += 1
    if _flush_all is not None:
        _flush_all()


def before_graph_use(wrapped, instance, args, kwargs):
    """Wrapper for Session.run, Keras functions, fit: settle pending work, then call."""
    graph_event()
    return wrapped(*args, **kwargs)


def training(wrapped, instance, args, kwargs):
    """Model.fit and fit_generator: settle pending work first; afterwards close the scope
    of any FastPredict callback, which Keras does not tell when fit raises."""
    graph_event()
    try:
        return wrapped(*args, **kwargs)
    finally:
        for value in list(args) + list(kwargs.values()):
            if isinstance(value, (list, tuple)):
                for callback in value:
                    close = getattr(callback, '_kfp_close', None)
                    if close is not None:
                        close()


def keras_function(wrapped, instance, args, kwargs):
    """Keras functions (train, test, predict, K.function): a predict function that updates
    no state changes no weights, so a stateless fallback model leaves read-ahead alone.
    Decided once per function: this runs on every call Keras serves itself."""
    quiet = instance.__dict__.get('_kfp_quiet')
    if quiet is None:
        quiet = instance._kfp_quiet = (getattr(instance, 'name', None) == 'predict_function'
                                       and not callables.has_updates(instance))
    if not quiet:
        graph_event()
    return wrapped(*args, **kwargs)


def recompiled(wrapped, instance, args, kwargs):
    """Model.compile: the cached callable is rebuilt on the next predict."""
    graph_event()
    try:
        return wrapped(*args, **kwargs)
    finally:
        callables.invalidate(instance)
