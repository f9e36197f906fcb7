"""What both recorders share: the C extension's types where it is built, the recorder in
Python where it is not, and a call's accounting once it returned."""
import sys

import wrapt
import wrapt.wrappers

from ..config import settings
from . import auto, frames, passing, plain, sampling, sites, watch

try:
    from wrapt._wrappers import FunctionWrapper as _CFunctionWrapper
except ImportError:
    _CFunctionWrapper = None
# wrapt's C wrappers call a recorder from the caller's own frame, which the C recorders
# take as the call's; its Python ones (WRAPT_DISABLE_EXTENSIONS=1) from their __call__ in
# wrapt, a frame that is never a site's: no site's usual call was found, and auto-batch
# deferred nothing. Then the recorder is in_python's, which steps out of wrapt's frames.
WRAPT_IN_C = _CFunctionWrapper is not None and wrapt.FunctionWrapper is _CFunctionWrapper
_WRAPT_FILE = wrapt.wrappers.__file__    # (the Python wrappers' code)

try:                        # the usual call in C, where the extension is built
    if not WRAPT_IN_C:
        raise ImportError
    from ._steady import Announce, AnnouncedRecorder, Recorder
    from ._steady import Calls as CCalls
except ImportError:         # (the same logic in Python: one call layer more)
    Recorder = AnnouncedRecorder = Announce = CCalls = None

# Every frame inspection of the report goes through this name (tests count its calls).
_getframe = sys._getframe


def in_python(wrapper, rest):
    """The recorder where the C extension is not built: the calling frame, then rest (the
    original, while this thread times plain Keras: see ``passing``)."""
    getframe, thread = _getframe, passing.this_thread

    def recorded(wrapped, instance, args, kwargs):
        if thread.plain:
            return wrapped(*args, **kwargs)
        try:
            f = getframe(1)
        except ValueError:          # (a thread with no Python frame: no call site)
            return wrapper(wrapped, instance, args, kwargs)
        if not WRAPT_IN_C:          # (see WRAPT_IN_C)
            while f is not None and f.f_code.co_filename == _WRAPT_FILE:
                f = f.f_back
            if f is None:
                return wrapper(wrapped, instance, args, kwargs)
        return rest(f, wrapped, instance, args, kwargs)
    recorded._kfp_recorder = wrapper
    return recorded


def through(wrapper, wrapped, instance, args, kwargs):
    """The C recorder's usual call of the entry (this frame marks a recorded call)."""
    return wrapper(wrapped, instance, args, kwargs)


frames.RECORDER_CODES.add(id(through.__code__))


def after(site, s, fc, out, elapsed, f, x, rows, wrapped, instance, args, kwargs):
    """A call looked at whole, once it returned: which way it went, its plain cost, and
    its part of the site's sample."""
    watch.counted(site)         # (before the site's counts: see watch.Thread's start)
    if s.fast_calls == fc:
        sites.passed_on(site, s, rows, elapsed)
        if site.sampling:
            sampling.sampled(site)
        return out
    site.served += 1
    site.other_s += elapsed
    # Calls of the row count plain Keras was timed for are counted; others add up.
    if rows == site.plain_rows:
        site.same_rows += 1
    else:
        plain.add(site, rows, wrapped, instance, args, kwargs, x)
    if site.sampling:
        ahead = site.readahead
        if site.path.report_owner is site:
            sites.settle(site)
        out = sampling.sample(site, f, out, x, rows, site.readahead != ahead)
        if not site.sampling:
            if settings.auto_batch and site.auto is None:
                auto.decide(site)   # (before the site's steady tuple is made)
            if rows == site.plain_rows:
                plain.retime(site, rows, wrapped, instance, args, kwargs, x)
    elif site.retime_left and rows == site.plain_rows:
        plain.retime(site, rows, wrapped, instance, args, kwargs, x)
    return out
