"""The batching scope and the ``@fast_predict`` decorator: ways into deferral.

Inside a scope, predict returns deferred results that run together as one batch. The
scope patches Keras for its duration when nothing else did.
"""
import contextlib
import functools
import inspect

from . import patching
from .engine import deferred, pending


@contextlib.contextmanager
def batching(max_batch_size=None, models=None, readahead=None):
    """Defer predict calls made in this block (this thread) and run them in batches.

    ``max_batch_size``: rows per batch (default from settings); ``models``: only these
    models are deferred; ``readahead``: override read-ahead inside the block.
    Leaving the block runs whatever is still pending.
    """
    with _patched_if_needed():
        with deferred.Scope(max_batch_size, models, readahead):
            yield


@contextlib.contextmanager
def _patched_if_needed():
    if patching.is_patched() and patching.explicit():
        yield
    else:
        # (A hold: scopes in other threads keep the patch until the last one leaves.)
        with patching.patched():
            yield


def fast_predict(func=None, max_batch_size=None, models=None, readahead=None):
    """Decorate a function whose loop calls ``model.predict``: its calls are batched.

    Usable bare (``@fast_predict``) or with options (``@fast_predict(max_batch_size=256)``).
    When the function returns nothing is pending, and deferred values in the returned
    list, tuple or dict are plain numpy arrays. Generator functions are batched while
    they run; their deferred values resolve when read.
    """
    if func is None:
        return functools.partial(fast_predict, max_batch_size=max_batch_size,
                                 models=models, readahead=readahead)
    options = dict(max_batch_size=max_batch_size, models=models, readahead=readahead)

    if inspect.isgeneratorfunction(func):
        @functools.wraps(func)
        def generator_wrapper(*args, **kwargs):
            # As ``yield from func(...)`` (PEP 380: send, throw and close reach the inner
            # generator), with deferral on only while the inner generator runs.
            with _patched_if_needed():
                scope = deferred.Scope(**options)
                gen = func(*args, **kwargs)
                sent = thrown = None
                try:
                    while True:
                        scope.activate()
                        try:
                            item = gen.send(sent) if thrown is None else gen.throw(*thrown)
                        except StopIteration as stop:
                            result = stop.value
                            break
                        finally:
                            scope.deactivate()
                        sent = thrown = None
                        try:
                            sent = yield item
                        except GeneratorExit:
                            raise                   # the finally below closes gen
                        except BaseException as exc:
                            thrown = type(exc), exc, exc.__traceback__
                    scope.flush(lone_read=False)
                    return pending.materialize(result)
                finally:
                    gen.close()
                    scope.flush(lone_read=False)
        return generator_wrapper

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with batching(**options):
            result = func(*args, **kwargs)
        return pending.materialize(result)
    return wrapper
