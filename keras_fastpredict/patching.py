"""patch() and unpatch(): every entry point keras_fastpredict wraps, in one table.

Wrappers are ``wrapt.FunctionWrapper`` objects, each recorded where it was installed (the
idempotency marker), so patching twice is a no-op and ``unpatch()`` puts back the very
function objects that were there. (Not a subclass as marker: wrapt's C descriptor binds a
Python subclass's instances about 0.5 µs slower per call.)
Modules not yet imported are patched when they are (wrapt's post-import hooks).
"""
import contextlib
import sys
import threading

import wrapt

from .adapters import keras as keras_adapter
from .adapters import keras_function, model_path, session_run
from .adapters import tf_keras as tf_keras_adapter
from .config import settings
from . import report as _report         # the call-site report (only when on)
from .engine import compiled, concurrent_batcher, hooks, pending, readahead

# (module, class.attribute, wrapper(wrapped, instance, args, kwargs)): each adapter's
# entry points, then TensorFlow's, before which pending work is settled.
ENTRY_POINTS = keras_adapter.adapter.entry_points() + tf_keras_adapter.adapter.entry_points() + (
    keras_function.adapter.entry_points() + session_run.adapter.entry_points()) + (
    # What Session.make_callable's functions run (they may assign variables too).
    ('tensorflow.python.client.session', 'BaseSession._call_tf_sessionrun',
     hooks.before_graph_use),
    # Shuffling a deferred result in place (numpy's module-level function; the same
    # object under both names).
    ('numpy.random', 'shuffle', pending.resolving_first_argument),
    ('numpy.random.mtrand', 'shuffle', pending.resolving_first_argument),
)

_lock = threading.RLock()
_active = False
_hooks_registered = set()

# Who asked for the patch. The user's patch() is explicit, until unpatch(); holders
# (FastPredict callbacks, patched() and batching() blocks) hold it while they may need it
# and release it after, in any thread: the last release unpatches unless the user asked. The user's unpatch() ends every hold (their
# tickets, the count of unpatch() calls when taken, go stale: releasing one does nothing).
_explicit = False
_holds = 0
_unpatches = 0
# Options the user chose with patch(**options), each with the choice's number: a holder that
# set an option for a while puts it back only if the user has not chosen it since.
_choices = 0
_chosen = {}
# _claimed: whoever patches claims the patch (the user's mark, a hold) before the work, not
# after: a callback collected meanwhile (its __del__ releases, at any allocation, in this
# thread: the lock is reentrant) must not find the last hold gone and unpatch mid-way,
# resetting the options just set or leaving entries wrapped while unpatched.


_installed = {}             # (id(owner), attribute) -> the wrapper we put there


class _Pickled(wrapt.FunctionWrapper):
    """A wrapper that pickles as the function it wraps (numpy's shuffle: a closure that
    names it may be sent to another process, where it is the original)."""

    def __reduce_ex__(self, protocol):
        return self.__wrapped__.__reduce_ex__(protocol)


def _wrapper_type(wrapper):
    return _Pickled if getattr(wrapper, '_kfp_pickled_as_original', False) else \
        wrapt.FunctionWrapper


def _ours(owner, name, current):
    return current is not None and _installed.get((id(owner), name)) is current


def owner_of(module, path):
    owner = module
    parts = path.split('.')
    for part in parts[:-1]:
        owner = getattr(owner, part)
    return owner, parts[-1]


def _apply(module, path, wrapper):
    owner, name = owner_of(module, path)
    current = owner.__dict__.get(name)
    if current is None or _ours(owner, name, current):
        return
    kind = _wrapper_type(wrapper)
    if settings.report:         # off: nothing wrapped, no frame ever looked at
        wrapper = _report.wrap(path, wrapper)
    elif settings.auto_batch and path in _report.CALL_PATHS:
        # Auto-batch alone: predict's call sites are sampled (silently) to find collect
        # loops; other entries stay as they are.
        wrapper = _report.wrap(path, wrapper)
    patched = _installed[(id(owner), name)] = kind(current, wrapper)
    setattr(owner, name, patched)


def replace(owner, name, wrapper):
    """Put ``wrapper`` around the original at ``owner.name`` in place of ours (the fork
    guard); unpatch() still restores the original. False where the attribute is not ours."""
    current = owner.__dict__.get(name)
    if not _ours(owner, name, current):
        return False
    patched = _installed[(id(owner), name)] = wrapt.FunctionWrapper(current.__wrapped__,
                                                                    wrapper)
    setattr(owner, name, patched)
    return True


def _remove(module, path):
    owner, name = owner_of(module, path)
    current = owner.__dict__.get(name)
    if _ours(owner, name, current):
        setattr(owner, name, current.__wrapped__)
        del _installed[(id(owner), name)]


def _on_import(module):
    # Registered once per module for the life of the process: a no-op unless patched.
    with _lock:
        if not _active:
            return
        for name, path, wrapper in ENTRY_POINTS:
            if name == module.__name__:
                _apply(module, path, wrapper)
        if module.__name__ == 'keras.engine.network':
            model_path.noting.complete = True     # no model was made before


def is_patched():
    return _active


def patch(**options):
    """Speed up ``Model.predict`` and its siblings (see the package docs for options).
    A second call only updates the options (turning the report or auto-batch on or off
    re-wraps the entry points: calls in flight finish as they began). The patch is then
    the user's: a ``FastPredict`` callback's end leaves it, and the options chosen here."""
    global _explicit, _choices
    with _lock:
        was, _explicit = _explicit, True     # first: see _claimed
        try:
            _patch(**options)
        except BaseException:
            _explicit = was     # (unknown options raise before anything is changed)
            raise
        if options:
            _choices += 1
            _chosen.update(dict.fromkeys(options, _choices))


def _patch(**options):
    global _active
    with _lock:
        update(**options)
        if _active:
            return
        _active = True
        for name, path, wrapper in ENTRY_POINTS:
            module = sys.modules.get(name)
            if module is not None:
                _apply(module, path, wrapper)
            elif name not in _hooks_registered:
                _hooks_registered.add(name)
                wrapt.register_post_import_hook(_on_import, name)
        _report.passing.gating = bool(settings.report)


def hold():
    """Patch for an implicit holder (a ``FastPredict`` callback) until it calls
    ``release(ticket)`` with the ticket returned, once; the user's ``unpatch()`` ends the
    hold first."""
    global _holds
    with _lock:
        _holds += 1             # first: see _claimed
        try:
            _patch()
        except BaseException:
            _holds -= 1
            raise
        return _unpatches


def explicit():
    """Whether the user patched with ``patch()`` (blocks and callbacks only hold it)."""
    return _explicit


def holding(ticket):
    """Whether ``ticket`` still holds the patch (not released, no ``unpatch()`` since)."""
    return ticket is not None and ticket == _unpatches and _holds > 0


def release(ticket):
    """End a hold: the last one unpatches unless the user patched (stale ticket: no-op)."""
    global _holds
    with _lock:
        if not holding(ticket):
            return
        _holds -= 1
        if not _holds and not _explicit:
            unpatch()


def choices():
    """The number of the user's latest choice of options, for ``chosen_since``."""
    return _choices


def chosen_since(mark):
    """The options the user has chosen with ``patch(**options)`` since ``choices()`` was
    ``mark`` (none after an ``unpatch()``)."""
    return {name for name, number in _chosen.items() if number > mark}


def update(**options):
    """Set options; while patched, turning the report or auto-batch on or off re-wraps the
    entry points (the option alone would leave them as they were wrapped). Returns the
    options' earlier values, for ``update(**saved)``."""
    with _lock:
        was_recording = _recording()
        saved = settings.update(**options)
        if _active and _recording() != was_recording:
            _rewrap()
        return saved


def _recording():
    """What the call entries are wrapped with: the report, auto-batch alone, or neither."""
    return (bool(settings.report), bool(settings.auto_batch) and not settings.report)


def _rewrap():
    _report.stop_announcing()
    _report.forget_steady()
    _report.passing.gating = False          # (plain is not timed while half re-wrapped)
    for name, path, wrapper in ENTRY_POINTS:
        module = sys.modules.get(name)
        if module is not None:
            _remove(module, path)
            _apply(module, path, wrapper)
    _report.passing.gating = bool(settings.report)


def unpatch():
    """Restore the original methods exactly; pending deferred results are computed first.
    Every option returns to its default: a later ``patch()`` starts afresh. It ends the
    callbacks' holds too: their end will not patch again nor put options back."""
    global _active, _explicit, _holds, _unpatches
    with _lock:
        _explicit, _holds = False, 0
        _unpatches += 1
        _chosen.clear()
        if not _active:
            return
        hooks.graph_event()
        _report.passing.gating = False
        for name, path, _ in ENTRY_POINTS:
            module = sys.modules.get(name)
            if module is not None:
                _remove(module, path)
        _active = False
        model_path.noting.complete = False      # models made meanwhile go unnoted
        _report.stop_announcing()
    concurrent_batcher.stop_all()
    readahead.forget()
    compiled.clear()
    session_run.clear()
    settings.reset()


@contextlib.contextmanager
def patched(**options):
    """``with patched(): ...`` patches for the block (leaves an outer patch in place, and a
    ``FastPredict`` callback's that still holds). The block holds the patch as a callback
    does: blocks in several threads each keep it until the last one leaves."""
    global _explicit, _holds
    with _lock:
        was_active, was_explicit, unpatches = _active, _explicit, _unpatches
        old = {name: getattr(settings, name, None) for name in options}
        chosen = {name: _chosen.get(name) for name in options}
        _holds += 1             # first: see _claimed
        try:
            _patch(**options)   # (re-wraps where the report is turned on or off)
        except BaseException:
            _holds -= 1
            raise
        ours = {name: getattr(settings, name, None) for name in options}
    try:
        yield
    finally:
        with _lock:
            # (The user's unpatch() in the block ended every hold, this one's too.)
            mine = unpatches == _unpatches
            # As before the block while the patch stays (the user's, another holder's);
            # an outer patch of the user's that an unpatch() in the block ended is put
            # back, as it always was.
            if (mine and (_explicit or _holds > 1)) or (was_explicit and not mine):
                if not mine:
                    _explicit = True        # (first: see _claimed)
                else:
                    # Options are the process's: one another block (another thread's)
                    # set since is its until it ends, not put back under it.
                    old = {name: value for name, value in old.items()
                           if getattr(settings, name, None) == ours[name]}
                _patch(**old)
                for name, number in ((n, chosen[n]) for n in old):
                    if number is None:
                        _chosen.pop(name, None)
                    else:
                        _chosen[name] = number
            if mine:
                _holds -= 1
            if not (_explicit or _holds):
                unpatch()
                if not was_active:
                    settings.update(**old)
