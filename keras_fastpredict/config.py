"""The one place that holds keras_fastpredict's settings and their defaults.

Every option can be given to ``patch(**options)`` (or ``configure``) and, for the
zero-change runner, as an environment variable ``KERAS_FASTPREDICT_<NAME>``.
"""
import os
import threading

DEFAULTS = {
    # Read-ahead: predict the next rows of an array walked in order (plain arrays come back).
    'readahead': True,
    'readahead_max': 1024,
    'readahead_bytes': 2 << 20,   # inputs and outputs a read-ahead window holds at most
    # Deferral: predict returns placeholders resolved in batches (opt-in: a scope, or defer=True).
    'defer': False,
    'max_batch_size': 1024,
    # Auto-batch: a call site whose sample (the call-site report's) showed that its results
    # are not read before its later calls has those later calls deferred (see
    # engine/autobatch.py); a site whose results are read at once again goes back.
    'auto_batch': False,
    # Batch safety is read from the graph. 'auto' verifies what the graph cannot settle
    # (batched against one-by-one results on distinct rows) before batching it; True
    # verifies every model; False batches what the graph cannot settle unverified.
    # Models whose graph mixes rows are never batched.
    'verify': 'auto',
    'verify_rows': 4,
    # An inference graph per model with recurrent layers: the layers applied again with
    # the recurrent loops unrolled (up to this many time steps). 'auto' builds it once the
    # model's runs have cost what it could have saved (a short loop never pays for it),
    # and uses it once its outputs equal the model's own and it ran faster; True builds it
    # at the first call and uses it once equal; False never.
    'inference_graph': 'auto',
    'unroll_max_steps': 100,
    # Concurrent callers from several threads: each runs at once while a run slot is free
    # (num_batch_threads slots per model; None: as many as the machine's cores); past
    # that, calls are merged into batches where measured faster ('auto'), always (True)
    # or never (False).
    'concurrent': True,
    'merge': 'auto',
    # A leader's wait for its batch to fill; None: the model's fastest run, 0: none.
    'batch_timeout_micros': None,
    'max_enqueued_batches': None,   # None: unbounded, as plain Keras never refuses a call
    'num_batch_threads': None,
    'timeout': None,          # seconds a concurrent caller waits at most; None waits for ever
    # Rows per session call when the caller gave no batch_size and the model may be batched.
    'large_batch_bytes': 4 << 20,
    'large_batch_max_rows': 4096,
    # The call-site report (keras_fastpredict.report()): per line of the caller's code,
    # its calls, paths, time and measured advice. Read when patching starts.
    'report': False,
}

_BOOL = {'1': True, 'true': True, 'yes': True, 'on': True,
         '0': False, 'false': False, 'no': False, 'off': False}


def _parse(name, text):
    default = DEFAULTS[name]
    if isinstance(default, bool):
        return _BOOL[text.strip().lower()]
    if name in ('verify', 'inference_graph', 'merge'):
        return _BOOL.get(text.strip().lower(), text.strip())
    if name in ('timeout', 'max_enqueued_batches', 'num_batch_threads'):  # None where unset
        if text.strip().lower() in ('', 'none'):
            return None
        return float(text) if name == 'timeout' else int(text)
    return type(default)(text)


def from_environ(environ=None):
    """Options set as KERAS_FASTPREDICT_<NAME> in the environment."""
    environ = os.environ if environ is None else environ
    found = {}
    for name in DEFAULTS:
        text = environ.get('KERAS_FASTPREDICT_' + name.upper())
        if text is not None:
            found[name] = _parse(name, text)
    return found


class Settings(object):
    """Current settings: attribute reads on the hot path, updated as a whole under a lock."""

    def __init__(self):
        self._lock = threading.Lock()
        self.__dict__.update(DEFAULTS)

    def update(self, **options):
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            raise TypeError('unknown keras_fastpredict option(s): %s' % ', '.join(sorted(unknown)))
        for name in ('verify', 'inference_graph', 'merge'):
            if name in options and options[name] not in (True, False, 'auto'):
                raise ValueError("%s must be True, False or 'auto'" % name)
        with self._lock:
            old = {name: getattr(self, name) for name in options}
            self.__dict__.update(options)
        return old

    def reset(self):
        with self._lock:
            self.__dict__.update(DEFAULTS)

    def as_dict(self):
        return {name: getattr(self, name) for name in DEFAULTS}


settings = Settings()
