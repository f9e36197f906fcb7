"""The Keras callback form: fast, batched predictions during ``fit``.

One behaviour, ``FastPredictBehaviour``, over each flavour's own ``Callback`` base class:
``FastPredict`` for Keras 2.2.5 and ``TfKerasFastPredict`` for ``tf.keras``. Each class is
made on first use, so neither Keras is imported for the other's.
"""
import threading
import weakref

from . import patching
from .engine import deferred

# Callbacks whose scope is open. Keras does not call on_train_end when fit raises, so a
# new training closes what an earlier one left open.
_open = weakref.WeakSet()
# The values saved by the callbacks whose options hold now (each one's own dict, in the
# order they set them). Keras ends callbacks in the order they began: one that ends under a
# later one hands the values it saved to it. Not the callbacks: one left open by a fit
# that raised unwrapped must be collectable, to restore and release when dropped.
_setters = []


class FastPredictBehaviour(object):
    """``model.fit(..., callbacks=[FastPredict()])``: predict calls made during training
    (in other callbacks, in validation code) take the fast path, and are deferred and
    batched unless ``defer=False``. Every training step first runs what is pending, so no
    deferred prediction sees weights from a later step than the one it was made in.

    Creating the callback patches Keras (if it was not patched), so that ``fit`` itself is
    wrapped and closes the callback's scope even when it raises. The callback holds the
    patch until its training ends (or it is collected): then Keras is unpatched,
    unless another callback still holds it or the user patched (``patch()``, before or
    during the training, or a ``patched()`` block around it). The user's ``unpatch()`` ends
    the hold at once. The callback's options hold during its training; then the values
    before it come back, except those the user chose with ``patch(**options)`` meanwhile.
    """

    def __init__(self, defer=True, max_batch_size=None, readahead=None, **options):
        super(FastPredictBehaviour, self).__init__()
        self._defer = defer
        self._scope_options = dict(max_batch_size=max_batch_size, readahead=readahead)
        self._options = options
        self._ticket = None         # this callback's hold on the patch
        self._saved = None          # options there were before this training's own
        self._mark = None           # the user's choices of options when they were set
        self._scope = None
        self._hold()

    def _hold(self):
        # Only so that fit is wrapped: the options wait for the training.
        if not patching.holding(self._ticket):
            self._ticket = patching.hold()

    def on_train_begin(self, logs=None):
        for stale in list(_open):
            stale._close()
        self._hold()
        if self._options:
            # They last as long as the training; then the settings before it come back.
            self._mark = patching.choices()
            self._saved = patching.update(**self._options)
            _setters.append(self._saved)
        if self._defer:
            self._scope = deferred.Scope(**self._scope_options)
            self._scope.activate()
            _open.add(self)

    def on_train_end(self, logs=None):
        self._close()

    def _kfp_close(self):
        self._close()

    def _close(self):
        _open.discard(self)
        scope, self._scope = self._scope, None
        if scope is not None:
            scope.deactivate()
            scope.flush(lone_read=False)
        saved, self._saved = self._saved, None
        ticket, self._ticket = self._ticket, None
        index = [i for i, values in enumerate(_setters) if values is saved]
        if index:
            above = _setters[index[0] + 1:]
            del _setters[index[0]]
            if not patching.holding(ticket):
                saved = None        # the user's unpatch() reset every option meanwhile
            else:
                for option in patching.chosen_since(self._mark):
                    saved.pop(option, None)     # the user's choice stays
            for option in list(saved or ()):   # set again by a later callback: it restores
                for later in above:
                    if option in later:
                        later[option] = saved.pop(option)
                        break
        if saved:
            patching.update(**saved)
        patching.release(ticket)    # the last hold unpatches, unless the user patched

    def __del__(self):
        try:
            self._close()
        except Exception:
            pass


# name -> (module of the flavour's Callback base class, what the class is for)
_FLAVOURS = {
    'FastPredict': ('keras.callbacks', 'Keras 2.2.5 (``keras``)'),
    'TfKerasFastPredict': ('tensorflow.python.keras.callbacks',
                           '``tf.keras`` (a ``tf.keras.callbacks.Callback``)'),
}
_classes_lock = threading.Lock()


def __getattr__(name):
    # The callback classes, made on first use over their flavour's Callback.
    if name not in _FLAVOURS:
        raise AttributeError(name)
    with _classes_lock:
        cls = globals().get(name)
        if cls is None:
            import importlib
            module, flavour = _FLAVOURS[name]
            base = importlib.import_module(module).Callback
            doc = FastPredictBehaviour.__doc__.replace('FastPredict()', name + '()')
            cls = type(name, (FastPredictBehaviour, base), {
                '__module__': __name__, '__qualname__': name,
                '__doc__': 'The callback for %s. %s' % (flavour, doc)})
            globals()[name] = cls
    return cls
