"""Advice measured on a site's sample (keras_fastpredict/report/advice.py), and following it
gives plain Keras' values."""

import contextlib

import numpy as np
import pytest
import keras
from keras import layers

import keras_fastpredict as kfp
from conftest import assert_same, inputs_for, unpatched_predict
from report_support import (HELPER_FILE, HELPER_LINE, helper, in_turns, kinds, line,
                            site_at, sites, recorder)  # noqa: F401 (autouse)


def test_advice_session_run_collect_loop(models):
    from keras import backend as K
    model = models['dense']
    X = inputs_for('dense', 60)
    sess = K.get_session()
    rows = [np.array(X[i:i + 1]) for i in range(60)]      # fresh arrays: no read-ahead

    def score(rows):
        return [sess.run(model.output, {model.input: r}) for r in rows]
    expected = score(rows)
    kfp.patch(report=True)
    got = score(rows)
    assert_same(np.concatenate(got), np.concatenate(expected))
    s = sites(entry='run', function='<listcomp>')[0]
    advice = [a for a in s['advice'] if a['kind'] == 'fast_predict']
    assert advice and advice[0]['function'] == 'score', s['advice']
    assert advice[0]['batch_size'] >= 32
    # Following it batches the sess.run calls (with plain TF's values).
    kfp.unpatch()
    kfp.reset_stats()
    got = kfp.fast_predict(score)(rows)
    assert_same(np.concatenate(got), np.concatenate(expected))
    assert kfp.stats(model)['deferred'] >= 58


def test_advice_collect_loop(models):
    model = models['dense']
    X = inputs_for('dense', 100)

    def score(model, rows):
        return [model.predict(r) for r in rows]
    rows = [np.array(X[i:i + 1]) for i in range(100)]      # fresh arrays: no read-ahead
    kfp.patch(report=True)
    out = score(model, rows)
    assert_same(np.concatenate(out), unpatched_predict(model, X))
    s = site_at(score.__code__.co_firstlineno + 1)
    advice = [a for a in s['advice'] if a['kind'] == 'fast_predict']
    assert advice and advice[0]['function'] == 'score'
    assert advice[0]['line'] == score.__code__.co_firstlineno
    assert advice[0]['batch_size'] == 100
    assert '@keras_fastpredict.fast_predict on score' in advice[0]['text']
    # Following the advice batches it (and gives plain Keras' values).
    kfp.unpatch()
    kfp.reset_stats()
    got = kfp.fast_predict(score)(model, rows)
    assert_same(np.concatenate(got), unpatched_predict(model, X))
    assert kfp.stats(model)['deferred'] == 100


def test_advice_collect_through_helper_names_the_looping_function(models):
    model = models['dense']
    X = inputs_for('dense', 30)

    def loop(rows):
        out = []
        for r in rows:
            out.append(helper(model, r))
        return out
    kfp.patch(report=True)
    out = loop([np.array(X[i:i + 1]) for i in range(30)])
    assert_same(np.concatenate(out), unpatched_predict(model, X))
    advice = [a for a in site_at(HELPER_LINE, HELPER_FILE)['advice']
              if a['kind'] == 'fast_predict']
    assert advice and advice[0]['function'] == 'loop' and advice[0]['batch_size'] == 30


def test_advice_use_immediately_loop(models):
    model = models['dense']
    X = inputs_for('dense', 80)
    kfp.patch(report=True)
    best = []
    for i in range(80):
        y = model.predict(X[i:i + 1]); views = line()  # noqa: E702
        best.append(int(y.argmax()))
    assert best == list(unpatched_predict(model, X).argmax(axis=1))
    s = site_at(views)
    assert s['paths']['readahead'] >= 70 and s['advice'] == []    # read-ahead serves it
    # The same loop over fresh copies of the rows: indexing would let read-ahead work.
    best = []
    for i in range(40):
        y = model.predict(np.array([X[i]])); fresh = line()  # noqa: E702
        best.append(int(y.argmax()))
    assert best == list(unpatched_predict(model, X[:40]).argmax(axis=1))
    s = site_at(fresh)
    assert kinds(s) == ['index_rows'] and s['advice'][0]['array'] == 'X'
    assert 'X[i:i+1]' in s['advice'][0]['text']
    assert s['results_read']['batch_it_would_reach'] == 1


def test_advice_autoregressive_loop(models):
    model = models['dense']
    x0 = inputs_for('dense', 1)

    def generate(predict, x, n):
        outs = []
        for _ in range(n):
            y = predict(x)
            outs.append(y)
            x = np.concatenate([x[:, 10:], y], axis=1)
        return np.concatenate(outs)
    expected = generate(lambda x: unpatched_predict(model, x), x0, 30)
    kfp.patch(report=True)
    got = generate(model.predict, x0, 30)
    assert_same(got, expected)
    s = sites(function='generate')[0]
    assert s['calls'] == 30 and s['paths']['fast'] == 30
    assert kinds(s) == ['used_at_once']


def test_advice_stateful_model():
    np.random.seed(3)
    model = keras.models.Sequential([
        layers.LSTM(4, stateful=True, batch_input_shape=(1, 3, 2)), layers.Dense(2)])
    X = np.random.RandomState(4).rand(12, 3, 2).astype('float32')
    model.reset_states()
    expected = [unpatched_predict(model, X[i:i + 1]) for i in range(12)]
    model.reset_states()
    kfp.patch(report=True)
    got = [model.predict(X[i:i + 1]) for i in range(12)]; here = line()  # noqa: E702
    for a, e in zip(got, expected):
        assert_same(a, e)
    s = site_at(here)
    assert s['calls'] == 12 and s['paths']['fast'] == 12
    assert 'not_batchable' in kinds(s)
    assert [a for a in s['advice'] if a['kind'] == 'not_batchable'][0]['reason'] == 'stateful'
    assert s['plain_estimate_s'] is None and 'stateful' in s['plain_estimate']


def _sample(preds):
    # Keras' examples/lstm_text_generation.py: the row is read through np.asarray, which
    # an ndarray subclass cannot see.
    preds = np.asarray(preds).astype('float64')
    return int(np.argmax(np.log(preds + 1e-9)))


@pytest.mark.parametrize('read', ['sample', 'argmax of [0]', pytest.param(
    'np.asarray', marks=pytest.mark.xfail(strict=True, reason=(
        'known limit (docs/limits.md): np.asarray of a whole watched result is unseen by an '
        'ndarray subclass, so such a loop is advised deferral that would batch nothing')))])
def test_advice_for_a_result_indexed_then_read_at_once(models, read):
    """Issue 21: the char-RNN generator's shape, `preds = model.predict(x)[0]` then a
    read of `preds` before the next call. The report advised @fast_predict ("results
    are not read before the next call"); following it would batch nothing. A view of a
    watched result counts as a use now: no deferral advice. Results as plain Keras."""
    model = models['dense']
    x0 = inputs_for('dense', 1)

    def generate(predict, x, n):
        picked = []
        for _ in range(n):
            if read == 'np.asarray':
                k = int(np.asarray(predict(x)).argmax())
            else:
                preds = predict(x)[0]
                k = _sample(preds) if read == 'sample' else int(np.argmax(preds))
            picked.append(k)
            x = np.roll(x, k, axis=1)
        return picked
    expected = generate(lambda x: unpatched_predict(model, x), x0, 40)
    kfp.patch(report=True)
    assert generate(model.predict, x0, 40) == expected
    s = sites(function='generate')[0]
    assert s['calls'] == 40
    assert 'fast_predict' not in kinds(s) and 'batching' not in kinds(s), s['advice']
    assert kinds(s) == ['used_at_once'], s['advice']


def test_advice_collect_loop_of_indexed_results_is_not_given(models):
    """`out.append(model.predict(x)[0])` reads nothing before the loop ends, but a view's
    reads cannot be watched (np.asarray of it, above): the report stays silent rather than
    risk advice that would batch nothing. Results as plain Keras."""
    model = models['dense']
    X = inputs_for('dense', 30)
    rows = [np.array(X[i:i + 1]) for i in range(30)]

    def score(rows):
        out = []
        for r in rows:
            out.append(model.predict(r)[0])
        return out
    kfp.patch(report=True)
    got = score(rows)
    assert_same(np.array(got), unpatched_predict(model, X))
    s = sites(function='score')[0]
    assert 'fast_predict' not in kinds(s), s['advice']


THREADS, EACH = 4, 25       # threads taking turns (report_support.in_turns), calls each


def _threads_collect(model, rows, scope=None):
    """Each thread collects its rows' results, read only after the threads are joined."""
    out = [[None] * EACH for _ in range(THREADS)]

    def step(k, j):
        out[k][j] = model.predict(rows[j * THREADS + k])
    in_turns(THREADS, EACH, step, scope)
    return np.concatenate([out[k][j] for j in range(EACH) for k in range(THREADS)])


def _threads_at_once(model, rows, scope=None):
    """Each thread reads its result before its next call (a server's handlers), while
    the other threads' calls come between its call and its read."""
    held, best = [None] * THREADS, [[] for _ in range(THREADS)]

    def step(k, j):
        if j % 2 == 0:
            held[k] = model.predict(rows[j // 2 * THREADS + k])
        else:
            best[k].append(int(held[k].argmax()))
    in_turns(THREADS, 2 * EACH, step, scope)
    return [best[k][j] for j in range(EACH) for k in range(THREADS)]


def _deferral_per_thread(model, run, rows):
    """What deferral really does with a scope per thread: its results, its calls deferred
    and their mean per deferred batch (a scope whose reads keep flushing lone calls stops
    deferring them: engine/deferred.py). Patched afresh, the report off and the counters
    reset, so the counts are deferral's alone."""
    kfp.unpatch()
    kfp.patch()
    kfp.reset_stats()
    got = run(model, rows, kfp.batching)
    st = kfp.stats(model)
    assert st["deferred_batches"], st
    return got, st['deferred'], st['deferred'] / st['deferred_batches']


def test_advice_for_threads_collecting_counts_each_threads_calls(models):
    """benchmarks/scripts/threaded_rows.py's shape: each thread collects its results, read
    after join. The advice counted every thread's calls as one thread's ("batches of
    1000" for 16 threads' 63 each): a scope in each thread batches that thread's only."""
    model = models['dense']
    X = inputs_for('dense', THREADS * EACH)
    rows = [np.array(X[i:i + 1]) for i in range(len(X))]      # fresh arrays: no read-ahead
    plain = _threads_collect(model, rows)                     # plain Keras, the same turns
    assert_same(plain, unpatched_predict(model, X))
    kfp.patch(report=True)
    assert_same(_threads_collect(model, rows), plain)
    s = sites(function='step')[0]
    assert s['calls'] == len(rows)
    advice = [a for a in s['advice'] if a['kind'] == 'fast_predict']
    got, deferred, per_batch = _deferral_per_thread(model, _threads_collect, rows)
    assert_same(got, plain)
    assert deferred == len(rows) and per_batch == EACH, kfp.stats(model)
    assert advice and advice[0]['batch_size'] == per_batch, s['advice']
    assert advice[0]['text'].endswith('in batches of %d' % EACH)


def test_advice_for_threads_reading_at_once_is_not_deferral(models):
    """Handlers each reading their result before their next call, while other threads'
    calls come between: per thread deferral batches nothing, so no deferral advice."""
    model = models['dense']
    X = inputs_for('dense', THREADS * EACH)
    rows = [np.array(X[i:i + 1]) for i in range(len(X))]
    plain = _threads_at_once(model, rows)
    assert plain == list(unpatched_predict(model, X).argmax(axis=1))
    kfp.patch(report=True)
    assert _threads_at_once(model, rows) == plain
    s = sites(function='step')[0]
    assert s['calls'] == len(rows)
    got, _, per_batch = _deferral_per_thread(model, _threads_at_once, rows)
    assert got == plain and per_batch == 1
    assert 'fast_predict' not in kinds(s), s['advice']
    assert s['results_read']['batch_it_would_reach'] == per_batch


FIRST = 70      # calls of one thread first: the site's sample (64 results watched), and more


def _first_then_threads(model, rows, scope=None, after_first=None):
    """One thread's calls (a warm-up loop: the site's sample), then THREADS threads' at
    the same site, all results read at the end."""
    out = [None] * len(rows)

    def call(i):
        out[i] = model.predict(rows[i])
    with (scope() if scope else contextlib.suppress()):
        for i in range(FIRST):
            call(i)
    if after_first:
        after_first()
    in_turns(THREADS, EACH, lambda k, j: call(FIRST + j * THREADS + k), scope)
    return np.concatenate(out)


def test_advice_for_a_sample_one_thread_made_counts_later_threads_apart(models):
    """The sample all one thread's, then other threads call the site (counted on the usual
    path): that thread's results' batch is its own calls, not the site's."""
    model = models['dense']
    X = inputs_for('dense', FIRST + THREADS * EACH)
    rows = [np.array(X[i:i + 1]) for i in range(len(X))]
    plain = _first_then_threads(model, rows)
    assert_same(plain, unpatched_predict(model, X))
    kfp.patch(report=True)
    assert_same(_first_then_threads(model, rows), plain)
    s = sites(function='call')[0]
    assert s['calls'] == len(rows)
    advice = [a for a in s['advice'] if a['kind'] == 'fast_predict']
    kfp.unpatch()
    kfp.patch()
    kfp.reset_stats()
    first = []
    got = _first_then_threads(model, rows, kfp.batching,
                              lambda: first.append(dict(kfp.stats(model))))
    assert_same(got, plain)
    assert first[0]['deferred'] == FIRST and first[0]['deferred_batches'] == 1
    assert advice and advice[0]['batch_size'] == FIRST, s['advice']
