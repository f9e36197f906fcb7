"""counters (stats()): per-model counters that keep counting across reset_stats()."""
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
        assert kfp.stats(model)['calls'] == 0
        model.predict(x)
        model.predict(x)
    assert kfp.stats(model)['calls'] == 2


def test_batch_counters_and_report(models):
    model = models['dense']
    x = inputs_for('dense', 64)
    with kfp.batching(readahead=False):
        preds = [model.predict(x[i:i + 1]) for i in range(64)]
    np.concatenate(preds)
    s = kfp.stats(model)
    assert (s['batches'], s['batched_calls'], s['batched_rows']) == (1, 64, 64)
    assert s['batch_size_histogram'] == {64: 1}
    report = stats.format_table()
    assert model.name in report and '64' in report


def test_models_sharing_a_name_are_counted_apart():
    import keras
    import tensorflow as tf
    x = np.ones((1, 3), 'float32')
    made = []
    for _ in range(2):
        graph = tf.Graph()
        with graph.as_default(), tf.Session(graph=graph).as_default():
            model = keras.models.Sequential([keras.layers.Dense(2, input_shape=(3,))],
                                            name='same_name')
            made.append((graph, model))
    with kfp.patched():
        for k, (graph, model) in enumerate(made):
            with graph.as_default(), tf.Session(graph=graph).as_default() as session:
                session.run(tf.global_variables_initializer())
                for _ in range(k + 1):
                    model.predict(x)
    assert [kfp.stats(m)['calls'] for _, m in made] == [1, 2]
    assert sorted(k for k in kfp.stats() if k.startswith('same_name')) == [
        'same_name', "same_name'"]


def test_each_way_in_counts_its_own_batches(models):
    """Issue 9 item 23: read-ahead windows are not counted as deferred batches."""
    from conftest import assert_same, unpatched_predict
    model = models['dense']
    x = inputs_for('dense', 64)
    fresh = [np.array(x[i:i + 1]) for i in range(10)]
    kfp.patch()
    got = [model.predict(x[i:i + 1]) for i in range(64)]            # read-ahead
    with kfp.batching(readahead=False):
        deferred = [model.predict(f) for f in fresh]                   # one deferred batch
    s = kfp.stats(model)
    assert s['readahead_windows'] >= 1 and s['readahead_hits'] > 0
    assert s['deferred'] == 10 and s['deferred_batches'] == 1
    assert s['batched'] is True and s['inference_graph'].startswith('not used')
    assert_same(np.concatenate(got), unpatched_predict(model, x))
    assert_same(np.concatenate(deferred), unpatched_predict(model, np.concatenate(fresh)))


def test_freed_models_sharing_a_name_add_up():
    """Issue 9 item 21: names restart after K.clear_session(), so a suite frees many models
    of one name. stats() by that name is the sum of what stats(model) showed for each,
    not the last one freed (nor a ring of 64 that drops the oldest)."""
    import gc
    import keras
    import tensorflow as tf
    x = np.ones((2, 3), 'float32')
    seen = []
    with kfp.patched(readahead=False):
        for k in range(4):
            graph = tf.Graph()        # as after K.clear_session(), in this process only
            with graph.as_default(), tf.Session(graph=graph).as_default() as session:
                model = keras.models.Sequential(
                    [keras.layers.Dense(2, input_shape=(3,))], name='reused')
                session.run(tf.global_variables_initializer())
                for _ in range(k + 1):
                    model.predict(x)
                model.predict(np.ones((1, 3), 'float64'))        # a cast: still fast
                seen.append(kfp.stats(model))
            del model, graph, session
            gc.collect()
    assert sorted(k for k in kfp.stats() if k.startswith('reused')) == ['reused']
    total = kfp.stats()['reused']
    for counter in stats.COUNTERS:
        assert total[counter] == sum(s[counter] for s in seen), counter
    assert total['calls'] == 1 + 2 + 3 + 4 + 4
