"""Auto-batch: a call site measured to be a collect loop has its later calls deferred.

The call-site report samples each site's first calls (``report/sampling.py``); where the
sample showed that results are not read before later calls, on a model whose rows may
share a run, ``report/auto.py`` gives the site an ``Auto``. The report's recorder then
hands each later call of the site, from the same line on the same model with an array of
the sampled rows, to ``Auto.call`` (``deferred.auto_caller``): a deferred result, as
inside ``batching()``, in this thread's ``AutoScope`` (flushed as any scope: a read, a
full batch, graph use), or None where the call must take the usual path (other
arguments, another session, a signature Keras has not validated, an opt-in scope
active). A site whose batches keep running one call at a time (its results are read at
once again) goes back to the fast path.
"""
import atexit

from ..config import settings
from . import compiled, deferred, warmup

LONE_LIMIT = 16     # lone flushes in a row after which a site stops deferring


class Auto(object):
    """One auto-batched site: whether it defers, its counts, and its call (which finds
    the model's entry per call: none is held, see ``deferred.auto_caller``)."""
    __slots__ = ('on', 'lone', 'calls', 'batches', 'lone_batches', 'stopped', 'outside_s',
                 'call', 'open')

    def __init__(self, entry):
        self.on = True
        self.lone = 0               # lone flushes in a row
        self.calls = 0              # calls deferred
        self.batches = 0            # batches that began with one of this site's calls
        self.lone_batches = 0
        self.stopped = None         # why it went back to the fast path
        self.outside_s = 0.0        # time of its batches run outside its calls (at a read)
        self.open = 0               # batches begun by this site, not run yet
        self.call = deferred.auto_caller(compiled.by_model_id, self,
                                         entry.adapter.serving_check(), _eligible)
        warmup.start()              # TF's multi-row kernels, made while calls queue up
        _at_exit()

    def ran(self, lone, outside_s):
        """A batch begun by this site ran; ``lone``: one call, its value read at once;
        ``outside_s``: its time where it ran outside the site's calls (else 0)."""
        self.batches += 1
        self.open -= 1
        self.outside_s += outside_s
        if not lone:
            self.lone = 0
            return
        self.lone_batches += 1
        self.lone += 1
        if self.lone >= LONE_LIMIT and self.on:
            self.on = False
            self.stopped = ('its results were read at once again (%d calls in a row)'
                            % LONE_LIMIT)


def _eligible(entry):
    return eligible(entry) is None


_registered = []


def _at_exit():
    # Pending calls run before the interpreter exits (and before compiled's own exit
    # work releases the callables: atexit runs the last registered first).
    if not _registered:
        _registered.append(True)
        atexit.register(deferred.flush_auto)


def eligible(entry):
    """Why ``entry``'s calls may not be auto-batched, or None."""
    if entry is None or entry.refused:
        return 'left to Keras'
    if entry.batch_safe is not True or entry.excluded:
        return 'its calls may not share a run (%s)' % (
            'excluded' if entry.excluded else entry.batching_reason or 'not yet verified')
    if not entry.single_input:
        return 'several inputs'
    if not entry.fixed_rows:
        return 'inputs of variable length'
    if settings.defer:
        return 'defer=True defers every call already'
    return None


def entry_of(model):
    return compiled.get(model)
