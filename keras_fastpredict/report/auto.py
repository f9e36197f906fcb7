"""Auto-batch's decision, at the end of a site's sample: defer the site's later calls
where the sample showed what the advice ``fast_predict`` rests on (results not read
before later calls: the median batch deferral would reach is 2 or more, of 2 or more
watched results), on a model whose rows may share a run (``engine/autobatch.py``)."""
import numpy as np

from ..config import settings
from ..engine import autobatch
from . import watch


def decide(site):
    """Sets ``site.auto`` (its calls deferred from now on) or ``site.auto_note`` (why not)."""
    site.auto_note = _why_not(site)
    if site.auto_note is None:
        site.auto = autobatch.Auto(autobatch.entry_of(site.model_ref()))


def _why_not(site):
    if site.entry not in ('predict', 'predict_on_batch') or site.state is not None:
        return 'not a predict call'
    model = site.model_ref()
    if model is None:
        return 'the model is gone'
    reason = autobatch.eligible(autobatch.entry_of(model))
    if reason is not None:
        return reason
    if site.keras or site.errors:
        return 'some calls were left to Keras or raised'
    if site.deferred:
        return 'deferred already (batching(), @fast_predict)'
    if site.readahead * 2 > site.calls:
        return 'read-ahead serves it'
    batches = watch.batches(site)
    if site.watched < 2 or not batches:
        return 'too few results watched'
    reach = int(min(np.median(batches), settings.max_batch_size))
    if reach < 2:
        return 'each result is read before the next call'
    return None
