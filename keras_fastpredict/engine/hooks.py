"""What must happen before anything else runs or changes the graph.

Deferred predictions are computed first (so none sees weights from a later training step
or ``set_weights``), and read-ahead windows are dropped (their rows were predicted with
the weights of their time). ``generation`` counts such events for read-ahead.
"""

class _State(object):
    generation = 0


state = _State()
flush_all = None           # set by deferred: resolves every scope's pending requests


def graph_event():
    state.generation += 1
    if flush_all is not None:
        flush_all()


def before_graph_use(wrapped, instance, args, kwargs):
    """Wrapper for Session.run, Keras functions, fit: settle pending work, then call."""
    graph_event()
    return wrapped(*args, **kwargs)
