"""Session.run served by cached callables, against plain TensorFlow in the same process.

Every scenario runs once with the original (unwrapped) ``BaseSession.run`` and three times
patched (the first call of a signature goes to the original, later ones to the cache):
same result types, nesting, dtypes, values, and the same exception type and message.
"""
import collections
import contextlib
import gc
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest
import tensorflow as tf
import keras
from keras import backend as K
from keras import layers
from tensorflow.python.client import session as tf_session

import keras_fastpredict as kfp
from keras_fastpredict.adapters import session_run
from keras_fastpredict.engine import hooks, ways
from conftest import (counting_embedding_model, inputs_for, raised, run_in_threads,
                      unpatched_predict)

tf1 = tf.compat.v1
_run = tf_session.BaseSession.__dict__['run']
PLAIN_RUN = getattr(_run, '__wrapped__', _run)
NT = collections.namedtuple('NT', 'a b')


def rss_mb():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024.0


def plain(sess, *args, **kwargs):
    """Plain TensorFlow's answer, whatever the patch state."""
    return PLAIN_RUN(sess, *args, **kwargs)


def outcome(fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - exceptions are compared too
        return ('raised', type(exc), str(exc))


def assert_identical(got, expected):
    """Same type all the way down, same dtypes, shapes and values (bit for bit)."""
    assert type(got) is type(expected), (type(got), type(expected))
    if isinstance(expected, np.ndarray):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
    elif isinstance(expected, dict):
        assert list(got) == list(expected)
        for k in expected:
            assert_identical(got[k], expected[k])
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert_identical(g, e)
    else:
        assert got == expected


@pytest.fixture(scope='module')
def g():
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, (None, 3), name='x')
        n = tf1.placeholder(tf.int32, (), name='n')
        flag = tf1.placeholder(tf.bool, (), name='flag')
        idx = tf1.placeholder(tf.int32, (None,), name='idx')
        text = tf1.placeholder(tf.string, (), name='text')
        dflt = tf1.placeholder_with_default(tf.constant(2.0), (), name='dflt')
        sp = tf1.sparse_placeholder(tf.float32, name='sp')
        y = tf.identity(x * 2 + 1, name='y')
        s = tf.reduce_sum(y, name='s')
        k = tf.cast(n, tf.float32) * s * dflt
        b = tf.logical_and(flag, s > 0)
        gathered = tf.gather(tf.constant([1., 2., 3.]), idx)
        noop = tf.no_op(name='noop')
        v = tf1.Variable(1.0, name='v')
        counter = tf1.Variable(0, name='counter')
        bump = tf1.assign_add(counter, 1)
        noise = tf1.random_uniform((2,)) + s
        handle = tf1.get_session_handle(s)
        sparse_sum = tf1.sparse_reduce_sum(sp)
        init = tf1.global_variables_initializer()
    sess = tf1.Session(graph=graph)
    plain(sess, init)
    ns = collections.namedtuple('G', 'graph sess x n flag idx text dflt sp y s k b gathered '
                                     'noop v counter bump noise handle sparse_sum')
    yield ns(graph, sess, x, n, flag, idx, text, dflt, sp, y, s, k, b, gathered, noop, v,
             counter, bump, noise, handle, sparse_sum)
    sess.close()


X = np.arange(6, dtype='float32').reshape(2, 3)


def scenarios(g):
    """(label, fetches, feed_dict): every fetch and feed form, and errors."""
    return [
        ('tensor', g.y, {g.x: X}),
        ('names', 'y:0', {'x:0': X}),
        ('list', [g.y, g.s], {g.x: X}),
        ('tuple', (g.y, g.s), {g.x: X}),
        ('namedtuple', NT(g.y, g.s), {g.x: X}),
        ('dict', {'a': g.y, 'b': [g.s, g.noop]}, {g.x: X}),
        ('ordered dict', collections.OrderedDict([('b', g.s), ('a', g.y)]), {g.x: X}),
        ('nested', [g.y, {'p': (g.s, NT(g.y, 's:0'))}], {g.x: X}),
        ('duplicates', [g.y, g.y, g.s, 'y:0'], {g.x: X}),
        ('op in list', [g.y, g.noop], {g.x: X}),
        ('op alone', g.noop, {g.x: X}),
        ('op name', 'noop', {}),
        ('scalar (numpy type)', g.s, {g.x: X}),
        ('bool scalar', g.b, {g.x: X, g.flag: True}),
        ('list feed', g.s, {g.x: X.tolist()}),
        ('float64 feed cast', g.s, {g.x: X.astype('float64')}),
        ('int feed cast', g.s, {g.x: X.astype('int64')}),
        ('python int scalar', g.k, {g.x: X, g.n: 3}),
        ('numpy int scalar', g.k, {g.x: X, g.n: np.int64(3)}),
        ('bool into int', g.k, {g.x: X, g.n: True}),
        ('placeholder with default fed', g.k, {g.x: X, g.n: 2, g.dflt: 0.5}),
        ('feed key by name, mixed', [g.k], {'x:0': X, g.n: 2}),
        ('empty list', [], {}),
        # Errors: TF's own type and message.
        ('int too large', g.k, {g.x: X, g.n: 2 ** 40}),
        ('wrong shape', g.s, {g.x: X[:, :2]}),
        ('wrong rank', g.s, {g.x: X[None]}),
        ('string into float', g.s, {g.x: 'abc'}),
        ('missing placeholder', g.s, {}),
        ('tensor as feed value', g.s, {g.x: g.y}),
        ('unknown feed name', g.s, {'nope:0': X}),
        ('unknown fetch name', 'nope:0', {g.x: X}),
        ('None fetch', None, {}),
        ('fetch fed', g.y, {g.y: X}),
        ('runtime error after validation', g.gathered, {g.idx: [5]}),
        ('runtime ok', g.gathered, {g.idx: [2, 0]}),
        # Left to TF untouched.
        ('string feed', g.text, {g.text: 'hello'}),
        ('variable fetched', g.v, {}),
        ('feed a variable', g.s * g.v, {g.x: X, g.v: 3.0}),
        ('feed a non-placeholder', g.s, {g.y: X}),
        ('sparse feed', g.sparse_sum, {g.sp: tf1.SparseTensorValue([[0, 0]], [2.0], [2, 2])}),
        ('feed dict not a dict', g.s, [(g.x, X)]),
    ]


def test_every_form_equals_plain_tf(g):
    labels = []
    for label, fetches, feed in scenarios(g):
        expected = outcome(lambda: plain(g.sess, fetches, feed))
        with kfp.patched():
            got = [outcome(lambda: g.sess.run(fetches, feed)) for _ in range(3)]
        for result in got:
            assert_identical(result, expected)
        labels.append((label, expected[0] == 'raised' if type(expected) is tuple else False))
    assert sum(e for _, e in labels) >= 10        # the error cases did raise


def test_keyword_forms_options_and_run_metadata(g):
    options = tf1.RunOptions(trace_level=tf1.RunOptions.FULL_TRACE)
    expected = plain(g.sess, g.s, {g.x: X})
    with kfp.patched():
        for _ in range(3):
            assert_identical(g.sess.run(fetches=g.s, feed_dict={g.x: X}), expected)
            assert_identical(g.sess.run(g.s, feed_dict={g.x: X}), expected)
            meta = tf1.RunMetadata()
            assert_identical(g.sess.run(g.s, {g.x: X}, options=options, run_metadata=meta),
                             expected)
            assert meta.step_stats.dev_stats          # the original filled it
        assert raised(g.sess.run, g.s, {g.x: X}, nonsense=1) == raised(
            plain, g.sess, g.s, {g.x: X}, nonsense=1)


def test_cached_calls_skip_session_run(g, monkeypatch):
    runs = _counting_tf_runs(monkeypatch)
    with kfp.patched():
        for i in range(10):
            g.sess.run([g.y, g.s], {g.x: X + i})
        assert len(runs) == 1                   # the first call validated, 9 were cached
        g.sess.run([g.y, g.s], {g.x: np.zeros((5, 3), 'float32')})
        assert len(runs) == 2                   # a new shape: validated by the original
        g.sess.run([g.y, g.s], {g.x: np.ones((5, 3), 'float32')})
        assert len(runs) == 2


def test_each_call_runs_exactly_once(g):
    # A variable bumped by each run: the cache must never run anything twice (errors
    # included), and results must be the counter's successive values.
    start = plain(g.sess, g.counter)
    with kfp.patched():
        seen = [g.sess.run(g.bump) for _ in range(20)]
        seen += [g.sess.run([g.bump, g.noop])[0] for _ in range(5)]
    assert [int(s) for s in seen] == list(range(start + 1, start + 26))
    assert plain(g.sess, g.counter) == start + 25


def test_pure_reads_leave_pending_work_alone_and_writes_settle_it(g):
    gen = hooks.state.generation
    with kfp.patched():
        for _ in range(5):
            g.sess.run(g.s, {g.x: X})
        first = hooks.state.generation
        assert first > gen                      # the first (original) call settled work
        for _ in range(5):
            g.sess.run(g.s, {g.x: X})           # pure, cached: nothing to settle
        assert hooks.state.generation == first
        for _ in range(3):
            g.sess.run(g.bump)                  # writes a variable
            g.sess.run(g.noise, {g.x: X})       # a random draw: a side effect
            g.sess.run([g.s, g.noop], {g.x: X})  # an operation fetched
        assert hooks.state.generation >= first + 9


def test_closed_session_and_release(g):
    graph = g.graph
    sess = tf1.Session(graph=graph)
    with kfp.patched():
        for _ in range(3):
            sess.run(g.y, {g.x: X})
        cache = sess.__dict__[session_run._ATTR]
        entry = next(iter(cache.entries.values()))
        runner_ref = weakref.ref(entry.runner)
        del cache, entry
        sess.close()
        assert session_run._ATTR not in sess.__dict__
        gc.collect()
        assert runner_ref() is None             # the callables went with the cache
        expected = raised(plain, sess, g.y, {g.x: X})
        assert expected[0] is RuntimeError
        for _ in range(2):
            assert raised(sess.run, g.y, {g.x: X}) == expected
        # Closed and replaced by a new session on the same graph.
        sess = tf1.Session(graph=graph)
        for _ in range(3):
            assert_identical(sess.run(g.y, {g.x: X}), plain(g.sess, g.y, {g.x: X}))
        sess_ref = weakref.ref(sess)
        cache_ref = weakref.ref(sess.__dict__[session_run._ATTR])
        del sess
        gc.collect()
    assert sess_ref() is None and cache_ref() is None     # nothing keeps a session alive


_FREED_SCRIPT = """
import gc, sys, weakref
import numpy as np, keras, tensorflow as tf
from keras import backend as K, layers
if sys.argv[1] == 'patched':
    import keras_fastpredict as kfp
    kfp.patch()
def make():
    graph = tf.compat.v1.Graph()
    with graph.as_default():
        sess = tf.compat.v1.Session(graph=graph)
        K.set_session(sess)
        inp = layers.Input((4,))
        model = keras.models.Model(inp, layers.Dense(3)(inp))
        sess.run(tf.compat.v1.global_variables_initializer())
        for _ in range(3):
            sess.run(model.output, {model.input: np.ones((1, 4), 'float32')})
    return weakref.ref(sess), weakref.ref(graph)
refs = make()
K.clear_session()
for _ in range(2):
    gc.collect()
    print([r() is None for r in refs])
"""


def test_session_of_a_model_loop_freed_as_plain(tmp_path):
    # The cache on the session held the model's entry, which holds the session: a cycle
    # that one collection did not free. The graph waits for one more collection: the
    # engine's entry for the model holds it until the model's finalizer drops the entry
    # (docs/limits.md). In fresh processes: K.clear_session() resets the process.
    script = tmp_path / 'freed.py'
    script.write_text(_FREED_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, TF_CPP_MIN_LOG_LEVEL='3')
    plain, patched = [
        subprocess.run([sys.executable, str(script), mode], env=env, cwd=str(tmp_path),
                       stdout=subprocess.PIPE, check=True).stdout.decode().split('\n')[-3:-1]
        for mode in ('plain', 'patched')]
    assert plain == ['[True, True]', '[True, True]']
    assert patched[0].startswith('[True,') and patched[1] == plain[1], patched


def test_several_sessions_on_one_graph(g):
    a, b = tf1.Session(graph=g.graph), tf1.Session(graph=g.graph)
    with g.graph.as_default():
        set_v = tf1.assign(g.v, tf1.placeholder_with_default(0.0, ()))
    plain(a, set_v.op, {set_v.op.inputs[1]: 2.0})
    plain(b, set_v.op, {set_v.op.inputs[1]: -3.0})
    fetch = g.s * g.v
    expected = {a: plain(a, fetch, {g.x: X}), b: plain(b, fetch, {g.x: X})}
    assert expected[a] != expected[b]
    with kfp.patched():
        for _ in range(4):
            for sess in (a, b):
                assert_identical(sess.run(fetch, {g.x: X}), expected[sess])
    a.close()
    b.close()


def test_threads_calling_one_session(g):
    rows = np.random.RandomState(0).rand(8, 40, 3).astype('float32')
    expected = [[plain(g.sess, [g.y, g.s], {g.x: r[i:i + 1]}) for i in range(40)] for r in rows]
    got = [None] * 8

    def work(t):
        got[t] = [g.sess.run([g.y, g.s], {g.x: rows[t][i:i + 1]}) for i in range(40)]

    with kfp.patched():
        errors = run_in_threads(8, work)
    assert not errors
    for t in range(8):
        for a, e in zip(got[t], expected[t]):
            assert_identical(a, e)


def test_partial_runs_and_tensor_handles_untouched(g):
    with kfp.patched():
        h = g.sess.partial_run_setup([g.y, g.s], [g.x])
        assert_identical(g.sess.partial_run(h, g.y, {g.x: X}), plain(g.sess, g.y, {g.x: X}))
        for _ in range(3):
            handle = g.sess.run(g.handle, {g.x: X})
            assert type(handle).__name__ == 'TensorHandle'
            assert handle.eval() == plain(g.sess, g.s, {g.x: X})


def test_cache_is_bounded_and_adds_no_ops(g):
    ops_before = len(g.graph.get_operations())
    with kfp.patched():
        for i in range(session_run.MAX_ENTRIES * 2 + 5):
            # A new signature every call (a different fetch list each time).
            g.sess.run([g.y] * (i % 300 + 1), {g.x: X})
        cache = g.sess.__dict__[session_run._ATTR]
        assert len(cache.entries) <= session_run.MAX_ENTRIES
    assert len(g.graph.get_operations()) == ops_before


# -- Keras models: the engine path ------------------------------------------------------------

def _keras_loop(sess, model, X, n, phase=None):
    feed = {}
    out = []
    for i in range(n):
        feed = {model.input: X[i][None]}
        if phase is not None:
            feed[K.learning_phase()] = phase
        out.append(sess.run(model.output, feed))
    return np.concatenate(out)


def test_known_model_uses_the_engine(models):
    model = models['dense']
    sess = K.get_session()
    x = inputs_for('dense', 300)
    expected = unpatched_predict(model, x)
    with kfp.patched():
        got = _keras_loop(sess, model, x, 300)
        got_phase = _keras_loop(sess, model, x, 300, phase=0)
    for result in (got, got_phase):
        np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)
    stats = kfp.stats(model)
    assert stats['readahead_hits'] > 400 and stats['fast_calls'] >= 590


def test_known_model_result_shapes(models):
    model = models['multi_out']
    sess = K.get_session()
    o1, o2 = model.outputs
    x = inputs_for('multi_out', 6)
    fetch_forms = [[o2, o1], {'b': o1, 'a': [o2, o2]}, NT(o1, o2), o2]
    for fetches in fetch_forms:
        expected = [plain(sess, fetches, {model.input: x[i:i + 1]}) for i in range(6)]
        with kfp.patched():
            got = [sess.run(fetches, {model.input: x[i:i + 1]}) for i in range(6)]
        for a, e in zip(got, expected):
            assert type(a) is type(e)
            flat_a, flat_e = tf.nest.flatten(a), tf.nest.flatten(e)
            for p, q in zip(flat_a, flat_e):
                assert type(p) is np.ndarray and p.shape == q.shape
                np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6)
    assert kfp.stats(model)['fast_calls'] >= 4 * 5


def test_known_model_deferred_in_batching(models):
    model = models['multi_in']
    sess = K.get_session()
    a, b = inputs_for('multi_in', 50)
    expected = unpatched_predict(model, [a, b])
    with kfp.patched():
        with kfp.batching():
            pending = [sess.run(model.output, {model.inputs[0]: a[i:i + 1].copy(),
                                               model.inputs[1]: b[i:i + 1].copy()})
                       for i in range(50)]
            assert type(pending[-1]) is kfp.DeferredArray
        got = np.concatenate([np.asarray(p) for p in pending])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert kfp.stats(model)['deferred'] >= 45


def _counting_tf_runs(monkeypatch):
    runs = []
    original = tf_session.BaseSession.__dict__['_call_tf_sessionrun']

    def counting(self, *args):
        runs.append(1)
        return original(self, *args)
    monkeypatch.setattr(tf_session.BaseSession, '_call_tf_sessionrun', counting)
    return runs


def _fresh_dense():
    model = keras.models.Sequential([layers.Dense(16, activation='relu', input_shape=(6,)),
                                     layers.Dense(3)])
    return model, K.get_session()           # (its variables initialised, unpatched)


def test_first_call_of_a_known_model_makes_no_run_of_tf_own(monkeypatch):
    # The first call of a model's signature (and of new feed shapes) goes down the model
    # path once its feeds pass Session.run's own checks: TF's run would make an executor of
    # its own besides the model's callable. Results as plain TF's.
    model, sess = _fresh_dense()
    x = np.random.RandomState(4).rand(12, 6).astype('float32')
    expected = [plain(sess, model.output, {model.input: x[i:i + 1]}) for i in range(6)]
    expected.append(plain(sess, model.output, {model.input: x[6:]}))
    runs = _counting_tf_runs(monkeypatch)
    with kfp.patched():
        got = [sess.run(model.output, {model.input: x[i:i + 1]}) for i in range(6)]
        got.append(sess.run(model.output, {model.input: x[6:]}))    # new shapes
    assert runs == []
    for a, e in zip(got, expected):
        assert type(a) is np.ndarray and a.shape == e.shape and a.dtype == e.dtype
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)
    assert kfp.stats(model)['fast_calls'] == 7


def test_bad_feeds_of_a_known_model_raise_what_tf_raises(monkeypatch):
    # The checks Session.run makes before it runs, on a first call, on a later call of new
    # shapes, and after good calls: where they fail, TF's run answers (and raises).
    model, sess = _fresh_dense()
    x = np.random.RandomState(6).rand(3, 6).astype('float32')
    calls = [{model.input: x[:, :5]}, {model.input: x[:1]}, {model.input: x[None]},
             {model.input: 'abc'}, {model.input: x[:1]}, {model.input: np.ones((1, 7))},
             {model.input: x[:2].astype('float64')}, {model.input: x.tolist()},
             {model.input: x[:1, :, None]}, {model.input: x[:1]}]
    phase = K.learning_phase()      # (its checks come before its value is read)
    calls += [{model.input: x[:1], phase: [0, 1]}, {model.input: x[:1], phase: np.zeros(1)},
              {model.input: x[:1], phase: 0}, {model.input: x[:2, :4], phase: 0}]
    expected = [outcome(lambda: plain(sess, model.output, feed)) for feed in calls]
    with kfp.patched():
        got = [outcome(lambda: sess.run(model.output, feed)) for feed in calls]
    assert [type(e) for e in expected].count(tuple) == 8        # (the test sees errors)
    for a, e in zip(got, expected):
        if type(e) is tuple:
            assert a == e
        else:
            np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


def test_a_run_error_on_the_first_call_of_a_known_model_is_tf_own(monkeypatch):
    # An index out of an Embedding's range fails in TF's run: on the first call (model
    # path), TF's own run then raises its own error; a good call after it is served.
    model = keras.models.Sequential([layers.Embedding(10, 4, input_length=3),
                                     layers.Flatten(), layers.Dense(2)])
    sess = K.get_session()
    bad, good = np.array([[1, 2, 12]]), np.array([[1, 2, 3]])
    expected = [outcome(lambda: plain(sess, model.output, {model.input: v}))
                for v in (bad, good, bad)]
    with kfp.patched():
        got = [outcome(lambda: sess.run(model.output, {model.input: v}))
               for v in (bad, good, bad)]
    assert type(expected[0]) is tuple and expected[0][1].__name__ == 'InvalidArgumentError'
    assert got[0] == expected[0] and got[2] == expected[2]
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-5, atol=1e-6)


def test_training_phase_and_stateful_models_not_on_the_engine(models):
    model = models['dropout']
    sess = K.get_session()
    x = inputs_for('dropout', 20)
    with kfp.patched():
        for i in range(20):
            out = sess.run(model.output, {model.input: x[i:i + 1], K.learning_phase(): 1})
            assert out.shape == (1, 2)
        assert kfp.stats(model)['calls'] == 0          # training phase: plain cached runs
        inference = [sess.run(model.output, {model.input: x[i:i + 1],
                                             K.learning_phase(): 0}) for i in range(20)]
    np.testing.assert_allclose(np.concatenate(inference), unpatched_predict(model, x),
                               rtol=1e-5, atol=1e-6)
    stateful = keras.models.Sequential([
        layers.LSTM(4, stateful=True, batch_input_shape=(1, 3, 2)), layers.Dense(1)])
    xs = np.random.RandomState(3).rand(5, 1, 3, 2).astype('float32')
    sess = K.get_session()                  # initialises the new model's variables
    expected = [plain(sess, stateful.output, {stateful.input: v}) for v in xs]
    with kfp.patched():
        got = [sess.run(stateful.output, {stateful.input: v}) for v in xs]
    for p, q in zip(got, expected):
        np.testing.assert_allclose(p, q, rtol=1e-6)     # a plain run updates no state


def test_user_sessions(models):
    # tf.Session() made by the script, given to Keras with set_session, as_default, and
    # InteractiveSession: the model path where Keras uses that session, a plain cached
    # callable elsewhere; results as plain TF's on each.
    previous = K.get_session()
    graph = tf.Graph()
    try:
        with graph.as_default():
            model = keras.models.Sequential([layers.Dense(8, input_shape=(4,)), layers.Dense(3)])
            init = tf1.global_variables_initializer()
        x = np.random.RandomState(5).rand(40, 4).astype('float32')
        made = tf1.Session(graph=graph)
        plain(made, init)
        expected = np.concatenate([plain(made, model.output, {model.input: x[i:i + 1]})
                                   for i in range(40)])
        with kfp.patched():
            # Not Keras' session: the cached callable, no engine.
            got = _keras_loop(made, model, x, 40)
            np.testing.assert_allclose(got, expected, rtol=1e-6)
            assert kfp.stats(model)['calls'] == 0
            K.set_session(made)
            got = _keras_loop(made, model, x, 40)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
            assert kfp.stats(model)['readahead_hits'] > 20
            with made.as_default():
                np.testing.assert_allclose(_keras_loop(made, model, x, 40), expected,
                                           rtol=1e-5, atol=1e-6)
            made.close()
            interactive = tf1.InteractiveSession(graph=graph)
            try:
                plain(interactive, init)
                expected_i = np.concatenate([plain(interactive, model.output,
                                                   {model.input: x[i:i + 1]})
                                             for i in range(40)])
                np.testing.assert_allclose(_keras_loop(interactive, model, x, 40), expected_i,
                                           rtol=1e-5, atol=1e-6)
            finally:
                interactive.close()
    finally:
        K.set_session(previous)


def test_memory_flat_over_many_cached_calls(g):
    # The soak (benchmarks/soak.py --mode session-run) runs a million; 60,000 here.
    feed_rows = np.random.RandomState(1).rand(500, 3).astype('float32')
    ops = len(g.graph.get_operations())
    with kfp.patched():
        for i in range(10000):
            g.sess.run([g.y, g.s], {g.x: feed_rows[i % 500][None]})
        gc.collect()
        start = rss_mb()
        for i in range(50000):
            g.sess.run([g.y, g.s], {g.x: feed_rows[i % 500][None]})
        gc.collect()
        grown = rss_mb() - start
    assert grown < 8, 'RSS grew %.1f MB over 50,000 cached calls' % grown
    assert len(g.graph.get_operations()) == ops


def test_a_feed_that_does_not_convert_raises_what_tf_raises_first():
    """TF checks a closed session first, then each feed in turn (an earlier feed's shape
    before a later feed's conversion): a value that does not convert leaves the call to
    TF, whatever the signature's state."""
    import numpy as np
    import tensorflow as tf
    from conftest import raised

    def outcomes(patch):
        graph = tf.Graph()
        with graph.as_default():
            x = tf.placeholder(tf.float32, (None, 3), name='x')
            z = tf.placeholder(tf.float32, (None, 3), name='z')
            y = x + z
            sess = tf.Session(graph=graph)
            if patch:
                kfp.patch()
            good = {x: np.ones((1, 3)), z: np.ones((1, 3))}
            found = [sess.run(y, good).tolist(), sess.run(y, good).tolist(),
                     raised(sess.run, y, {x: np.ones((2, 4)), z: [[1, 2], [3]]}),
                     raised(sess.run, y, {x: np.ones((1, 3)), z: [[1, 2], [3]]})]
            sess.close()
            found.append(raised(sess.run, y, {x: [[1, 2], [3]], z: np.ones((1, 3))}))
            kfp.unpatch()
            return found

    assert outcomes(True) == outcomes(False)


def test_a_thread_calling_while_another_binds_the_model_entry(monkeypatch):
    """A second thread's call arriving while the first binds a signature to its model's
    compiled entry gets plain TensorFlow's answer (it once read a half-bound entry and
    raised AttributeError: model_pure)."""
    model = keras.Sequential([layers.Dense(4, input_shape=(3,))])
    sess = K.get_session()
    x = np.random.RandomState(1).rand(3, 3).astype('float32')
    expected = [plain(sess, model.output, {model.input: x[i:i + 1]}) for i in range(3)]
    seen = {}
    is_pure = session_run._Entry.is_pure

    def binding(entry, phase_fed_true):
        # The first model-path call of this signature: another thread calls meanwhile.
        if not seen and sys._getframe(1).f_code.co_name == '_model_entry':
            seen['started'] = True
            run_in_threads(1, lambda _: seen.__setitem__('other', outcome(
                lambda: sess.run(model.output, {model.input: x[2:3]}))))
        return is_pure(entry, phase_fed_true)

    monkeypatch.setattr(session_run._Entry, 'is_pure', binding)
    with kfp.patched():
        got = [sess.run(model.output, {model.input: x[i:i + 1]}) for i in range(2)]
    assert seen.get('started'), 'the model path was not taken'
    assert_identical(seen['other'], expected[2])
    for a, e in zip(got, expected):
        assert_identical(a, e)


def test_a_thread_calling_while_another_finds_no_model(g, monkeypatch):
    """A signature of no Keras model: a second thread's first fast call, arriving after the
    first thread decided to look for a model and before it looked, gets plain TF's answer
    (it once called the unset model reference and raised TypeError)."""
    expected = plain(g.sess, g.y, {g.x: X})
    seen = {}
    bind = session_run.SessionRunAdapter.__dict__['_model_entry'].__func__

    def binding(entry, session):
        if not seen:
            seen['started'] = True
            run_in_threads(1, lambda _: seen.__setitem__(
                'other', outcome(lambda: g.sess.run(g.y, {g.x: X}))))
        return bind(entry, session)

    monkeypatch.setattr(session_run.SessionRunAdapter, '_model_entry', staticmethod(binding))
    with kfp.patched():
        g.sess.run(g.y, {g.x: X})           # the signature and its shapes, checked by TF
        got = outcome(lambda: g.sess.run(g.y, {g.x: X}))
    assert seen.get('started'), 'the model path was not looked for'
    assert_identical(seen['other'], expected)
    assert_identical(got, expected)


def test_a_thread_that_waited_for_another_threads_model_scan_finds_its_model(monkeypatch):
    """Two threads' first fast calls of two new models' outputs: the one that waited while
    the other scanned for models finds its model among those scanned (it once marked its
    signature as no model's for good), with plain TF's answers."""
    import threading
    from keras_fastpredict.adapters import model_path

    def dense(seed):
        np.random.seed(seed)
        model = keras.Sequential([layers.Dense(8, input_shape=(4,)), layers.Dense(3)])
        model._make_predict_function()
        return model
    m1 = dense(1)
    sess = K.get_session()
    v = np.random.RandomState(0).rand(2, 4).astype('float32')
    seen = {}
    match = model_path._match

    def matching(model, *args):
        # Thread A's first look (at the models known before m2 and m3): B scans meanwhile.
        if not seen and threading.current_thread() is main:
            seen['started'] = True
            run_in_threads(1, lambda _: seen.__setitem__(
                'B', outcome(lambda: sess.run(m3.output, {m3.input: v}))))
        return match(model, *args)

    main = threading.current_thread()
    with kfp.patched():
        sess.run(m1.output, {m1.input: v})
        sess.run(m1.output, {m1.input: v})  # m1 is known from here on
        m2, m3 = dense(2), dense(3)
        K.get_session()                     # (their variables initialised, as Keras does)
        expected = {m: plain(sess, m.output, {m.input: v}) for m in (m2, m3)}
        # (First calls of m2's and m3's signatures: their feeds pass TF's checks, so the
        # model path is looked for at once.)
        monkeypatch.setattr(model_path, '_match', matching)
        got = outcome(lambda: sess.run(m2.output, {m2.input: v}))
        monkeypatch.setattr(model_path, '_match', match)
        before = kfp.stats(m2)['fast_calls']
        later = sess.run(m2.output, {m2.input: v})
        served = kfp.stats(m2)['fast_calls'] - before
    assert seen.get('started'), 'the model scan was not reached'
    np.testing.assert_allclose(got, expected[m2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(seen['B'], expected[m3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(later, expected[m2], rtol=1e-5, atol=1e-6)
    assert served == 1                  # on its model's path, not left off it for good


def test_models_made_while_patched_are_found_without_a_heap_scan(monkeypatch):
    """Each graph network is noted as Keras makes it: where every model of the process
    was made while patched (keras imported after patch(), as under the runner), a
    Session.run of a model's tensors finds it with no gc scan (20-60 ms, once, inside
    the loop), and a run of tensors of no model does not scan either."""
    from keras_fastpredict.adapters import model_path
    monkeypatch.setattr(model_path.noting, 'complete', True)
    monkeypatch.setattr(model_path, '_scan',
                        lambda: pytest.fail('scanned the heap for models'))
    sess = K.get_session()
    x = inputs_for('dense', 40)
    with kfp.patched():
        model = keras.models.Sequential([layers.Dense(16, activation='relu',
                                                      input_shape=(32,)), layers.Dense(3)])
        hidden = model.layers[0].output
        expected = unpatched_predict(model, x)
        expected_hidden = sess.run(hidden, {model.input: x})
        got = [sess.run(model.output, {model.input: np.array(x[i:i + 1])}) for i in range(40)]
        got_hidden = [sess.run(hidden, {model.input: np.array(x[i:i + 1])})
                      for i in range(40)]
    np.testing.assert_allclose(np.concatenate(got), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.concatenate(got_hidden), expected_hidden, rtol=1e-5,
                               atol=1e-6)
    assert kfp.stats(model)['fast_calls'] >= 39         # the model's engine served them


def test_noting_is_complete_only_for_models_made_since_import():
    """Patched after keras was imported (models may exist unnoted), or unpatched once
    (models made meanwhile go unnoted), the scan stays."""
    from keras_fastpredict.adapters import model_path
    kfp.patch()
    assert model_path.noting.complete is False
    model_path.noting.complete = True
    kfp.unpatch()
    assert model_path.noting.complete is False


# -- first calls of a known model, every form, against plain TF --------------------------------

def _two_input_model():
    np.random.seed(12)
    a, b = layers.Input((6,), name='fa'), layers.Input((4,), name='fb')
    h = layers.Dropout(0.5)(layers.concatenate([layers.Dense(8)(a), layers.Dense(8)(b)]))
    return keras.models.Model([a, b], [layers.Dense(2, name='fo1')(h),
                                       layers.Dense(3, name='fo2')(h)])


def _first_call_cases(model, lp):
    (a, b), (o1, o2) = model.inputs, model.outputs
    rs = np.random.RandomState(13)
    xa, xb = rs.rand(4, 6).astype('float32'), rs.rand(4, 4).astype('float32')
    nan = np.full((1, 6), np.nan, 'float32')
    return [
        ({'x': o1, 'y': [o2, o1]}, {a: xa[:1], b: xb[:1]}, {}),
        (NT(o2, o1), {a: xa[:2], b: xb[:2]}, {}),
        (collections.OrderedDict([('z', o2), ('a', o1)]), {a: xa[:1], b: xb[:1]}, {}),
        ((o1,), {a: xa[:1], b: xb[:1]}, {}),
        (['fo1/BiasAdd:0', o2], {'fa:0': xa[:3], 'fb:0': xb[:3]}, {}),
        (o1, {a: xa[:1], b: xb[:1], lp: 0}, {}),
        (o1, {a: xa[:1].tolist(), b: xb[:1].tolist(), lp: False}, {}),
        (o1, {a: xa[:2], b: xb[:2], lp: np.int64(0)}, {}),
        (o1, {a: xa[:2], b: xb[:3], lp: 0.0}, {}),                     # rows differ
        (o1, {a: xa[:1]}, {}),                                          # partial feed
        (o1, {a: xa[:1], b: xb[:1], model.layers[2].output: np.ones((1, 8), 'float32')}, {}),
        ([o1, o2], {a: xa[:0], b: xb[:0]}, {}),                         # batch 0
        ([o1, o1.op], {a: xa[:1], b: xb[:1]}, {}),
        (o1, {a: np.ones((1, 6), 'int64'), b: np.ones((1, 4), 'int32')}, {}),
        (o1, {a: xa[:1], b: xb[:1], lp: 2 ** 40}, {}),
        (o1, {a: nan, b: xb[:1]}, {}),
        (o1, {a: None, b: xb[:1]}, {}),
        (o1, {a: 'x', b: xb[:1]}, {}),
        (o1, {a: tf.constant(xa[:1]), b: xb[:1]}, {}),
        (o1, {a: xa[1:3], b: xb[1:3]}, {'run_metadata': tf1.RunMetadata()}),
        (o1, {a: xa[1:3], b: xb[1:3]}, {'options': tf1.RunOptions()}),
    ]


def _raised(result):
    return type(result) is tuple and len(result) == 3 and type(result[0]) is str


def _same_outcome(got, expected):
    if _raised(expected):
        assert got == expected
    else:
        assert type(got) is type(expected)
        if isinstance(expected, dict):
            assert list(got) == list(expected)
            got, expected = list(got.values()), list(expected.values())
        if isinstance(expected, (list, tuple)):
            assert len(got) == len(expected)
            for a, e in zip(got, expected):
                _same_outcome(a, e)
        elif isinstance(expected, np.ndarray):
            assert got.dtype == expected.dtype and got.shape == expected.shape
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        else:
            assert got == expected


def test_first_calls_of_a_known_model_in_every_form_as_plain_tf():
    # Each call the first of its signature (the cache cleared), fetches and feeds in every
    # form, errors included: the same results and errors as plain TF's.
    model = _two_input_model()
    sess = K.get_session()
    cases = _first_call_cases(model, K.learning_phase())
    expected = [outcome(lambda: plain(sess, f, d, **kw)) for f, d, kw in cases]
    got = []
    with kfp.patched():
        for f, d, kw in cases:
            session_run.clear()
            got.append(outcome(lambda: sess.run(f, d, **kw)))
    assert sum(_raised(e) for e in expected) == 6
    assert kfp.stats(model)['fast_calls'] == 10     # (first calls on the model path)
    for a, e in zip(got, expected):
        _same_outcome(a, e)


def _initialised(sess, model):
    return plain(sess, [tf1.is_variable_initialized(v) for v in model.weights])


def test_first_call_with_uninitialised_variables_raises_as_plain_tf():
    # A session the user made (as the default session: Keras' session then) and Keras' own
    # session made before the model: plain TF raises FailedPreconditionError, and
    # initialises nothing.
    def dense():
        return keras.models.Sequential([layers.Dense(5, input_shape=(6,)), layers.Dense(2)])
    x = np.ones((1, 6), 'float32')
    keras_session = K.get_session()
    results = []
    for patched in (False, True):
        run = (lambda s, *args: s.run(*args)) if patched else plain
        own = tf1.Session()
        with kfp.patched() if patched else contextlib.nullcontext():
            model = dense()
            with own.as_default():
                first = outcome(lambda: run(own, model.output, {model.input: x}))
            late = dense()                  # made after Keras' session initialised
            first_keras = outcome(lambda: run(keras_session, late.output, {late.input: x}))
        results.append((first, _initialised(own, model), first_keras,
                        _initialised(keras_session, late)))
        own.close()
    assert results[0][0][1].__name__ == 'FailedPreconditionError'
    assert results[0][2][1].__name__ == 'FailedPreconditionError'
    assert results[0][1] == results[0][3] == [False] * 4
    assert (results[1][1], results[1][3]) == (results[0][1], results[0][3])
    # (Which uninitialised variable TF names first varies from run to run, plain too.)
    for got in (results[1][0], results[1][2]):
        assert got[1].__name__ == 'FailedPreconditionError'
        assert got[2].startswith('Attempting to use uninitialized value dense_')


def test_first_calls_in_a_thread_on_another_graph_run_side_effects_as_plain_tf():
    # A model on a graph of its own with an op that counts its runs (before an Embedding
    # that fails on an index out of range): first calls from another thread, its default
    # graph not the model's, on that graph's session as the default session (Keras' then)
    # and on a session that is not Keras': results, errors and runs as plain TF's.
    graph, counter, model = counting_embedding_model()
    with graph.as_default():
        init = tf1.global_variables_initializer()
    sessions = [tf1.Session(graph=graph), tf1.Session(graph=graph)]
    for s in sessions:
        plain(s, init)
    calls = [np.array([[1, 2, 12]]), np.array([[1, 2, 3], [4, 5, 6]]), np.array([[7, 8, 9]]),
             np.array([[1, 2, 12]])]

    def loop(run, sess, default):
        results = []
        for v in calls:
            before = plain(sess, counter)
            with sess.as_default() if default else contextlib.nullcontext():
                results.append(outcome(lambda: run(sess, model.output, {model.input: v})))
            results.append(plain(sess, counter) - before)
        return results

    def in_thread(run, sess, default):
        out = []
        assert not run_in_threads(1, lambda t: out.append(loop(run, sess, default)))
        return out[0]
    patched_run = (lambda s, *args: s.run(*args))     # (the method at the time of the call)
    expected = [in_thread(plain, s, d) for s, d in zip(sessions, (True, False))]
    with kfp.patched():
        got = [in_thread(patched_run, s, d) for s, d in zip(sessions, (True, False))]
    assert _raised(expected[0][0]) and expected[0][1] == 1
    for g_, e_ in zip(got, expected):
        for a, e in zip(g_, e_):
            _same_outcome(a, e)
    # The default session's four calls on the model path (its op with side effects: a
    # failed run is raised from there, not run again by TF); the other session's on TF's.
    assert kfp.stats(model)['fast_calls'] == 4
    for s in sessions:
        s.close()


@pytest.mark.parametrize('way', ['sess.run', 'K.function'])
def test_a_finalized_graph_tries_keras_predict_function_once(way, monkeypatch):
    # A script that finalizes its graph (a leak guard, MonitoredSession) before its loop:
    # sess.run and K.function of the model's tensors work plain; Keras' predict function
    # cannot be built there, and the model path that needs it must give up once, not pay
    # the failed build on every call (found by review). Results as plain TF / Keras.
    model, sess = _fresh_dense()
    f = K.function([model.input], [model.output])
    X = np.random.RandomState(5).rand(20, 6).astype('float32')
    call = ((lambda x: sess.run(model.output, {model.input: x})) if way == 'sess.run'
            else (lambda x: f([x])[0]))
    sess.graph.finalize()
    try:
        expected = [call(X[i:i + 1]) for i in range(len(X))]         # unpatched
        predict_plain = raised(model.predict, X[:1])     # Keras cannot build it: raises
        tries = []
        real = type(model).__dict__.get('_make_predict_function') or \
            keras.engine.training.Model._make_predict_function

        def counted(self, *args, **kwargs):
            tries.append(1)
            return real(self, *args, **kwargs)
        monkeypatch.setattr(type(model), '_make_predict_function', counted)
        with kfp.patched():
            got = [call(X[i:i + 1]) for i in range(len(X))]
            loop_tries = len(tries)
            predict_patched = raised(model.predict, X[:1])   # (Keras' own try: one more)
    finally:
        sess.graph._unsafe_unfinalize()
    assert predict_patched == predict_plain and predict_plain is not None
    for g_, e in zip(got, expected):
        assert_identical(g_, e)
    assert loop_tries <= 1


def test_a_step_whose_targets_do_the_work_starts_on_the_pool():
    """Found by review of c92efb5: the runner judged a row's work from the fetched tensors
    alone, so ``sess.run([step, count])``, whose target op does a large product and fetches
    a scalar, counted as tiny and started in the caller's thread (where a large graph's runs
    can be slower, and its pool's callable is then bought too). Values as plain TF's."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf1.placeholder(tf.float32, (None, 512))
        w = tf1.Variable(np.eye(512, dtype='float32') / 512.0)
        total = tf1.Variable(0.0)
        step = tf1.assign_add(total, tf.reduce_sum(tf.matmul(tf.matmul(x, w), w))).op
        count = tf.reduce_sum(x)
        init = tf1.global_variables_initializer()
    rows = np.arange(2 * 512, dtype='float32').reshape(2, 512) / 512.0
    sessions = [tf1.Session(graph=graph) for _ in range(2)]
    for sess in sessions:
        plain(sess, init)
    expected = [plain(sessions[0], [step, count], {x: rows + i}) for i in range(4)]
    with kfp.patched():
        got = [sessions[1].run([step, count], {x: rows + i}) for i in range(4)]
        runner = next(iter(sessions[1].__dict__[session_run._ATTR].entries.values())).runner
        first = runner.ways.first
    for g_, e in zip(got, expected):
        assert_identical(g_, e)
    assert_identical(plain(sessions[1], total), plain(sessions[0], total))
    assert first == ways.POOL
    for sess in sessions:
        sess.close()
