"""The plain-cost estimate (keras_fastpredict/report/plain.py): measured where an extra run
changes nothing, never while our one-time work runs, timed again at the end of the sample.
Every result is compared with plain unpatched Keras."""
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from keras.engine import training

import keras_fastpredict as kfp
from conftest import assert_same, inputs_for, unpatched_predict
from keras_fastpredict.engine import hooks
from keras_fastpredict.report import frames, plain, sites as S
from report_support import kinds, line, site_at, recorder  # noqa: F401 (autouse)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_paths_and_plain_estimate(models):
    model = models['dense']
    X = inputs_for('dense', 64)
    kfp.patch(report=True)
    for i in range(40):
        y = model.predict(X[i:i + 1]); ra = line()  # noqa: E702
        assert_same(y, unpatched_predict(model, X[i:i + 1]))
    for i in range(10):
        model.predict(np.array(X[i:i + 1])); fast = line()  # noqa: E702
    with kfp.batching():
        ys = [model.predict(np.array(X[i:i + 1])) for i in range(8)]; dl = line()  # noqa: E702
    assert_same(np.concatenate(ys), unpatched_predict(model, X[:8]))
    model.predict(X[:5], verbose=1); kl = line()  # noqa: E702
    s = site_at(ra)
    assert s['paths']['readahead'] >= 35 and s['calls'] == 40 and s['rows'] == 40
    assert site_at(fast)['paths']['fast'] == 10
    assert site_at(dl)['paths']['deferred'] == 8
    k = site_at(kl)
    assert k['paths']['keras'] == 1 and k['keras_reasons'] == {'verbose, steps or callbacks': 1}
    assert kinds(k) == ['left_to_keras']
    for s in (site_at(ra), site_at(fast), k):
        assert s['plain_estimate'] == 'measured' and s['plain_estimate_s'] > 0
    # The estimate covers the site's calls (how fast they were is the benchmarks' matter).
    assert site_at(fast)['plain_estimate_calls'] == site_at(fast)['calls']


def test_plain_is_not_timed_while_our_one_time_work_runs_and_is_timed_again(models,
                                                                            monkeypatch):
    """Plain Keras timed while our own one-time work runs on another thread shares the
    cores with it (an LSTM's 1.5 ms call was timed at 2.6 ms): the calls wait for it, then
    count at the measured cost; at the end of the sample plain is timed again and the
    lower figure kept. Timings are the stub's, so the figures are exact."""
    model = models['dense']
    X = inputs_for('dense', 200)
    busy = [True]
    monkeypatch.setattr(plain, '_busy', lambda: busy[0])
    stub = iter([[3e-3] * 3, [1e-3] * 3])
    timed = []

    def fake_time(wrapped, args, kwargs):
        timed.append(1)
        return next(stub)
    monkeypatch.setattr(plain, '_time', fake_time)
    expected = [unpatched_predict(model, X[i:i + 1]) for i in range(200)]
    kfp.patch(report=True)
    for i in range(200):
        if i == 5:
            busy[0] = False
        y = model.predict(np.array(X[i:i + 1])); here = line()  # noqa: E702
        assert_same(y, expected[i])
    s = site_at(here)
    assert len(timed) == 2                  # waited 5 calls, timed, timed again once
    assert s['plain_estimate'] == 'measured' and s['plain_estimate_calls'] == 200
    assert s['plain_estimate_s'] == pytest.approx(200 * 1e-3)


def test_plain_is_timed_anyway_when_our_work_never_ends(models, monkeypatch):
    """A site does not wait for ever: after PLAIN_WAIT_CALLS calls, plain is timed."""
    model = models['dense']
    X = inputs_for('dense', 8)
    monkeypatch.setattr(plain, '_busy', lambda: True)
    monkeypatch.setattr(plain, 'PLAIN_WAIT_CALLS', 3)
    expected = [unpatched_predict(model, X[i:i + 1]) for i in range(8)]
    kfp.patch(report=True)
    for i in range(8):
        y = model.predict(np.array(X[i:i + 1])); here = line()  # noqa: E702
        assert_same(y, expected[i])
    s = site_at(here)
    assert s['plain_estimate'] == 'measured' and s['plain_estimate_calls'] == 8
    assert s['plain_estimate_s'] > 0


_DROPOUT_SCRIPT = textwrap.dedent('''
    import sys
    if sys.argv[1] == 'report':
        import keras_fastpredict as kfp
        kfp.patch(report=True)
    import numpy as np, keras
    from keras import layers, backend as K
    inp = layers.Input((4,))
    out = layers.Dense(1, kernel_initializer='ones')(layers.Dropout(0.5, seed=7)(inp))
    model = keras.models.Model(inp, out)
    sess = K.get_session()
    f = K.function([model.input, K.learning_phase()], [model.output])
    x = np.arange(40, dtype='float32').reshape(10, 4)
    print([float(f([x[i:i + 1], 1])[0]) for i in range(6)])
    print([float(sess.run(model.output, {model.input: x[i:i + 1], K.learning_phase(): 1}))
           for i in range(6)])
''')


def test_runs_with_the_learning_phase_fed_1_are_not_run_again(tmp_path):
    # Timing plain TF by running a call again would move the random draws of dropout.
    script = tmp_path / 'dropout.py'
    script.write_text(_DROPOUT_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='3')
    outs = [subprocess.run([sys.executable, str(script), mode], env=env, cwd=str(tmp_path),
                           stdout=subprocess.PIPE, check=True).stdout.decode()
            for mode in ('plain', 'report')]
    assert outs[0].count('[') == 2 and outs[1] == outs[0]


# Found by review (calls that waited for our one-time work).

def _site_object(lineno):
    found = [s for s in S.all_sites() if s.line == lineno and s.file == __file__]
    assert len(found) == 1
    return found[0]


def test_site_whose_sample_ended_while_plain_waited_takes_the_usual_path(models,
                                                                         monkeypatch):
    """Our one-time work may outlast a fast model's sample (128 calls of 15 us while an
    inference graph's callable is made): plain is timed once it is over, and the site's
    later calls must still take the usual path (predict_calls' hot tuple), as any
    other served loop's do (test_every_loop_kind_ends_its_sample)."""
    model = models['dense']
    n = S.SAMPLE_CALLS + 100
    X = inputs_for('dense', n)
    busy = [True]
    monkeypatch.setattr(plain, '_busy', lambda: busy[0])
    expected = [unpatched_predict(model, X[i:i + 1]) for i in range(n)]
    kfp.patch(report=True)
    for i in range(n):
        if i == S.SAMPLE_CALLS + 10:
            busy[0] = False             # our one-time work is over
        y = model.predict(np.array(X[i:i + 1])); here = line()  # noqa: E702
        assert_same(y, expected[i])
    s = _site_object(here)
    assert not s.sampling and s.calls == n
    assert site_at(here)['plain_estimate'] == 'measured'
    assert s.hot >= n - (S.SAMPLE_CALLS + 10) - 2, s.hot


def test_calls_that_waited_count_at_their_own_row_count_cost(models, monkeypatch):
    """Calls that waited for our one-time work are counted once plain is timed: at the
    cost of their own row count, not scaled from another row count's figure (a loop of
    varying batch sizes: 512-row calls waited, then a one-row call was the first timed).
    Timings are the stub's, by row count, so the figures are exact."""
    model = models['dense']
    X = inputs_for('dense', 512)
    busy = [True]
    monkeypatch.setattr(plain, '_busy', lambda: busy[0])
    cost = {1: 1e-3, 512: 4e-3}         # plain Keras: 1 ms for a row, 4 ms for 512

    def fake_time(wrapped, args, kwargs):
        return [cost[len(args[0])]] * 3
    monkeypatch.setattr(plain, '_time', fake_time)
    sizes = [512] * 5 + [1] * 10 + [512] * 5
    expected = [unpatched_predict(model, X[:n]) for n in sizes]
    kfp.patch(report=True)
    for i, n in enumerate(sizes):
        if i == 5:
            busy[0] = False             # our one-time work is over
        y = model.predict(np.array(X[:n])); here = line()  # noqa: E702
        assert_same(y, expected[i])
    s = site_at(here)
    assert s['plain_estimate'] == 'measured' and s['plain_estimate_calls'] == len(sizes)
    assert s['rows'] == sum(sizes)
    assert s['plain_estimate_s'] == pytest.approx(10 * 4e-3 + 10 * 1e-3)


def test_plain_timed_while_busy_after_the_wait_cap_is_timed_again(models, monkeypatch):
    """Our warm-up outlasts PLAIN_WAIT_CALLS calls of a fast model (measured here: 60-190 ms,
    800-1,100 Session.run calls under load): plain is then timed while it runs, after the
    site's sample (128 calls) has ended, so the re-timing at the end of the sample never
    comes and the contended figure stays. Timings are the stub's: 3 ms a call while busy,
    1 ms once our work is over; the estimate should rest on the lower figure."""
    model = models['dense']
    n = plain.PLAIN_WAIT_CALLS + 200
    X = inputs_for('dense', n)
    busy = [True]
    monkeypatch.setattr(plain, '_busy', lambda: busy[0])
    monkeypatch.setattr(plain, '_time', lambda wrapped, args, kwargs: [
        3e-3 if busy[0] else 1e-3] * 3)
    expected = [unpatched_predict(model, X[i:i + 1]) for i in range(n)]
    kfp.patch(report=True)
    for i in range(n):
        if i == plain.PLAIN_WAIT_CALLS + 20:
            busy[0] = False             # our one-time work is over
        y = model.predict(np.array(X[i:i + 1])); here = line()  # noqa: E702
        assert_same(y, expected[i])
    s = site_at(here)
    assert s['plain_estimate'] == 'measured' and s['plain_estimate_calls'] == n
    assert s['plain_estimate_s'] == pytest.approx(n * 1e-3)


def test_calls_that_waited_count_once_their_model_is_timed_elsewhere(models, monkeypatch):
    """Calls wait for our one-time work "and count at the measured cost": a site whose
    calls all waited (a short loop during the warm-up) counts them only at its own next
    call. Where another site times the same model and row count meanwhile (a second loop
    over the model), the figure exists, yet the first site reports none ('not timed yet')
    where before it had one. Timings are the stub's: 1 ms a call."""
    model = models['dense']
    X = inputs_for('dense', 20)
    busy = [True]
    monkeypatch.setattr(plain, '_busy', lambda: busy[0])
    monkeypatch.setattr(plain, '_time', lambda wrapped, args, kwargs: [1e-3] * 3)
    expected = [unpatched_predict(model, X[i:i + 1]) for i in range(20)]
    kfp.patch(report=True)
    for i in range(10):
        y = model.predict(np.array(X[i:i + 1])); first = line()  # noqa: E702
        assert_same(y, expected[i])
    busy[0] = False                     # our one-time work is over
    for i in range(10, 20):
        y = model.predict(np.array(X[i:i + 1])); second = line()  # noqa: E702
        assert_same(y, expected[i])
    assert site_at(second)['plain_estimate_s'] == pytest.approx(10e-3)
    s = site_at(first)
    assert s['plain_estimate'] == 'measured' and s['plain_estimate_s'] == pytest.approx(10e-3)


# Plain Keras timed as it runs unpatched (found by review: while the original predict was
# timed, Keras' own predict function, a K.function, was served by our K.function adapter:
# the estimate said 80 us where unpatched Keras took 179-190 us).

class _Spy(object):
    """Counts the calls of ``owner.name`` (put in place before patching, so that the
    patch wraps it), and apart those made on a thread that times plain Keras."""

    def __init__(self, monkeypatch, owner, name, timing):
        real = owner.__dict__[name]
        self.calls = self.while_timing = 0
        spy = self

        def counted(*args, **kwargs):
            spy.calls += 1
            if threading.get_ident() in timing:
                spy.while_timing += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(owner, name, _not_the_users(monkeypatch, counted))


def _not_the_users(monkeypatch, fn):
    """``fn``, whose frames the report skips as it skips Keras' own (a spy in this file
    would be taken for the user's code, the site of the calls made inside it)."""
    monkeypatch.setitem(frames.skip_of, id(fn.__code__), True)
    return fn


def _mark_timing(monkeypatch):
    """The threads timing plain Keras now, and our hooks' generation moves during each
    timing (a settle of pending work: plain Keras has none)."""
    timing, moved = set(), []
    real = plain._time

    def marked(wrapped, args, kwargs):
        me = threading.get_ident()
        timing.add(me)
        generation = hooks.state.generation
        try:
            return real(wrapped, args, kwargs)
        finally:
            moved.append(hooks.state.generation - generation)
            timing.discard(me)
    monkeypatch.setattr(plain, '_time', _not_the_users(monkeypatch, marked))
    return timing, moved


def _backend_function_class(flavour):
    if flavour.name == 'keras':
        from keras.backend.tensorflow_backend import Function
        return Function
    from tensorflow.python.keras.backend import GraphExecutionFunction
    return GraphExecutionFunction


def _model_class(flavour):
    if flavour.name == 'keras':
        return training.Model
    from tensorflow.python.keras.engine import training as tf_training
    return tf_training.Model


def _ours_on(function):
    """What our entries keep on a backend function: their attributes, and the calls its
    K.function state counted (the model pool is shared: earlier tests may have left some)."""
    found = {k: v for k, v in vars(function).items() if k.startswith('_kfp')}
    state = found.get('_kfp_fn')
    return sorted(found), state.stats.calls if state is not None else None


def test_plain_predict_is_timed_with_keras_own_predict_function(flavour, monkeypatch):
    model = flavour.models['dense']
    X = inputs_for('dense', 24)
    timing, moved = _mark_timing(monkeypatch)
    predicts = _Spy(monkeypatch, _model_class(flavour), 'predict', timing)
    functions = _Spy(monkeypatch, _backend_function_class(flavour), '__call__', timing)
    model.predict(X[:1])
    before = predicts.calls, functions.calls
    expected = [model.predict(np.array(X[i:i + 1])) for i in range(len(X))]   # unpatched
    per_predict = (functions.calls - before[1]) / (predicts.calls - before[0])
    assert per_predict >= 1
    ours = _ours_on(model.predict_function)
    kfp.patch(report=True)
    got = [model.predict(np.array(X[i:i + 1])) for i in range(len(X))]; here = line()  # noqa
    kfp.unpatch()
    for g, e in zip(got, expected):
        assert_same(g, e)
    assert site_at(here)['plain_estimate'] == 'measured' and predicts.while_timing > 0
    # Each original predict timed ran Keras' own predict function, as unpatched, and
    # touched nothing of ours: no state of the function's, no settle of pending work.
    assert functions.while_timing == per_predict * predicts.while_timing
    assert _ours_on(model.predict_function) == ours
    assert moved and set(moved) == {0}


def test_plain_session_run_and_k_function_are_timed_as_tensorflow_runs_them(models,
                                                                          monkeypatch):
    from keras import backend as K
    from keras.backend.tensorflow_backend import Function
    from tensorflow.python.client.session import BaseSession
    model = models['dense']
    X = inputs_for('dense', 24)
    sess = K.get_session()
    f = K.function([model.input], [model.output])
    timing, moved = _mark_timing(monkeypatch)
    runs = _Spy(monkeypatch, BaseSession, 'run', timing)
    tf_runs = _Spy(monkeypatch, BaseSession, '_call_tf_sessionrun', timing)
    functions = _Spy(monkeypatch, Function, '__call__', timing)

    def loops():
        a = [sess.run(model.output, {model.input: np.array(X[i:i + 1])}) for i in range(24)]
        b = [f([np.array(X[i:i + 1])])[0] for i in range(24)]
        return a, b
    sites_line = loops.__code__.co_firstlineno + 1
    loops()
    before = runs.calls, tf_runs.calls
    expected = loops()                          # unpatched
    per_run = (tf_runs.calls - before[1]) / (runs.calls - before[0])
    assert per_run >= 1
    kfp.patch(report=True)
    got = loops()
    kfp.unpatch()
    for g, e in zip(got, expected):
        assert_same(np.concatenate(g), np.concatenate(e))
    for lineno in (sites_line, sites_line + 1):
        assert site_at(lineno)['plain_estimate'] == 'measured'
    assert runs.while_timing > 0 and functions.while_timing > 0
    assert tf_runs.while_timing == per_run * runs.while_timing
    assert moved and set(moved) == {0}          # no settle of pending work while timed


def test_other_threads_are_served_while_one_thread_times_plain(models, monkeypatch):
    """Plain Keras is timed on one thread: another thread's calls meanwhile take the
    fast path as ever."""
    model = models['dense']
    X = inputs_for('dense', 8)
    timing, _ = _mark_timing(monkeypatch)
    predicts = _Spy(monkeypatch, training.Model, 'predict', timing)
    expected = [unpatched_predict(model, X[i:i + 1]) for i in range(len(X))]
    got, started, served = {}, [], []
    real_predict = training.Model.__dict__['predict']

    def predict_once_in_another_thread(self, *args, **kwargs):
        if threading.get_ident() in timing and not started:
            started.append(1)           # (once: the other thread times plain too)
            fast = kfp.stats(model)['fast_calls']
            t = threading.Thread(target=lambda: got.setdefault(
                'thread', model.predict(np.array(X[7:8]))))
            t.start()
            t.join()
            served.append(kfp.stats(model)['fast_calls'] - fast)
        return real_predict(self, *args, **kwargs)
    monkeypatch.setattr(training.Model, 'predict',
                        _not_the_users(monkeypatch, predict_once_in_another_thread))
    kfp.patch(report=True)
    ys = [model.predict(np.array(X[i:i + 1])) for i in range(7)]
    kfp.unpatch()
    for y, e in zip(ys + [got['thread']], expected):
        assert_same(y, e)
    assert predicts.while_timing > 0
    assert served == [1]                # the other thread's call: on the fast path


def test_plain_is_not_timed_once_the_report_is_turned_off(models, monkeypatch):
    """Plain Keras is timed only while the report is on: off (auto-batch alone), the
    entries an original reaches are not gated, and a run of it would be served by ours
    (Keras' predict function by our K.function adapter). A site whose sample began with
    the report on and ends with it off (the last plain figure is timed again there) times
    nothing more once it is off; results as plain Keras'."""
    model = models['dense']
    X = inputs_for('dense', 200)
    timing, _ = _mark_timing(monkeypatch)
    predicts = _Spy(monkeypatch, training.Model, 'predict', timing)
    from keras.backend.tensorflow_backend import Function
    functions = _Spy(monkeypatch, Function, '__call__', timing)
    from keras_fastpredict.config import settings
    report_on_when_timed = []
    real = plain._time

    def noted(wrapped, args, kwargs):
        report_on_when_timed.append(bool(settings.report))
        return real(wrapped, args, kwargs)
    monkeypatch.setattr(plain, '_time', _not_the_users(monkeypatch, noted))
    model.predict(X[:1])
    before = predicts.calls, functions.calls
    expected = [model.predict(np.array(X[i:i + 1])) for i in range(len(X))]   # unpatched
    per_predict = (functions.calls - before[1]) / (predicts.calls - before[0])
    assert per_predict >= 1
    kfp.patch(report=True, auto_batch=True)
    got = []
    for i in range(len(X)):
        if i == 8:
            kfp.patch(report=False)     # (auto-batch stays on: the site keeps sampling)
        got.append(model.predict(np.array(X[i:i + 1])))
    kfp.unpatch()
    for g, e in zip(got, expected):
        assert_same(g, e)
    # Each timing ran Keras' own predict function, as unpatched (served by ours, had the
    # report been off), and none was made with the report off.
    assert predicts.while_timing > 0
    assert functions.while_timing == per_predict * predicts.while_timing
    assert report_on_when_timed and all(report_on_when_timed), report_on_when_timed


@pytest.mark.parametrize('error', [KeyboardInterrupt, SystemExit, ValueError])
def test_an_error_inside_the_timed_original_leaves_the_thread_served_as_ever(
        models, monkeypatch, error):
    """An original that raises while timed (Ctrl-C in Keras' predict function, say) ends
    the timing, and this thread's later calls are served by our entries again, as before
    the timing: the flag that passed them to the originals is not left set. A
    KeyboardInterrupt or SystemExit reaches the caller (as raised in plain Keras' own
    predict); an Exception leaves the site not timed. Results as plain Keras'."""
    from keras.backend.tensorflow_backend import Function
    model = models['dense']
    X = inputs_for('dense', 24)
    timing, _ = _mark_timing(monkeypatch)
    real = Function.__dict__['__call__']
    raised = []

    def interrupted_once(self, *args, **kwargs):
        if threading.get_ident() in timing and not raised:
            raised.append(1)
            raise error('interrupted')
        return real(self, *args, **kwargs)
    monkeypatch.setattr(Function, '__call__', _not_the_users(monkeypatch, interrupted_once))
    expected = [unpatched_predict(model, X[i:i + 1]) for i in range(len(X))]
    kfp.patch(report=True)
    got, caught = [], []
    for i in range(len(X)):
        try:
            got.append(model.predict(np.array(X[i:i + 1])))
        except error:
            caught.append(i)
            got.append(unpatched_predict(model, X[i:i + 1]))
    fast = kfp.stats(model)['fast_calls']
    again = [model.predict(np.array(X[i:i + 1])) for i in range(len(X))]
    fast = kfp.stats(model)['fast_calls'] - fast
    kfp.unpatch()
    for g, e in zip(got + again, expected + expected):
        assert_same(g, e)
    assert raised == [1]
    assert len(caught) == (0 if issubclass(error, Exception) else 1)
    assert fast == len(X)       # each served by ours after the timing raised


def test_plain_is_timed_as_plain_when_a_callback_turns_the_report_on(monkeypatch):
    """``FastPredict(report=True)`` turns the report on for its training. When it set the
    option without wrapping the entries again, with auto-batch on (the predict entries
    recorded), plain Keras timed then reached Keras' own predict function once in 24 runs
    of the original predict (served by our K.function adapter, not gated). Plain Keras is
    timed as it runs (its predict function once a predict); results as plain Keras' at
    each epoch's weights."""
    import keras
    from keras import layers
    from keras.backend.tensorflow_backend import Function
    model = keras.models.Sequential([layers.Dense(8, input_shape=(4,)), layers.Dense(2)])
    model.compile('sgd', 'mse')
    X = np.random.RandomState(0).rand(64, 4).astype('float32')
    timing, _ = _mark_timing(monkeypatch)
    predicts = _Spy(monkeypatch, training.Model, 'predict', timing)
    functions = _Spy(monkeypatch, Function, '__call__', timing)
    got, weights = [], []

    class Predicting(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            weights.append(model.get_weights())
            for n in (1, 2, 4, 8, 16, 32):
                for i in range(3):
                    got.append(model.predict(np.array(X[i:i + n])))
    model.predict(X[:1])
    before = predicts.calls, functions.calls
    model.predict(X[:1])                        # unpatched
    per_predict = (functions.calls - before[1]) / (predicts.calls - before[0])
    assert per_predict >= 1
    kfp.patch(auto_batch=True)
    model.fit(X, X[:, :2], epochs=2, verbose=0,
              callbacks=[kfp.FastPredict(report=True, defer=False), Predicting()])
    kfp.unpatch()
    # Plain Keras at each epoch's weights, unpatched (a reference made while patched would
    # itself be a site of the report: its K.function call, timed too).
    expected = []
    for w in weights:
        model.set_weights(w)
        expected += [model.predict(np.array(X[i:i + n])) for n in (1, 2, 4, 8, 16, 32)
                     for i in range(3)]
    for g, e in zip(got, expected):
        assert_same(g, e)
    assert len(got) == len(expected) == 36
    assert functions.while_timing == per_predict * predicts.while_timing
