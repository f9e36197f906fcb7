"""report/auto.py and the recorders' part in auto-batch, with the usual call in C and in
Python (report_support's fixture): a collect site's later calls deferred, a use-at-once
site's calls passed on, results as plain Keras gives them."""
import numpy as np

import keras_fastpredict as kfp
from conftest import assert_same, inputs_for, unpatched_predict
from report_support import in_turns, recorder  # noqa: F401 - the fixture: C and Python recorders

N = 100


def collect(model, x):
    return [model.predict(np.array(x[i])[None]) for i in range(N)]


def at_once(model, x):
    return [float(model.predict(np.array(x[i])[None])[0, 0]) for i in range(N)]


def test_collect_site_deferred_as_plain(models):
    model, x = models['dense'], inputs_for('dense', N)
    plain = np.concatenate([unpatched_predict(model, np.array(r)[None]) for r in x])
    kfp.patch(auto_batch=True)
    got = np.concatenate(collect(model, x))
    site = kfp.report()['sites']                       # (reset before each test)
    assert len(site) == 1
    assert kfp.stats(model)['deferred'] == N - 17       # after the sample of 16 (and one)
    assert site[0]['auto_batch']['deferring'] and site[0]['auto_batch']['calls'] == N - 17
    assert_same(got, plain)


def test_use_at_once_site_passes_calls_on_then_counts_with_the_report(models):
    model, x = models['dense'], inputs_for('dense', N)
    plain = [float(unpatched_predict(model, np.array(r)[None])[0, 0]) for r in x]
    kfp.patch(auto_batch=True)
    got = at_once(model, x)
    site = kfp.report()['sites']
    assert len(site) == 1
    assert site[0]['auto_batch'] == {'deferring': False,
                                     'note': 'each result is read before the next call'}
    assert site[0]['calls'] < 20             # after its sample, calls pass on uncounted
    assert kfp.stats(model)['deferred'] == 0 and kfp.stats(model)['fast_calls'] == N
    kfp.patch(report=True)                   # the report shown: the site is counted again
    again = at_once(model, x)
    site = kfp.report()['sites']
    assert len(site) == 1
    assert site[0]['calls'] > N
    np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(again, plain, rtol=1e-5, atol=1e-6)


def test_predict_on_batch_collect_site_deferred_as_plain(flavour):
    model, x = flavour.models['multi_out'], inputs_for('multi_out', N)
    plain = [flavour.unpatched_predict_on_batch(model, np.array(r)[None]) for r in x]
    kfp.patch(auto_batch=True)
    got = [model.predict_on_batch(np.array(r)[None]) for r in x]
    assert kfp.stats(model)['deferred'] == N - 17
    for i in range(2):
        assert_same(np.concatenate([g[i] for g in got]), np.concatenate([p[i] for p in plain]))


def test_threads_reading_at_once_are_not_deferred(models):
    """Threads each reading their result before their next call, the other threads'
    calls coming between its call and its read (report_support.in_turns): per thread
    deferral would batch nothing, so auto-batch must not defer them. Results as plain
    Keras run the same way."""
    model, x = models['dense'], inputs_for('dense', N)
    rows = [np.array(r)[None] for r in x]
    threads = 4

    def at_once():
        held, best = [None] * threads, [[] for _ in range(threads)]

        def step(k, j):
            if j % 2 == 0:
                held[k] = model.predict(rows[j // 2 * threads + k])
            else:
                best[k].append(float(held[k][0, 0]))
        in_turns(threads, 2 * N // threads, step)
        return [best[k][j] for j in range(N // threads) for k in range(threads)]
    plain = at_once()
    kfp.patch(auto_batch=True)
    got = at_once()
    site = kfp.report()['sites']
    assert len(site) == 1
    assert site[0]['auto_batch'] == {'deferring': False,
                                     'note': 'each result is read before the next call'}
    assert kfp.stats(model)['deferred'] == 0
    np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-6)
