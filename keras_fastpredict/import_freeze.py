"""Under the runner (and in every process it starts), the objects that exist when
TensorFlow's import ends are frozen (``gc.freeze``): Python's full collections skip them.

TensorFlow's import leaves about 136,000 of a Keras script's 158,000 tracked objects, and
a full collection over them takes 60-70 ms on a 2-core machine. It runs wherever the
allocation counts reach their thresholds: our first call's one-time work (the model's
entry, about 300 objects kept) brought it into a loop's first call (a 300-image
``sess.run`` detector's first pass 0.76-0.90x plain, its first call 101-108 ms against
plain's 34). Frozen, any later full collection, the script's or at exit, skips them.

Frozen objects are not collected while the script runs: what the script made before
importing TensorFlow (its own imports and settings) is frozen with it, and a garbage
cycle among those stays until exit. At exit they are unfrozen (an ``atexit`` handler,
after the script's own): the collections of the interpreter's exit then finalise them as
under python (kept frozen, a cycle holding a buffered file lost what was written to it,
its ``__del__`` never ran). Models, graphs and sessions come after the import and are
collected as ever.
Off with ``KERAS_FASTPREDICT_GC_FREEZE=0`` (the runner's ``--no-gc-freeze``).
(``bootstrap/sitecustomize.py`` holds a copy of ``install``: it must not import this
package, whose import takes 100 ms, in children that may never import TensorFlow.)"""
import atexit
import gc
import os
import sys

ENV = 'KERAS_FASTPREDICT_GC_FREEZE'


def install():
    """Freeze when TensorFlow's import ends; nothing if it is off or TensorFlow was
    imported already (the script's own objects may exist by then)."""
    if os.environ.get(ENV, '1') in ('0', '') or 'tensorflow' in sys.modules:
        return
    import wrapt
    wrapt.register_post_import_hook(_freeze, 'tensorflow')


def _freeze(module):
    gc.freeze()
    atexit.register(gc.unfreeze)    # (runs after the handlers registered since the import)
