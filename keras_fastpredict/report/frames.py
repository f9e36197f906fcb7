"""Which frame is the user's: the first one outside Keras, TensorFlow, numpy, wrapt and
this package (a per-code cache), and the call site it makes."""
import os

from .. import counters as _stats
from . import sites


# id(code) -> True when its frame is not the user's. By id: a code object's hash is not
# cached (it hashes its bytecode and constants each time); the code is kept in _codes so
# that its id stays its own.
skip_of = {}
_codes = []
_skip_dirs = None


def _dirs():
    global _skip_dirs
    if _skip_dirs is None:
        import importlib.util
        found = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]  # the package
        for name in ('keras', 'tensorflow', 'tensorflow_core', 'tensorflow_estimator',
                     'numpy', 'wrapt'):
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                spec = None
            if spec is not None and spec.submodule_search_locations:
                found += list(spec.submodule_search_locations)
        _skip_dirs = tuple(os.path.join(os.path.realpath(d), '') for d in found) + tuple(
            os.path.join(os.path.abspath(d), '') for d in found)
    return _skip_dirs


def _classify(code):
    name = code.co_filename
    skip = name.startswith(_dirs()) or os.path.abspath(name).startswith(_dirs())
    with sites.lock:
        _codes.append(code)
        skip_of[id(code)] = skip
    return skip


# The frames of a recorded call in progress: a call made inside it is not recorded again.
NESTED = object()
RECORDER_CODES = set()      # ids of the recorders' own code (each recorder adds its own)


def user_frame(f):
    """The first frame from ``f`` out that is the user's, or the recorder's own code if
    one comes first (a call made inside a recorded call), or None."""
    while f is not None:
        code = f.f_code
        if id(code) in RECORDER_CODES:
            return NESTED
        skip = skip_of.get(id(code))
        if skip is None:
            skip = _classify(code)
        if not skip:
            return f
        f = f.f_back
    return None


def find_site(table, f, instance, entry_name):
    """The site of a call (slow path: a site still sampling, a new site, or a call from a
    skipped frame), and whether its user frame is ``f`` itself."""
    user = user_frame(f)
    if user is NESTED or instance is None:    # (None: a method called through its
        return None, False                    # class's __dict__, served unrecorded)
    code = user.f_code if user is not None else None
    line = user.f_lineno if user is not None else 0
    user_key = (id(code), line, id(instance))
    with sites.lock:
        site = table.get(user_key)
        if site is None or site.instance_ref() is not instance:
            if site is not None:
                sites.retired.append(site)       # a freed model's site, kept for the report
            site = table[user_key] = sites.Site(code, line, _stats.for_model(instance),
                                                entry_name, instance)
    return site, user is f
