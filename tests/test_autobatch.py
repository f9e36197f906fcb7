"""Auto-batch (``--auto-batch``, ``KERAS_FASTPREDICT_AUTO_BATCH=1``, ``patch(auto_batch=
True)``): each scenario of ``autobatch_script.py`` runs as ``python`` runs it and under
the runner with the flag, and what it produced is compared with plain Keras' (the
promised tolerance); where auto-batch should defer, the test checks that it did."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from conftest import assert_same

pytestmark = pytest.mark.xdist_group('autobatch')

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(HERE, 'autobatch_script.py')
RUNNER = [sys.executable, '-m', 'keras_fastpredict']

# scenario -> whether auto-batch must defer some of its calls
SCENARIOS = {
    'in_list': True, 'in_dict': True, 'from_generator': True,
    'returned_then_weights_change': True, 'returned_then_trained': True, 'pickled': True,
    'saved': True, 'every_tenth': True, 'threads': True, 'in_callback': True,
    'library_call': False, 'use_at_once': False, 'collect_then_feedback': True,
    'asarray_reads': True, 'bad_input': True, 'run_error': True, 'stateful_rnn': False,
    'batchnorm_training_phase': False, 'forked': True,
}


def env(**extra):
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=ROOT,
                PYTHONWARNINGS='ignore', **extra)


def run(cmd, **extra):
    return subprocess.run(cmd, cwd=HERE, env=env(**extra), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=600)


@pytest.fixture(scope='module')
def produced(tmp_path_factory):
    """What every scenario produced: plain, and under the runner with --auto-batch."""
    got = {}
    for kind, prefix in (('plain', [sys.executable]), ('auto', RUNNER + ['--auto-batch'])):
        out = str(tmp_path_factory.mktemp(kind) / 'out.pkl')
        proc = run(prefix + [SCRIPT, out] + list(SCENARIOS))
        assert proc.returncode == 0, proc.stderr[-4000:]
        with open(out, 'rb') as f:
            got[kind] = pickle.load(f)
    return got


def same(actual, expected):
    if isinstance(expected, dict):
        assert sorted(actual) == sorted(expected)
        for key in expected:
            same(actual[key], expected[key])
    elif isinstance(expected, tuple):
        assert actual == expected
    elif isinstance(expected, float):
        assert abs(actual - expected) <= 1e-5 * max(1.0, abs(expected))
    else:
        assert_same(actual, expected)


# Scenarios that train: a training step's numbers differ between a plain and a patched
# process (up to 1e-4 after a few SGD steps, without any predict call), so each compares
# its results with plain Keras' predict called in the same process at the same time.
IN_PROCESS = ('returned_then_trained', 'in_callback')


@pytest.mark.parametrize('name', sorted(SCENARIOS))
def test_scenario_as_plain(produced, name):
    plain, auto = produced['plain'], produced['auto']
    if name in IN_PROCESS:
        same(plain[name]['got'], plain[name]['want'])
        same(auto[name]['got'], auto[name]['want'])
    elif name == 'threads':
        # Each thread's results, as plain Keras gives them for its rows (in the same
        # process, and in the plain one where the threads took turns).
        same(auto[name]['got'], auto[name]['want'])
        same(auto[name]['got'], plain[name]['got'])
    elif name == 'run_error':       # where it raised: test_run_error_... below
        same(auto[name]['kept'], plain[name]['kept'])
    else:
        same(auto[name], plain[name])
    assert plain[name + ':deferred'] == 0
    if SCENARIOS[name]:
        assert auto[name + ':deferred'] > 0, auto[name + ':sites']
    else:
        assert auto[name + ':deferred'] == 0, auto[name + ':sites']


def test_bad_input_raises_at_the_call_as_plain(produced):
    found = produced['auto']['bad_input']
    assert set(found) == {'wrong shape', 'batch_size 0', 'before'}
    assert found['wrong shape'] == produced['plain']['bad_input']['wrong shape']


def test_run_error_of_a_deferred_call_is_raised_at_first_use(produced):
    # Deferral's one documented difference, under this flag only: the same exception, at
    # the first use of the result instead of at the call.
    plain, auto = produced['plain']['run_error'], produced['auto']['run_error']
    assert set(plain) == {'at call', 'kept'} and set(auto) == {'at use', 'kept'}
    assert auto['at use'][0] == plain['at call'][0]
    assert auto['at use'][1] == plain['at call'][1]


def test_sites_whose_results_are_read_at_once_go_back_to_the_fast_path(produced):
    auto = produced['auto']
    for name in ('collect_then_feedback', 'asarray_reads'):
        sites = [s for s in auto[name + ':sites'] if s and 'calls' in s]
        assert len(sites) == 1 and not sites[0]['deferring'], sites
        assert sites[0]['lone_batches'] >= 16
    # the asarray loop's calls were deferred 16 times, then took the fast path
    assert auto['asarray_reads:deferred'] <= 20


def test_sites_not_auto_batched_say_why(produced):
    auto = produced['auto']
    notes = {name: [s['note'] for s in auto[name + ':sites'] if s]
             for name in ('use_at_once', 'stateful_rnn', 'batchnorm_training_phase')}
    assert notes['use_at_once'] == ['each result is read before the next call']
    assert notes['stateful_rnn'] and all('share a run' in n for n in notes['stateful_rnn'])
    assert notes['batchnorm_training_phase'] and all(
        'share a run' in n for n in notes['batchnorm_training_phase'])


@pytest.mark.parametrize('code', ['0', '3', 'raise'])
def test_script_ending_with_calls_pending(tmp_path, code):
    got = {}
    for kind, prefix in (('plain', [sys.executable]), ('auto', RUNNER + ['--auto-batch'])):
        path = str(tmp_path / ('%s.npy' % kind))
        proc = run(prefix + [SCRIPT, 'exit', path, code])
        got[kind] = proc.returncode, proc.stderr.strip().splitlines()[-1:], np.load(path)
    assert got['auto'][:2] == got['plain'][:2]
    assert_same(got['auto'][2], got['plain'][2])


def test_environment_variable_turns_it_on(tmp_path):
    out = str(tmp_path / 'out.pkl')
    proc = run(RUNNER + [SCRIPT, out, 'in_list'], KERAS_FASTPREDICT_AUTO_BATCH='1')
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out, 'rb') as f:
        assert pickle.load(f)['in_list:deferred'] > 0


def test_without_the_flag_nothing_is_deferred(tmp_path):
    out = str(tmp_path / 'out.pkl')
    proc = run(RUNNER + [SCRIPT, out, 'in_list'])
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out, 'rb') as f:
        got = pickle.load(f)
    assert got['in_list:deferred'] == 0 and got['in_list:sites'] == []


# -- in this process: patch(auto_batch=True) ----------------------------------------------

def _collect(model, x, n):
    return [model.predict(np.array(x[i])[None]) for i in range(n)]


@pytest.mark.parametrize('name', ['dense', 'multi_out', 'conv'])
def test_patch_option_collect_loop_as_plain(flavour, name):
    from conftest import inputs_for
    model = flavour.models[name]
    x = inputs_for(name, 150)
    plain = _collect(model, x, 150)
    import keras_fastpredict as kfp
    kfp.patch(auto_batch=True)
    got = _collect(model, x, 150)
    deferred = kfp.stats(model)['deferred']
    kfp.unpatch()
    assert deferred > 0
    if isinstance(plain[0], list):
        for i in range(len(plain[0])):
            assert_same(np.concatenate([g[i] for g in got]),
                        np.concatenate([p[i] for p in plain]))
    else:
        assert_same(np.concatenate(got), np.concatenate(plain))


@pytest.mark.parametrize('in_c', [True, False])
def test_collect_loop_of_mixed_inputs_as_plain(models, monkeypatch, in_c):
    # The site's usual call in C (engine/_native/auto_call.c) and what it leaves to
    # auto_caller's call (another dtype, rows not contiguous, several rows), with and
    # without it.
    from conftest import inputs_for
    from test_deferred import _mixed_rows
    from keras_fastpredict.engine import deferred
    import keras_fastpredict as kfp
    if in_c:
        pytest.importorskip('keras_fastpredict.engine._deferral')
    else:
        monkeypatch.setattr(deferred, '_AutoCall', None)
        monkeypatch.setattr(deferred, '_Deferrer', None)
        monkeypatch.setattr(deferred._local, 'auto', deferred.AutoScope(), raising=False)
    model = models['dense']
    rows = _mixed_rows(inputs_for('dense', 400))

    def loop():
        return [model.predict(r) for r in rows]
    plain = loop()
    kfp.patch(auto_batch=True)
    try:
        got = loop()
        deferred_calls = kfp.stats(model)['deferred']
    finally:
        kfp.unpatch()
    assert deferred_calls > len(rows) // 2
    assert_same(np.concatenate(got), np.concatenate(plain))


def test_multi_input_model_is_not_auto_batched(models):
    from conftest import inputs_for
    model = models['multi_in']
    a, b = inputs_for('multi_in', 120)
    plain = [model.predict([a[i:i + 1].copy(), b[i:i + 1].copy()]) for i in range(120)]
    import keras_fastpredict as kfp
    kfp.patch(auto_batch=True)
    got = [model.predict([a[i:i + 1].copy(), b[i:i + 1].copy()]) for i in range(120)]
    deferred = kfp.stats(model)['deferred']
    kfp.unpatch()
    assert deferred == 0
    assert_same(np.concatenate(got), np.concatenate(plain))


def test_off_wraps_nothing_more_and_on_wraps_only_predict():
    import keras_fastpredict as kfp
    from keras.engine.training import Model
    from keras_fastpredict.adapters import keras as keras_adapter
    from tensorflow.python.client.session import BaseSession
    kfp.patch()
    assert Model.__dict__['predict']._self_wrapper == keras_adapter.adapter.predict
    run = BaseSession.__dict__['run']._self_wrapper
    kfp.patch(auto_batch=True)                       # re-wraps predict with the recorder
    assert Model.__dict__['predict']._self_wrapper != keras_adapter.adapter.predict
    assert BaseSession.__dict__['run']._self_wrapper == run
    kfp.patch(auto_batch=False)
    assert Model.__dict__['predict']._self_wrapper == keras_adapter.adapter.predict


def test_a_site_goes_on_deferring_after_its_model_is_compiled_again(models):
    from conftest import inputs_for
    import keras_fastpredict as kfp
    model = models['dense']
    x = inputs_for('dense', 120)
    plain = np.concatenate(_collect(model, x, 120))
    kfp.patch(auto_batch=True)
    first = np.concatenate(_collect(model, x, 120))
    before = kfp.stats(model)['deferred']
    model.compile('sgd', 'mse')                      # a new predict function, a new entry
    second = np.concatenate(_collect(model, x, 120))
    after = kfp.stats(model)['deferred']
    kfp.unpatch()
    assert before > 0 and after - before >= 100      # (one call takes the usual path)
    assert_same(first, plain)
    assert_same(second, plain)


def _freed_after_a_collect_loop(**options):
    import gc
    import weakref
    import keras
    import keras_fastpredict as kfp
    from conftest import inputs_for
    kfp.patch(**options)
    model = keras.models.Sequential([keras.layers.Dense(4, input_shape=(32,))])
    x = inputs_for('dense', 100)
    results = np.concatenate(_collect(model, x, 100))
    deferred = kfp.stats(model)['deferred']
    from keras_fastpredict.engine import compiled
    refs = [weakref.ref(model), weakref.ref(compiled.get(model))]   # (its entry: session)
    del model
    gc.collect()
    kfp.unpatch()
    return all(r() is None for r in refs), deferred, results


def test_a_model_auto_batched_is_freed_as_without_the_flag():
    freed, deferred, _ = _freed_after_a_collect_loop()
    assert freed and deferred == 0
    freed, deferred, _ = _freed_after_a_collect_loop(auto_batch=True)
    assert freed and deferred > 0


def _two_sessions(model, x):
    """A collect loop on Keras' session, then the same line with another default session
    whose weights differ (set within it)."""
    import keras
    import tensorflow as tf
    first = np.concatenate(_collect(model, x, 120))
    other = tf.compat.v1.Session(graph=keras.backend.get_session().graph)
    weights = model.get_weights()
    with other.as_default():
        model.set_weights([w + 0.5 for w in weights])
        second = np.concatenate(_collect(model, x, 120))
    third = np.concatenate(_collect(model, x, 120))
    other.close()
    return first, second, third


def test_a_site_follows_the_session_keras_uses():
    import keras
    import keras_fastpredict as kfp
    from conftest import inputs_for
    x = inputs_for('dense', 120)
    results = {}
    for auto in (None, True):
        np.random.seed(3)
        model = keras.models.Sequential([keras.layers.Dense(4, input_shape=(32,))])
        if auto:
            kfp.patch(auto_batch=True)
        results[auto] = _two_sessions(model, x)
        deferred = kfp.stats(model)['deferred']
        kfp.unpatch()
    assert deferred >= 280     # (after the sample, all but one call a session change)
    assert np.abs(results[None][1] - results[None][0]).max() > 0.1   # the weights differ
    for got, want in zip(results[True], results[None]):
        assert_same(got, want)


def test_serving_check_in_c_as_in_python():
    # The Keras adapter's serving check (asked on each auto-batched call) in C, against
    # the closure it stands for, as the session Keras would use and the model's predict
    # function change.
    pytest.importorskip('keras_fastpredict.engine._deferral')
    import keras
    import tensorflow as tf
    import keras_fastpredict as kfp
    from conftest import inputs_for
    from keras_fastpredict.engine import compiled
    model = keras.models.Sequential([keras.layers.Dense(4, input_shape=(32,))])
    kfp.patch()
    try:
        model.predict(inputs_for('dense', 1))
        entry = compiled.get(model)
        check = entry.adapter.serving_check()
        assert type(check).__name__ == 'Serves'
        seen = []

        def both():
            seen.append(check(model, entry))
            assert seen[-1] is check.python(model, entry)
        both()
        other = tf.compat.v1.Session(graph=keras.backend.get_session().graph)
        with other.as_default():
            both()
        other.close()
        with other.as_default():
            both()
        both()
        function = model.__dict__.pop('predict_function')
        both()
        model.predict_function = function
        both()
    finally:
        kfp.unpatch()
    assert seen == [True, False, False, True, False, True]


@pytest.mark.parametrize('scenario', ['in_list', 'use_at_once'])
def test_stats_show_which_sites_were_auto_batched(tmp_path, scenario):
    out = str(tmp_path / 'out.pkl')
    proc = run(RUNNER + ['--auto-batch', '--stats', SCRIPT, out, scenario])
    assert proc.returncode == 0, proc.stderr[-3000:]
    auto = [line for line in proc.stderr.splitlines() if 'auto-batch:' in line]
    with open(out, 'rb') as f:
        got = pickle.load(f)
    if scenario == 'in_list':
        assert len(auto) == 1 and 'calls deferred after the sample' in auto[0], auto
        assert 'x plain Keras' in auto[0]
        # (the calls after the site's sample: the report's 64 with --stats)
        assert got['in_list:deferred'] == 135 and got['in_list:sites'][0]['calls'] == 135
    else:
        assert auto == ['      auto-batch: not deferred: each result is read before the '
                        'next call'], auto
