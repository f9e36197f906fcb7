"""Advice measured on a site's sample: where deferral would batch its calls, where
read-ahead could serve them, or why only the fast path applies."""
import numpy as np

from ..config import settings
from . import sites, watch


def advice(site, d):
    """What the site's measured sample advises (a list of dicts: kind, text, ...)."""
    advice = []
    model = site.model_ref()
    entry = None
    if model is not None:
        from ..engine import compiled
        entry = compiled.get(model)
    if site.keras:
        advice.append({'kind': 'left_to_keras', 'text': 'left to %s: %s' % (
            'TensorFlow' if site.entry == 'run' else 'Keras', ', '.join(
                '%s (%d calls)' % kv for kv in site.reasons.most_common()))})
    if entry is None or entry.refused:
        return advice
    batches = watch.batches(site)
    if entry.batch_safe is False or entry.excluded:
        reason = 'excluded by keras_fastpredict.exclude()' if entry.excluded else \
            entry.batching_reason
        advice.append({'kind': 'not_batchable', 'reason': reason,
                       'text': 'the model cannot be batched (%s): only the fast path '
                               'applies' % reason})
        return advice
    if site.deferred or site.readahead * 2 > site.calls:
        return advice            # already batched: deferral or read-ahead serves it
    limit = settings.max_batch_size
    if batches and site.watched >= 2:
        reach = int(min(np.median(batches), limit))
        d['results_read']['batch_it_would_reach'] = reach
        if reach >= 2:
            where = _enclosing(site)
            if where is None:
                text = ('results are first read %d calls later (median of %d measured%s): '
                        'deferring the calls (with keras_fastpredict.batching() around the '
                        'loop) would run them in batches of %d' % (
                            int(np.median(batches)), len(batches), _threads(site), reach))
                advice.append({'kind': 'fast_predict', 'batch_size': reach,
                               'function': None, 'text': text})
            else:
                name, file, first, line = where
                if name == '<module>':
                    how = ('with keras_fastpredict.batching(): around the loop at %s:%d'
                           % (file, line))
                else:
                    how = '@keras_fastpredict.fast_predict on %s (%s:%d)' % (name, file, first)
                text = ('results are not read before the next call (first read %d calls '
                        'later, median of %d measured%s): %s would run these calls in '
                        'batches of %d' % (int(np.median(batches)), len(batches),
                                           _threads(site), how, reach))
                advice.append({'kind': 'fast_predict', 'batch_size': reach,
                               'function': None if name == '<module>' else name,
                               'file': file, 'line': first if name != '<module>' else line,
                               'text': text})
            return advice
    used_at_once = bool(batches) and site.watched >= 2
    if site.dataset is not None and site.walk >= 2 and site.readahead * 2 < site.calls:
        name = site.dataset[1]
        advice.append({'kind': 'index_rows', 'array': name, 'text': (
            'the one-row inputs are fresh copies of consecutive rows of %r (%d of %d '
            'sampled calls): passing %s[i:i+1] instead lets read-ahead predict the rows '
            'ahead in one run' % (name, site.fresh, sites.FRESH_CALLS - site.fresh_left or 1,
                                  name))})
    elif used_at_once:
        advice.append({'kind': 'used_at_once', 'text': (
            'each result is read before the next call (%d of %d watched): deferral would '
            'not batch these calls, and their inputs are not rows of one array in scope '
            'for read-ahead; the fast path is what applies' % (
                len(site.batches), site.watched))})
    return advice


def _threads(site):
    # Deferral's scope is per thread: so are the counts (watch.py).
    n = len(site.threads)
    return ', calls of each of %d threads counted apart' % n if n > 1 else ''


def _enclosing(site):
    if not site.enclosing:
        return None
    return site.enclosing.most_common(1)[0][0]
