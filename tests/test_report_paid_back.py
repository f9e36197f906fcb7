"""Whether one-time work has paid for itself (keras_fastpredict/report/paid_back.py): the
rule on sites whose figures are set, then a real loop's report, whose results equal plain
Keras' and whose figures agree with the rule."""
import types

import keras
import numpy as np

import keras_fastpredict as kfp
from conftest import assert_same
from keras_fastpredict import counters
from keras_fastpredict.report import output, paid_back, sites
from report_support import line, recorder, site_at  # noqa: F401 (autouse)


def fake_site(stats, hot, time_s, other_s, plain_per_call, outside_s=None):
    auto = None if outside_s is None else types.SimpleNamespace(outside_s=outside_s, calls=0,
                                                                open=0)
    return types.SimpleNamespace(stats=stats, path=stats, hot=hot, time_s=time_s,
                                 other_s=other_s, plain_per_call=plain_per_call, auto=auto,
                                 deferred=0, where=lambda: 'job.py:3 in main')


def model_site(data, model):
    """The one site of ``model`` in the report ``data``."""
    [site] = [s for s in data['sites'] if s['model'] == model.name]
    return site


def verdict(data, model):
    """``model``'s one-time-work line in the report ``data``."""
    [d] = [m for m in data['one_time'] if m['model'] == model.name]
    return d


def test_the_rule_counts_usual_calls_only(recorder):
    stats = counters.ModelStats('m')
    stats.paid('callable', 0.010)
    # 100 usual calls at 190 us against plain's 300 us: 11 ms saved, more than the work.
    # The sample's 0.5 s (its first call made the callable) counts for nothing.
    site = fake_site(stats, 100, 0.5 + 0.019, 0.5, 300e-6)
    n, per_call = paid_back.usual(site)
    assert n == 100 and abs(per_call - 190e-6) < 1e-12
    [d] = paid_back.models([site])
    assert d['one_time_ms'] == {'callable': 10.0} and d['usual_calls'] == 100
    assert abs(d['saved_s'] - 0.011) < 1e-12 and d['paid_back'] is True
    assert '11.0 ms saved by 100 usual calls (110.0 us each)' in paid_back.text(d)
    # Deferred calls: their runs after the calls are part of their cost.
    site = fake_site(stats, 100, 0.5 + 0.019, 0.5, 300e-6, outside_s=0.002)
    [d] = paid_back.models([site])
    assert abs(d['saved_s'] - 0.009) < 1e-12 and d['paid_back'] is False
    assert 'not paid back yet' in paid_back.text(d)
    # Sites of one model add up; a site with no usual calls adds nothing.
    both = [fake_site(stats, 60, 0.012, 0.0, 300e-6), fake_site(stats, 40, 0.008, 0.0, 300e-6),
            fake_site(stats, 0, 0.9, 0.9, 300e-6)]
    [d] = paid_back.models(both)
    assert d['usual_calls'] == 100 and abs(d['saved_s'] - 0.010) < 1e-12
    assert d['paid_back'] == (d['saved_s'] >= 0.010)      # (as the floats fall)


def test_not_known_says_why(recorder):
    stats = counters.ModelStats('m')
    stats.paid('callable', 0.010)
    [d] = paid_back.models([fake_site(stats, 0, 0.05, 0.05, 300e-6)])
    assert d['paid_back'] is None and d['saved_s'] is None and 'no usual calls' in d['note']
    [d] = paid_back.models([fake_site(stats, 10, 0.05, 0.0, 0.0)])
    assert d['paid_back'] is None and 'plain Keras not timed at job.py:3' in d['note']
    # A site that cannot be judged leaves the model unjudged: it may have cost more than
    # plain Keras, and the other sites' savings alone would answer early.
    both = [fake_site(stats, 100, 0.019, 0.0, 300e-6), fake_site(stats, 10, 0.05, 0.0, 0.0)]
    [d] = paid_back.models(both)
    assert d['paid_back'] is None and 'plain Keras not timed at job.py:3' in d['note'], d
    # A model with no one-time work is not listed.
    assert paid_back.models([fake_site(counters.ModelStats('n'), 10, 0.1, 0.0, 1e-3)]) == []


def test_a_loops_report_agrees_with_the_rule(recorder):
    model = keras.models.Sequential([keras.layers.Dense(16, input_shape=(8,)),
                                     keras.layers.Dense(3)])
    X = np.random.RandomState(3).rand(400, 8).astype('float32')
    plain = [model.predict(np.array(X[i:i + 1])) for i in range(len(X))]
    kfp.reset_stats()
    with kfp.patched(report=True):
        got = [model.predict(np.array(X[i:i + 1])) for i in range(len(X))]; at = line()
        data = kfp.report()
    assert_same([np.asarray(y) for y in got], plain)
    site = site_at(at)
    [mine] = [s for s in sites.all_sites() if s.line == at and s.model_ref() is model]
    d = verdict(data, model)
    assert 'callable' in d['one_time_ms']                 # its first call made one
    assert 0 <= site['usual_calls'] <= site['calls'] - 1  # (the first call never is)
    assert d['usual_calls'] == site['usual_calls'] == mine.hot
    if d['paid_back'] is None:
        assert d['note'] and d['saved_s'] is None
    else:
        expected = mine.hot * (mine.plain_per_call - site['usual_call_s'])
        assert abs(d['saved_s'] - expected) <= 1e-9
        assert d['paid_back'] == (d['saved_s'] >= sum(d['one_time_ms'].values()) / 1e3)
    assert paid_back.text(d) in output.format_table(data)


def test_a_model_called_through_k_function_and_session_run_has_its_line(recorder):
    # The model's one-time work (its callable, made when K.function and Session.run calls
    # took its fast path) is in its own counters, not in the signatures' whose calls the
    # sites count: the line is the model's, with those sites' usual calls.
    from keras import backend as K
    model = keras.models.Sequential([keras.layers.Dense(16, input_shape=(8,)),
                                     keras.layers.Dense(3)])
    X = np.random.RandomState(4).rand(300, 8).astype('float32')
    f = K.function([model.input], [model.output])
    sess = K.get_session()
    plain_f = [f([np.array(X[i:i + 1])])[0] for i in range(len(X))]
    plain_s = [sess.run(model.output, {model.input: np.array(X[i:i + 1])})
               for i in range(len(X))]
    kfp.reset_stats()
    with kfp.patched(report=True):
        got_f = [f([np.array(X[i:i + 1])])[0] for i in range(len(X))]; at_f = line()
        feeds = [{model.input: np.array(X[i:i + 1])} for i in range(len(X))]
        got_s = [sess.run(model.output, feed) for feed in feeds]; at_s = line()
        data = kfp.report()
        one_time = kfp.stats(model)['one_time_ms']
    assert_same([np.asarray(y) for y in got_f], plain_f)
    assert_same([np.asarray(y) for y in got_s], plain_s)
    assert 'callable' in one_time
    usual = [site_at(at_f), site_at(at_s)]
    assert all(s['model'] == model.name and s['usual_calls'] for s in usual), usual
    lines = [m for m in data['one_time'] if m['model'] == model.name]
    assert len(lines) == 1, data['one_time']
    assert lines[0]['one_time_ms'] == one_time
    assert lines[0]['usual_calls'] == sum(s['usual_calls'] for s in usual)


def test_deferred_calls_whose_runs_were_not_timed_do_not_claim_a_saving(recorder):
    # With defer=True the calls return at once and their batches run at the reads,
    # outside any call: the calls' own time is not what they cost, so nothing is claimed.
    model = keras.models.Sequential([keras.layers.Dense(16, input_shape=(8,)),
                                     keras.layers.Dense(3)])
    X = np.random.RandomState(5).rand(300, 8).astype('float32')

    def loop():
        out, pending = [], []
        for i in range(len(X)):
            pending.append(model.predict(np.array(X[i:i + 1])))
            if len(pending) == 2:           # read in pairs: each pair one run, at the read
                out += [np.array(y) for y in pending]
                pending = []
        return out
    plain = loop()
    kfp.reset_stats()
    with kfp.patched(report=True, defer=True):
        got = loop()
        data = kfp.report()
    assert_same(got, plain)
    site = model_site(data, model)
    assert site['paths']['deferred'] and site['usual_calls'], site
    assert site['usual_call_s'] is None, site
    d = verdict(data, model)
    assert d['paid_back'] is None and d['saved_s'] is None, d
    assert 'deferred' in d['note'] and site['site'] in d['note'], d


def test_calls_that_raise_are_not_usual_time(recorder):
    # After a loop's usual calls, calls of the same line that raise (the rows the usual
    # call checks, a feature too many) add no usual call, so no usual time either.
    model = keras.models.Sequential([keras.layers.Dense(3, input_shape=(4,))])
    X = np.random.RandomState(6).rand(200, 4).astype('float32')
    bad = np.ones((1, 5), 'float32')

    def call(x):
        try:
            return model.predict(x)
        except ValueError as exc:
            return (ValueError, str(exc))
    plain = [call(np.array(x[None])) for x in X] + [call(bad) for _ in range(100)]
    kfp.reset_stats()
    with kfp.patched(report=True):
        got = [call(np.array(x[None])) for x in X]
        [site] = [s for s in sites.all_sites() if s.model_ref() is model]
        n, per_call = paid_back.usual(site)
        got += [call(bad) for _ in range(100)]
        after = paid_back.usual(site)
    assert [g for g in got[200:]] == plain[200:] and type(plain[-1]) is tuple
    assert_same(got[:200], plain[:200])
    assert n and site.errors == 100, (n, site.errors)
    assert after[0] == n and abs(after[0] * after[1] - n * per_call) < 1e-9, (
        n * per_call, after)


def test_auto_batched_calls_not_run_yet_claim_no_saving(recorder):
    # A report read while an auto-batched loop's batch waits for its first read: the
    # calls so far cost what deferring them cost, their run is still to come.
    model = keras.models.Sequential([keras.layers.Dense(16, input_shape=(8,)),
                                     keras.layers.Dense(3)])
    X = np.random.RandomState(7).rand(400, 8).astype('float32')
    plain = [model.predict(np.array(x[None])) for x in X]
    kfp.reset_stats()
    with kfp.patched(report=True, auto_batch=True):
        ys = [model.predict(np.array(x[None])) for x in X]
        before = kfp.report()
        got = [np.array(y) for y in ys]
        after = kfp.report()
    assert_same(got, plain)
    site = model_site(before, model)
    assert site['auto_batch']['calls'] and site['usual_calls'], site
    assert site['usual_call_s'] is None, site
    d = verdict(before, model)
    assert d['paid_back'] is None and 'not run yet' in d['note'], d
    # Once the batch ran, its run counts for the calls.
    site = model_site(after, model)
    assert site['auto_batch']['run_after_calls_s'] > 0 and site['usual_call_s'] > 0, site
    d = verdict(after, model)
    assert d['paid_back'] is not None, d
