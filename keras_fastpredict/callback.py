"""The Keras callback form: fast, batched predictions during ``fit``."""
import weakref

from keras.callbacks import Callback

from . import patching
from .engine import deferred

# Callbacks whose scope is open. Keras does not call on_train_end when fit raises, so a
# new training closes what an earlier one left open.
_open = weakref.WeakSet()


class FastPredict(Callback):
    """``model.fit(..., callbacks=[FastPredict()])``: predict calls made during training
    (in other callbacks, in validation code) take the fast path, and are deferred and
    batched unless ``defer=False``. Every training step first runs what is pending, so no
    deferred prediction sees weights from a later step than the one it was made in.

    Creating the callback patches Keras (if it was not patched) until training ends, so
    that ``fit`` itself is wrapped and closes the callback's scope even when it raises.
    """

    def __init__(self, defer=True, max_batch_size=None, readahead=None, **options):
        super(FastPredict, self).__init__()
        self._defer = defer
        self._scope_options = dict(max_batch_size=max_batch_size, readahead=readahead)
        self._options = options
        self._patched_here = False
        self._scope = None
        self._ensure_patched()

    def _ensure_patched(self):
        if not patching.is_patched():
            patching.patch(**self._options)
            self._patched_here = True

    def on_train_begin(self, logs=None):
        for stale in list(_open):
            stale._close()
        if not patching.is_patched():
            patching.patch(**self._options)
            self._patched_here = True
        elif self._options:
            patching.patch(**self._options)
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
        if self._patched_here:
            self._patched_here = False
            patching.unpatch()

    def __del__(self):
        try:
            self._close()
        except Exception:
            pass
