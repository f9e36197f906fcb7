"""stats(): counters per model that keep counting across reset_stats()."""
import numpy as np

import keras_fastpredict as kfp
from keras_fastpredict import counters as stats
from conftest import inputs_for


def test_reset_keeps_counting(models):
    model = models['dense']
    x = inputs_for('dense', 4)
    with kfp.patched():
        model.predict(x)
        kfp.reset_stats()
        assert kfp.stats()[model.name]['calls'] == 0
        model.predict(x)
        model.predict(x)
    assert kfp.stats()[model.name]['calls'] == 2


def test_batch_counters_and_report(models):
    model = models['dense']
    x = inputs_for('dense', 64)
    with kfp.batching(readahead=False):
        preds = [model.predict(x[i:i + 1]) for i in range(64)]
    np.concatenate(preds)
    s = kfp.stats()[model.name]
    assert (s['batches'], s['batched_calls'], s['batched_rows']) == (1, 64, 64)
    assert s['batch_size_histogram'] == {64: 1}
    report = stats.format_table()
    assert model.name in report and '64' in report
