"""The report's recorders (keras_fastpredict/report/predict_calls.py, announced.py, frames.py,
sites.py): off, nothing is wrapped; calls attributed to the user's line; Session.run and
K.function sites; every loop kind ends its sample and takes the usual path (in C and in
Python). Every result is compared with plain unpatched Keras or TF."""
import os
import threading

import numpy as np
import keras
from keras import layers
from keras.engine import training

import keras_fastpredict as kfp
from conftest import assert_same, inputs_for, unpatched_predict
from keras_fastpredict.report import announced, calls, frames, sites as S
from report_support import (HELPER_FILE, HELPER_LINE, _Counting, _CountingCalls,  # noqa: F401
                            assert_same_outcomes, helper, line, recorder, site_at)

HERE = os.path.abspath(__file__)


def test_off_wraps_nothing_and_inspects_no_frame(models, monkeypatch):
    counting = _Counting(calls._getframe)
    monkeypatch.setattr(calls, '_getframe', counting)
    finding = _CountingCalls(frames.find_site)
    monkeypatch.setattr(frames, 'find_site', finding)
    model = models['dense']
    X = inputs_for('dense', 40)
    kfp.patch()
    current = training.Model.__dict__['predict']
    assert not hasattr(current._self_wrapper, '_kfp_recorder')
    for i in range(20):
        assert_same(model.predict(X[i:i + 1]), unpatched_predict(model, X[i:i + 1]))
        model.predict(np.array(X[i:i + 1]))
    with kfp.batching():
        ys = [model.predict(X[i:i + 1]) for i in range(20)]
    assert_same(np.concatenate(ys), unpatched_predict(model, X[:20]))
    t = threading.Thread(target=lambda: model.predict(X[:3]))
    t.start()
    t.join()
    assert counting.calls == 0 and finding.calls == 0
    assert kfp.report()['sites'] == []
    kfp.unpatch()
    kfp.patch(report=True)
    assert training.Model.__dict__['predict']._self_wrapper._kfp_recorder is not None
    model.predict(X[:2])
    assert finding.calls > 0                   # the counter does see the report's lookups


def test_report_option_from_environment():
    from keras_fastpredict import config
    assert config.DEFAULTS['report'] is False
    assert config.from_environ({'KERAS_FASTPREDICT_REPORT': '1'}) == {'report': True}


def test_attribution_helpers_lambdas_comprehensions_generators_threads(models):
    model = models['dense']
    X = inputs_for('dense', 12)
    kfp.patch(report=True)
    out = [helper(model, X[i:i + 1]) for i in range(3)]
    assert_same(np.concatenate(out), unpatched_predict(model, X[:3]))
    f = lambda x: model.predict(x)   # noqa: E731
    lam = line() - 1
    f(X[:2])
    comp = [model.predict(X[i:i + 1]) for i in range(4)]; comp_line = line()  # noqa: E702

    def gen():
        for i in range(3):
            yield model.predict(X[i:i + 1]); gen_line = line()  # noqa: E702,F841
    list(gen())
    gen_line = gen.__code__.co_firstlineno + 2
    results = {}

    def work(k):
        results[k] = model.predict(X[k:k + 2]); work_line.append(line())  # noqa: E702
    work_line = []
    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(3):
        assert_same(results[k], unpatched_predict(model, X[k:k + 2]))
    at_helper = site_at(HELPER_LINE, HELPER_FILE)
    assert at_helper['calls'] == 3 and at_helper['function'] == 'helper'
    assert at_helper['site'] == '%s:%d in helper' % (HELPER_FILE, HELPER_LINE)
    assert site_at(lam)['function'] == '<lambda>' and site_at(lam)['calls'] == 1
    assert site_at(comp_line)['function'] == '<listcomp>' and site_at(comp_line)['calls'] == 4
    assert_same(np.concatenate(comp), unpatched_predict(model, X[:4]))
    assert site_at(gen_line)['function'] == 'gen' and site_at(gen_line)['calls'] == 3
    assert site_at(work_line[0])['function'] == 'work'
    assert site_at(work_line[0])['calls'] == 3 and site_at(work_line[0])['rows'] == 6


def test_calls_through_keras_methods_are_the_users(models):
    model = keras.models.Sequential([layers.Dense(3, activation='softmax', input_shape=(4,))])
    x = np.random.RandomState(0).rand(5, 4).astype('float32')
    expected = model.predict_classes(x)             # plain Keras (unpatched here)
    kfp.patch(report=True)
    got = model.predict_classes(x); here = line()  # noqa: E702
    np.testing.assert_array_equal(got, expected)
    assert site_at(here)['calls'] == 1 and site_at(here)['entry'] == 'predict'


def test_session_run_and_k_function_sites(models):
    import tensorflow as tf
    from keras import backend as K
    model = models['dense']
    X = inputs_for('dense', 40)
    sess = K.get_session()
    f = K.function([model.input], [model.output])
    p = tf.compat.v1.placeholder(tf.float32, (None, 3))
    squared = tf.square(p) + 1.0
    Q = np.random.RandomState(5).rand(12, 3).astype('float32')

    def run_all():
        a = [sess.run(model.output, {model.input: X[i][None]}) for i in range(40)]
        b = [f([X[i][None]])[0] for i in range(40)]
        c = [sess.run(squared, {p: np.array(Q[i:i + 1])}) for i in range(12)]
        d = sess.run(squared, {p: Q}, options=tf.compat.v1.RunOptions())
        return a, b, c, d
    sites_line = run_all.__code__.co_firstlineno + 1
    expected = run_all()                    # plain TF and Keras, unpatched
    kfp.patch(report=True)
    got = run_all()
    for g, e in zip(got[:3], expected[:3]):
        assert_same(np.concatenate(g), np.concatenate(e))
    assert_same(got[3], expected[3])
    run = site_at(sites_line)
    assert run['entry'] == 'run' and run['function'] == '<listcomp>'
    assert run['calls'] == 40 and run['rows'] == 40 and run['model'] == model.name
    assert run['paths']['readahead'] >= 30, run['paths']
    # (the first call of a signature of a model whose feeds pass Session.run's checks is
    # on the model path too)
    assert run['paths']['keras'] == 0 and run['plain_estimate'] == 'measured', run
    fn = site_at(sites_line + 1)
    assert fn['entry'] == '__call__' and fn['calls'] == 40 and fn['model'] == model.name
    assert fn['paths']['readahead'] >= 30 and fn['plain_estimate_s'] > 0
    other = site_at(sites_line + 2)
    assert other['calls'] == 12 and other['model'].startswith('Session.run(')
    assert other['paths']['fast'] == 11 and other['paths']['keras'] == 1
    assert other['plain_estimate'] == 'measured' and other['plain_estimate_s'] > 0
    assert [a['kind'] for a in other['advice']] == ['left_to_keras']
    assert other['advice'][0]['text'].startswith('left to TensorFlow: ')
    left = site_at(sites_line + 3)
    assert left['calls'] == 1 and left['paths']['keras'] == 1 and left['rows'] == len(Q)
    assert 'not a call the adapter serves' in list(left['keras_reasons'])[0]


def test_session_run_and_k_function_zero_rows(models):
    from keras import backend as K
    model = models['dense']
    sess = K.get_session()
    f = K.function([model.input], [model.output])
    z = np.zeros((0, 32), 'float32')
    expected = [sess.run(model.output, {model.input: z}), f([z])[0]]
    kfp.patch(report=True)
    for _ in range(3):                       # (the second call on is served)
        got = [sess.run(model.output, {model.input: z}), f([z])[0]]
        for g, e in zip(got, expected):
            assert isinstance(g, np.ndarray) and g.shape == e.shape == (0, 10)


def test_report_turned_on_and_off_while_patched(models):
    model = models['dense']
    X = inputs_for('dense', 4)
    kfp.patch()
    model.predict(X[:1])
    assert kfp.report()['sites'] == []
    kfp.patch(report=True)                  # the entry points are wrapped again
    y = model.predict(X[:2]); here = line()  # noqa: E702
    assert_same(y, unpatched_predict(model, X[:2]))
    assert site_at(here)['calls'] == 1
    kfp.patch(report=False)
    assert not hasattr(training.Model.__dict__['predict']._self_wrapper, '_kfp_recorder')
    model.predict(X[:2])
    assert site_at(here)['calls'] == 1
    with kfp.patched(report=True):
        model.predict(X[:2]); inside = line()  # noqa: E702
    assert site_at(inside)['calls'] == 1
    assert not hasattr(training.Model.__dict__['predict']._self_wrapper, '_kfp_recorder')


class _Subclassed(keras.models.Model):
    def __init__(self):
        super(_Subclassed, self).__init__()
        self.dense = layers.Dense(3)

    def call(self, x):
        return self.dense(x)


def _sampling_sites():
    return [s for s in S.all_sites() if s.sampling]


def test_every_loop_kind_ends_its_sample(models):
    # A site samples its first calls only (results read, spanning function, fresh rows);
    # afterwards its calls take the usual path. Each loop below once sampled for ever (its
    # samplers' countdowns only moved on calls of another kind), paying the slow path on
    # every call: read-ahead views, views with read-ahead off, deferred calls, K.function
    # input lists, a model left to Keras, Session.run calls the adapter passes on.
    import tensorflow as tf
    from keras import backend as K
    model = models['dense']
    n = S.SAMPLE_CALLS + 40
    X = inputs_for('dense', n)
    sess = K.get_session()
    f = K.function([model.input], [model.output])
    sub = _Subclassed()
    sub.compile('sgd', 'mse')
    sub.predict(X[:1, :4])                  # built
    p = tf.compat.v1.placeholder(tf.float32, (None, 3))
    squared = tf.square(p)
    opts = tf.compat.v1.RunOptions()

    def loops():
        out = {}
        out['ra'] = [model.predict(X[i:i + 1]) for i in range(n)]
        with kfp.batching():
            out['deferred'] = [model.predict(np.array(X[i:i + 1])) for i in range(n)]
        out['fn'] = [f([X[i][None]])[0] for i in range(n)]
        out['run'] = [sess.run(model.output, {model.input: X[i][None]}) for i in range(n)]
        out['sub'] = [sub.predict(X[i:i + 1, :4]) for i in range(n)]
        out['opts'] = [sess.run(squared, {p: X[i:i + 1, :3]}, options=opts) for i in range(n)]
        return {k: np.concatenate(v) for k, v in out.items()}
    expected = loops()
    kfp.patch(report=True)
    got = loops()
    kfp.patch(report=True, readahead=False)
    views = [model.predict(X[i:i + 1]) for i in range(n)]
    for k in expected:
        assert_same(got[k], expected[k])
    assert_same(np.concatenate(views), expected['ra'])
    assert _sampling_sites() == [] and S.sampling_count == 0
    for s in S.all_sites():
        assert s.calls == n
        if s.keras < n:                     # served: the later calls took the usual path
            assert s.hot >= n - S.SAMPLE_CALLS - 2, (s.where(), s.hot)


def _rows(i):
    """A steady loop's rows at its pass ``i``: 3 every seventh pass, else 1."""
    return 3 if i % 7 == 0 else 1


def _assert_two_sites_with_every_call(line, n):
    """Two sites at ``line`` of this module (two signatures, or two models, on one line),
    each with all ``n`` calls of the loop, their rows exact, every call on some path."""
    found = [s for s in kfp.report()['sites'] if s['file'] == HERE and s['line'] == line]
    assert sorted(s['calls'] for s in found) == [n, n], found
    rows = sum(_rows(i) for i in range(n))
    for s in found:
        assert s['rows'] == rows and sum(s['paths'].values()) == s['calls'], s


def test_steady_session_run_line_with_two_signatures_row_changes_and_errors(models):
    # One line alternating two Session.run signatures (its steady site's calls announced
    # as another signature's), row counts that change, and a bad feed once steady: the
    # same results and errors as plain TF; each call counted once, its rows exact.
    import tensorflow as tf
    from keras import backend as K
    model = models['dense']
    sess = K.get_session()
    p = tf.compat.v1.placeholder(tf.float32, (None, 32))
    q = tf.square(p)
    X = inputs_for('dense', 400)
    n = S.SAMPLE_CALLS + 60

    def loop():
        out = []
        for i in range(n):
            rows = _rows(i)
            for fetch, feed in ((model.output, model.input), (q, p)):
                out.append(sess.run(fetch, {feed: X[i:i + rows]}))
        for bad in (np.zeros((1, 5), 'float32'), np.zeros((2, 5), 'float32')):
            try:
                sess.run(q, {p: bad})
            except Exception as exc:  # noqa: BLE001 - compared with plain TF's
                out.append((type(exc), str(exc)))
        return out
    expected = loop()
    kfp.patch(report=True)
    assert_same_outcomes(loop(), expected)
    _assert_two_sites_with_every_call(loop.__code__.co_firstlineno + 5, n)
    errors = [s for s in kfp.report()['sites'] if s['file'] == HERE and s['errors']]
    assert sum(s['errors'] for s in errors) == 2


def test_steady_predict_and_k_function_lines_with_two_models_and_row_changes(models):
    from keras import backend as K
    a, b = models['dense'], keras.models.Sequential([layers.Dense(2, input_shape=(32,))])
    fa = K.function([a.input], [a.output])
    fb = K.function([b.input], [b.output])
    X = inputs_for('dense', 400)
    n = S.SAMPLE_CALLS + 60

    def loop():
        out = []
        for i in range(n):
            rows = _rows(i)
            for m, f in ((a, fa), (b, fb)):
                out.append(m.predict(np.array(X[i:i + rows])))
                out.append(f([np.array(X[i:i + rows])])[0])
        return out
    expected = loop()
    kfp.patch(report=True)
    got = loop()
    for g, e in zip(got, expected):
        assert_same(g, e)
    for offset in (5, 6):
        _assert_two_sites_with_every_call(loop.__code__.co_firstlineno + offset, n)


def test_zero_dimensional_inputs_as_plain(models):
    # A 0-d feed (a learning rate, a temperature) reached the fresh-rows sampler, whose
    # len() raised TypeError into the caller after the call had run.
    import tensorflow as tf
    from keras import backend as K
    p = K.placeholder(shape=())
    f = K.function([p], [p * 2.0])
    doubled = p * 2.0
    sess = K.get_session()
    lr = np.array(0.5, 'float32')

    def loop():
        return [f([lr])[0] for _ in range(6)] + [sess.run(doubled, {p: lr}) for _ in range(6)]
    expected = loop()
    kfp.patch(report=True)
    got = loop()
    assert [float(g) for g in got] == [float(e) for e in expected]
    assert all(s['errors'] == 0 for s in kfp.report()['sites'])


def test_a_finished_sample_holds_no_frames(models):
    # The span check holds the frames of a site's previous call; a sample that ends
    # before that check is done (calls of more than 64 rows) must let them go.
    import gc
    import weakref
    X = inputs_for('dense', 100)
    kfp.patch(report=True)

    def loop(plan):
        m = keras.models.Sequential([layers.Dense(3, input_shape=(32,))])
        inp = np.array(X)
        for n in plan:
            m.predict(inp[:n])
        return weakref.ref(m), weakref.ref(inp)
    refs = loop([1] + [100] * (S.SAMPLE_CALLS + 5))
    gc.collect()
    assert [r() for r in refs] == [None, None]


def test_steady_announced_calls_while_other_sites_sample(models, monkeypatch):
    # Sites of one call each (Keras' own variable initialisation) sample for ever: the
    # Session.run and K.function sites of a loop still take their usual path.
    from keras import backend as K
    model = models['dense']
    sess = K.get_session()
    f = K.function([model.input], [model.output])
    X = inputs_for('dense', 40)
    kfp.patch(report=True)
    model.predict(X[:1]); model.predict(X[:2])  # noqa: E702 - sites left sampling
    assert S.sampling_count > 0
    n = S.SAMPLE_CALLS + 40
    rows = [np.array(X[i % 40:i % 40 + 1]) for i in range(n)]
    whole = _Counting(lambda depth, real=announced._announced_after: real)
    monkeypatch.setattr(announced, '_announced_after', lambda *a: whole()(*a))
    a = [sess.run(model.output, {model.input: r}) for r in rows]; run_line = line()  # noqa
    b = [f([r])[0] for r in rows]
    assert_same(np.concatenate(a), unpatched_predict(model, np.concatenate(rows)))
    assert_same(np.concatenate(b), unpatched_predict(model, np.concatenate(rows)))
    # Calls looked at whole: each site's sample and its first steady call, not the rest.
    assert whole.calls <= 2 * (S.SAMPLE_CALLS + 4), whole.calls


def test_reasons_and_rows_of_calls_left_to_keras_after_errors(models):
    # Calls Keras rejects (counted as errors) between calls left to Keras for a reason:
    # each site's reasons are the reasons of its own calls left to Keras, before and after
    # its sample; a call of 0 rows counts 0 rows. Results and errors as plain Keras'.
    model = models['dense']
    X = inputs_for('dense', 8)
    bad = np.zeros((1, 5), 'float32')
    n = S.SAMPLE_CALLS + 40

    def loop():
        out = []
        for i in range(n):
            for x, kw in ((X[:1], {}), (bad, {}), (X[:1], {'verbose': 1}), (X[:0], {})):
                try:
                    out.append(model.predict(x, **kw))
                except Exception as exc:  # noqa: BLE001 - compared with plain Keras'
                    out.append((type(exc), str(exc)))
        return out
    expected = loop()
    kfp.patch(report=True)
    assert_same_outcomes(loop(), expected)
    here = loop.__code__.co_firstlineno + 5
    s = site_at(here)
    assert s['calls'] == 4 * n and s['errors'] == n, s
    assert s['rows'] == 2 * n, s            # (1 + 1 + 0 rows per round, errors aside)
    assert s['keras_reasons'] == {'verbose, steps or callbacks': n, 'empty input': n}, s


def test_reasons_of_calls_left_to_keras_before_the_report_are_not_counted(models):
    model = models['dense']
    X = inputs_for('dense', 4)
    kfp.patch()
    for _ in range(3):
        model.predict(X[:1], verbose=1)     # left to Keras before the report is on
    kfp.patch(report=True)
    y = model.predict(X[:0]); here = line()  # noqa: E702
    assert_same(y, unpatched_predict(model, X[:0]))
    assert site_at(here)['keras_reasons'] == {'empty input': 1}


def test_calls_from_a_thread_with_no_python_frame(models):
    # A C-level thread's target calling predict and Session.run (no Python frame, so no
    # call site): plain Keras' and TF's answers, nothing recorded (it once raised).
    import _thread
    import functools
    import time
    from keras import backend as K
    model = models['dense']
    sess = K.get_session()
    X = inputs_for('dense', 2)
    expected = [unpatched_predict(model, X), sess.run(model.output, {model.input: X})]
    kfp.patch(report=True)
    got = []
    _thread.start_new_thread(got.extend, (map(model.predict, [X]),))
    _thread.start_new_thread(got.extend, (map(functools.partial(sess.run, model.output),
                                              [{model.input: X}]),))
    deadline = time.time() + 60
    while len(got) < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert len(got) == 2, 'a call raised (or hung) in the frameless thread'
    for g in got:
        assert_same(np.asarray(g), expected[0])
