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
    auto = None if outside_s is None else types.SimpleNamespace(outside_s=outside_s)
    return types.SimpleNamespace(stats=stats, hot=hot, time_s=time_s, other_s=other_s,
                                 plain_per_call=plain_per_call, auto=auto,
                                 where=lambda: 'job.py:3 in main')


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
    [d] = [m for m in data['one_time'] if m['model'] == model.name]
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
