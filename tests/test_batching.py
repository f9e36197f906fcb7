"""The ways into deferral (``batching()``, ``@fast_predict``): the decorated code and its
caller see what they would see without them."""
import numpy as np
import pytest

import keras_fastpredict as kfp
from keras_fastpredict import DeferredArray
from conftest import (ORIGINAL, assert_same, inputs_for, overlapping_blocks, raised,
                      unpatched_predict)


def _plain(value):
    """A comparable form of what a generator gave: arrays as plain arrays."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return np.asarray(value) if isinstance(value, np.ndarray) else value


def _logging_generator(model, X, log):
    """Yields predictions; catches ValueError thrown in and yields again; logs finally."""
    def gen():
        try:
            for i in range(len(X)):
                try:
                    sent = yield model.predict(X[i:i + 1].copy())
                    log.append(('sent', sent))
                except ValueError as exc:
                    log.append(('caught', str(exc)))
                    yield 'recovered'
        finally:
            log.append('finally')
        return 'done'
    return gen


def _both(model, X, drive):
    """What ``drive(generator)`` gives for the generator undecorated under plain Keras,
    and decorated with @fast_predict: (outcome, log) each."""
    runs = []
    for decorate in (False, True):
        log = []
        gen = _logging_generator(model, X, log)
        if decorate:
            gen = kfp.fast_predict(readahead=False)(gen)
        runs.append((drive(gen(), log), log))
    return runs


def _throw_and_go_on(g, log):
    got = [next(g), g.send('a')]
    got.append(g.throw(ValueError('thrown')))      # caught inside: yields 'recovered'
    got.append(next(g))                              # and goes on predicting
    got.append(g.send('b'))
    try:
        next(g)
    except StopIteration as stop:
        got.append(('returned', stop.value))
    return got


def test_generator_throw_reaches_the_inner_generator(models):
    model = models['dense']
    X = inputs_for('dense', 4)
    (plain, plain_log), (got, log) = _both(model, X, _throw_and_go_on)
    assert log == plain_log
    assert any(type(v) is DeferredArray for v in got)  # deferral was on
    got, plain = _plain(got), _plain(plain)
    assert len(got) == len(plain)
    for g, p in zip(got, plain):
        if isinstance(p, np.ndarray):
            assert_same(g, p)
        else:
            assert g == p


def _throw_uncaught(g, log):
    next(g)
    outcome = raised(g.throw, KeyError('not caught'))
    return outcome, raised(next, g)


def test_generator_throw_not_caught_propagates(models):
    model = models['dense']
    X = inputs_for('dense', 4)
    (plain, plain_log), (got, log) = _both(model, X, _throw_uncaught)
    assert plain[0][0] is KeyError
    assert got == plain and log == plain_log


def _close_early(g, log):
    first = next(g)
    g.close()
    return raised(np.asarray, first) is None, raised(next, g)


def test_generator_close_runs_inner_finally(models):
    model = models['dense']
    X = inputs_for('dense', 4)
    (plain, plain_log), (got, log) = _both(model, X, _close_early)
    assert plain_log == ['finally']
    assert got == plain and log == plain_log


def test_generator_that_ignores_close(models):
    model = models['dense']
    X = inputs_for('dense', 2)

    def stubborn():
        while True:
            try:
                yield model.predict(X[:1].copy())
            except GeneratorExit:
                pass                                  # yields again: close() must complain

    def close_it(g):
        next(g)
        return raised(g.close)

    expected = close_it(stubborn())
    assert expected[0] is RuntimeError
    assert close_it(kfp.fast_predict(stubborn)()) == expected


def test_returned_containers_are_plain_arrays(models):
    model, multi = models['dense'], models['multi_out']
    X, Xm = inputs_for('dense', 6), inputs_for('multi_out', 6)

    def body():
        rows = [model.predict(X[i:i + 1].copy()) for i in range(6)]
        pairs = [multi.predict(Xm[i:i + 1].copy()) for i in range(6)]
        return {'rows': rows, 'nested': [(rows[0], {'deep': [rows[1][0]]})],
                'pairs': tuple(pairs), 'stacked': np.array(rows), 'means': np.mean(rows, 0)}

    expected = body()          # unpatched: plain Keras
    got = kfp.fast_predict(readahead=False)(body)()
    assert kfp.stats(model)['batches'] >= 1                     # deferral was on

    def same(g, e):
        assert type(g) is type(e)
        if isinstance(e, dict):
            assert sorted(g) == sorted(e)
            for k in e:
                same(g[k], e[k])
        elif isinstance(e, (list, tuple)):
            assert len(g) == len(e)
            for a, b in zip(g, e):
                same(a, b)
        else:
            assert_same(g, e)

    same(got, expected)
    assert_same(np.array(got['rows']), np.array(expected['rows']))


def test_readme_decorator_example_np_array_inside(models):
    model = models['dense']
    X = inputs_for('dense', 10)

    def score(model, data):
        return np.array([model.predict(x[None])[0] for x in data])

    expected = score(model, X)
    got = kfp.fast_predict(readahead=False)(score)(model, X)
    assert type(got) is np.ndarray
    assert_same(got, expected)
    assert expected.shape == (10, 10)
    assert kfp.stats(model)['batches'] == 1


@pytest.mark.parametrize('models_filter', [False, True])
def test_batching_block_gives_plain_values_on_exit(models, models_filter):
    model = models['dense']
    X = inputs_for('dense', 5)
    with kfp.batching(readahead=False, models=[model] if models_filter else None):
        preds = [model.predict(X[i:i + 1].copy()) for i in range(5)]
        assert all(type(p) is DeferredArray for p in preds)
    assert all(type(p.__wrapped__) is np.ndarray for p in preds)
    assert_same(np.array(preds), unpatched_predict(model, X)[:, None])


def test_a_block_left_in_one_thread_leaves_another_threads_block_deferring(models):
    # Two threads in batching() blocks of an unpatched process: the block that patched
    # leaves first while the other is still inside. The other's calls are still deferred,
    # and Keras is unpatched once both have left.
    import keras
    from keras_fastpredict import patching
    model = models['dense']
    X = inputs_for('dense', 8)

    def predict(lo):
        return [model.predict(X[i:i + 1].copy()) for i in range(lo, lo + 4)]

    def block():
        return kfp.batching(readahead=False)
    a, b = overlapping_blocks(block, block, lambda: predict(0),
                              lambda: (predict(4), kfp.is_patched()))
    b, patched_in_b = b
    assert patched_in_b and [type(p) is DeferredArray for p in b] == [True] * 4
    assert_same(np.array([np.asarray(p) for p in a + b]),
                unpatched_predict(model, X)[:, None])
    assert not patching.is_patched()
    assert keras.Model.predict is ORIGINAL['predict']
