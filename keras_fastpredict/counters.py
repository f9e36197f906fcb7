"""Per-model counters: what was sped up, batched, or sent back to Keras, and why."""
import collections
import threading
import weakref

_lock = threading.Lock()
_by_model = {}        # id(model) -> ModelStats, for live models
# name -> the counters of freed models of that name, added up (names repeat: they restart
# after K.clear_session(), and a model file loaded twice gives two). Bounded, by names.
_retired = collections.OrderedDict()
_RETIRED_MAX = 64
_freed = collections.deque()    # counters of models just freed, not yet added to _retired

# Counters are plain integers bumped without a lock: under heavy thread contention a few
# increments may be lost (they are statistics, not accounting).
# Each says what it counts: 'batches' are session runs that served several calls at once
# (of any way in); 'deferred_batches' and 'readahead_windows' are those of one way in.
COUNTERS = ('calls', 'fast_calls', 'fallbacks', 'deferred', 'deferred_batches', 'batches',
            'batched_calls', 'batched_rows', 'queued', 'readahead_hits', 'readahead_misses',
            'readahead_rows', 'readahead_windows', 'verified', 'rejected', 'timeouts')


class ModelStats(object):
    __slots__ = COUNTERS + ('name', 'fallback_reasons', 'batch_sizes', 'queue_wait_s',
                            'exec_s', 'max_queue_len', 'report_owner', 'one_time',
                            '__weakref__')

    def __init__(self, name):
        self.name = name
        self.clear()

    def clear(self):
        for counter in COUNTERS:
            setattr(self, counter, 0)
        self.fallback_reasons = collections.Counter()
        self.batch_sizes = collections.Counter()    # histogram by power of two
        self.queue_wait_s = 0.0
        self.exec_s = 0.0
        self.max_queue_len = 0
        self.one_time = collections.Counter()   # one-time work done for the model: seconds
        self.report_owner = None    # the call-site report's (report/sites.py): whose calls

    def fallback(self, reason):
        """One call left to the original method, and why."""
        self.calls += 1
        self.fallbacks += 1
        self.fallback_reasons[reason] += 1

    def add(self, other):
        """Add ``other``'s counts to these (freed models of one name)."""
        for counter in COUNTERS:
            setattr(self, counter, getattr(self, counter) + getattr(other, counter))
        self.fallback_reasons.update(other.fallback_reasons)
        self.batch_sizes.update(other.batch_sizes)
        self.queue_wait_s += other.queue_wait_s
        self.exec_s += other.exec_s
        self.max_queue_len = max(self.max_queue_len, other.max_queue_len)
        self.one_time.update(other.one_time)

    def paid(self, what, seconds):
        """One-time work done for the model (a callable made, a graph built), and its time."""
        self.one_time[what] += seconds

    def batch(self, rows, calls):
        """One session run serving ``calls`` predict calls with ``rows`` rows in all."""
        self.batches += 1
        self.batched_calls += calls
        self.batched_rows += rows
        self.batch_sizes[1 << max(0, (calls - 1).bit_length())] += 1

    def as_dict(self):
        out = {counter: getattr(self, counter) for counter in COUNTERS}
        # Calls per session run (a read-ahead window counts each of its rows as a call).
        out['mean_batch_size'] = (self.batched_calls / self.batches) if self.batches else 0.0
        # Copied first (dict() holds the GIL): other threads add keys meanwhile.
        out['fallback_reasons'] = dict(self.fallback_reasons)
        out['batch_size_histogram'] = dict(sorted(dict(self.batch_sizes).items()))
        out['mean_queue_wait_ms'] = 1e3 * self.queue_wait_s / self.queued if self.queued else 0.0
        out['mean_exec_ms'] = 1e3 * self.exec_s / self.batches if self.batches else 0.0
        out['max_queue_len'] = self.max_queue_len
        out['one_time_ms'] = {what: 1e3 * s for what, s in dict(self.one_time).items()}
        return out


def named(kind, names):
    """Counters of their own for a cached ``Session.run`` signature or backend function
    (the call-site report reads them), named by what they run."""
    return ModelStats('%s(%s)' % (kind, names[:60] + '...' * (len(names) > 60)))


def for_model(model):
    key = id(model)
    found = _by_model.get(key)
    if found is not None:
        return found
    with _lock:
        _add_freed()            # (here too, so that _freed stays short without stats())
        found = _by_model.get(key)
        if found is None:
            found = _by_model[key] = ModelStats(getattr(model, 'name', type(model).__name__))
            weakref.finalize(model, _retire, key)
    return found


def _retire(key):
    # A finalizer: the garbage collector runs it at any allocation, even inside this
    # module's locked sections, so it takes no lock (dict.pop and deque.append are atomic).
    found = _by_model.pop(key, None)
    if found is not None:
        _freed.append(found)


def _add_freed():
    """Under _lock: freed models' counters join those of their name (they add up)."""
    while _freed:
        found = _freed.popleft()
        kept = _retired.pop(found.name, None)
        if kept is not None:
            kept.add(found)
            found = kept
        _retired[found.name] = found            # the most recently freed name last
        while len(_retired) > _RETIRED_MAX:
            _retired.popitem(last=False)


def snapshot():
    """Counters per model name (freed models of a name added up, then live models: a
    name shared with another gets ' marks)."""
    # A report at exit or on SIGTERM may have interrupted this very thread inside one of
    # this module's locked sections: it waits a moment, then reads without the lock.
    if _lock.acquire(True, 1.0):
        try:
            _add_freed()
            items = list(_retired.values()) + list(_by_model.values())
        finally:
            _lock.release()
    else:
        items = list(_retired.values()) + list(_freed) + list(_by_model.values())
    out = {}
    for found in items:
        name = found.name
        while name in out:
            name += "'"
        out[name] = found.as_dict()
    return out


def reset():
    # In place: cached entries and batchers hold these objects.
    with _lock:
        for found in list(_by_model.values()):     # (a finalizer may pop meanwhile)
            found.clear()
        _freed.clear()
        _retired.clear()


def forget_parent():
    """In a forked child: a fresh lock, and counters for this process' own calls only."""
    global _lock
    _lock = threading.Lock()
    reset()


def format_table(snap=None):
    """A short human-readable report, as the runner prints it."""
    snap = snapshot() if snap is None else snap
    if not snap:
        return 'keras_fastpredict: no predict calls seen'
    lines = ['keras_fastpredict: %-20s %9s %9s %9s %9s %9s %9s' % (
        'model', 'calls', 'fast', 'fallback', 'batches', 'mean bs', 'ra hits')]
    for name, s in sorted(snap.items()):
        lines.append('                   %-20s %9d %9d %9d %9d %9.1f %9d' % (
            name[:20], s['calls'], s['fast_calls'], s['fallbacks'], s['batches'],
            s['mean_batch_size'], s['readahead_hits']))
        if s['fallback_reasons']:
            lines.append('                     fallbacks: ' + ', '.join(
                '%s x%d' % kv for kv in sorted(s['fallback_reasons'].items())))
        if s.get('one_time_ms'):
            lines.append('                     one-time work: ' + ', '.join(
                '%s %.1f ms' % kv for kv in s['one_time_ms'].items()))
    return '\n'.join(lines)
