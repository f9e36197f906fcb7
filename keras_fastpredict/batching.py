"""The batching scope and the ``@fast_predict`` decorator: ways into deferral.

Inside a scope, predict returns deferred results that run together as one batch. The
scope patches Keras for its duration when nothing else did.
"""
import contextlib
import functools
import inspect

from . import deferred, patching


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
    if patching.is_patched():
        yield
    else:
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
            with _patched_if_needed():
                scope = deferred.Scope(**options)
                gen = func(*args, **kwargs)
                try:
                    value = None
                    while True:
                        # Defer only while the generator runs, not while it is suspended.
                        scope.activate()
                        try:
                            item = gen.send(value)
                        finally:
                            scope.deactivate()
                        value = yield item
                except StopIteration as stop:
                    scope.flush(lone_read=False)
                    return deferred.materialize(stop.value)
                finally:
                    gen.close()
                    scope.flush(lone_read=False)
        return generator_wrapper

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with batching(**options):
            result = func(*args, **kwargs)
        return deferred.materialize(result)
    return wrapper
