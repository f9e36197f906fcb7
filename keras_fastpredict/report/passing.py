"""Plain Keras timed as it runs unpatched: while a thread times an original method
(``plain``), every patched entry point hands that thread's calls to the original.

The original ``Model.predict`` calls Keras' own predict function, a ``K.function``, and the
original ``Session.run`` goes through TensorFlow's ``_call_tf_sessionrun``: both are patched
entries, and served as usual they made the plain figure ours (a predict loop's plain
estimate was 80 us where unpatched Keras took 179-190 us), created fast-path state for
Keras' predict function, and settled pending work. The flag is this thread's own: other
threads are served as ever. It is honoured where every entry passes while the report is on
(the only time plain Keras is timed): the recorders check it first (in C, ``_steady.c``,
a thread-local int; in Python, ``calls.in_python``), and ``gate`` wraps the entries the
report does not record."""
import threading

try:
    from ._steady import Calls as _CCalls, Gate
except ImportError:                 # (the extension is not built)
    _CCalls = Gate = None


class _Thread(threading.local):
    plain = False       # whether this thread times plain Keras now


# ``this_thread.plain``: the flag (in C, read by the C recorders without a call).
this_thread = _CCalls() if _CCalls is not None else _Thread()

# Whether the entries were wrapped with the report on (set by ``patching``): only then do
# they all pass a timing thread's calls on. The report option may be on without it (a
# ``FastPredict(report=True)`` callback's training: options, not wrappers, change).
gating = False


def gate(wrapper):
    """``wrapper`` for an entry the report does not record, or its original while this
    thread times plain Keras."""
    if Gate is not None:
        return Gate(wrapper)
    state = this_thread

    def gated(wrapped, instance, args, kwargs):
        if state.plain:
            return wrapped(*args, **kwargs)
        return wrapper(wrapped, instance, args, kwargs)
    gated._kfp_gated = wrapper
    return gated


def run_plain(fn, *args):
    """``fn(*args)`` with this thread's calls of patched entries left to their originals."""
    state = this_thread
    was = state.plain
    state.plain = True
    try:
        return fn(*args)
    finally:
        state.plain = was
