"""The inference graph (issue 10, item 4): recurrent layers unrolled, learning phase fixed
to inference, shared variables; used only after it agreed with the model's own graph.
Every result is compared with plain Keras on the same model.

Most tests here check the graph itself, so they build it at the first call
(``inference_graph=True``); the default (``'auto'``: built once the runs have paid for it,
used only if faster) has tests of its own at the end."""
import numpy as np
import pytest
import keras
from keras import layers as L

import keras_fastpredict as kfp
from keras_fastpredict.adapters import keras as keras_adapter
from keras_fastpredict import config
from keras_fastpredict.engine import compiled, inference_graph, ways
from conftest import assert_same, unpatched_predict, unpatched_predict_on_batch


@pytest.fixture(autouse=True)
def build_at_first_call(request, monkeypatch):
    if 'auto_policy' not in request.keywords:
        monkeypatch.setitem(config.DEFAULTS, 'inference_graph', True)
        monkeypatch.setattr(config.settings, 'inference_graph', True)


def rand(*shape, seed=0):
    return np.random.RandomState(seed).rand(*shape).astype('float32')


def loop_against_plain(model, X, calls=12):
    """One-row calls (fresh arrays: no read-ahead) and a predict(X), plain then patched."""
    rows = [np.array(X[i:i + 1]) if isinstance(X, np.ndarray)
            else [np.array(a[i:i + 1]) for a in X] for i in range(calls)]
    expected = [unpatched_predict(model, r) for r in rows] + [unpatched_predict(model, X)]
    kfp.patch()
    got = [model.predict(r) for r in rows] + [model.predict(X)]
    for g, e in zip(got, expected):
        assert_same(g, e)
    return keras_adapter.lookup(model)


RECURRENT = {
    'lstm': lambda: L.LSTM(6, input_shape=(7, 4)),
    'gru_sequences': lambda: L.GRU(5, return_sequences=True, input_shape=(7, 4)),
    'simple_rnn_backwards': lambda: L.SimpleRNN(5, go_backwards=True, input_shape=(7, 4)),
    'bidirectional': lambda: L.Bidirectional(L.LSTM(3, return_sequences=True),
                                             input_shape=(7, 4)),
    'time_distributed': lambda: L.TimeDistributed(L.GRU(3), input_shape=(5, 7, 4)),
}


@pytest.mark.parametrize('kind', sorted(RECURRENT))
def test_each_recurrent_layer_equals_plain_and_is_unrolled(kind):
    model = keras.models.Sequential([RECURRENT[kind](), L.Dropout(0.5),
                                     L.BatchNormalization(), L.Dense(2)])
    X = rand(40, 5, 7, 4) if kind == 'time_distributed' else rand(40, 7, 4)
    entry = loop_against_plain(model, X)
    assert entry.inference_graph.startswith('used')
    assert entry.inference_graph_ops > 0
    assert entry.batch_safe is True          # the unrolled graph settles it
    # The model still looks to its user as before (no extra inbound nodes).
    assert model.layers[0].output is not None and len(model.layers[0]._inbound_nodes) == 1


def _nested_bn():
    inner = keras.models.Sequential([L.Dense(6, input_shape=(5,)), L.BatchNormalization()],
                                    name='inner')
    return keras.models.Sequential([inner, L.Dropout(0.4), L.Dense(2)])


def _two_io():
    a, b = L.Input((5,)), L.Input((3,))
    h = L.Dropout(0.3)(L.concatenate([L.Dense(4)(a), b]))
    return keras.models.Model([a, b], [L.Dense(2)(h), L.BatchNormalization()(h)])


# Models whose layers read the learning phase, no recurrent layer: only the inference
# branches are built (the learning phase fixed).
PHASE_READERS = {
    'batchnorm_conv': lambda: keras.models.Sequential([
        L.Conv2D(4, 3, input_shape=(8, 8, 2)), L.BatchNormalization(), L.Activation('relu'),
        L.Flatten(), L.Dropout(0.3), L.Dense(3, activation='softmax')]),
    'dropout_mlp': lambda: keras.models.Sequential([
        L.Dense(8, activation='relu', input_shape=(5,)), L.Dropout(0.5), L.Dense(2)]),
    'noise_layers': lambda: keras.models.Sequential([
        L.GaussianNoise(0.5, input_shape=(5,)), L.Dense(4), L.GaussianDropout(0.3),
        L.AlphaDropout(0.2), L.Dense(2)]),
    'nested_batchnorm': _nested_bn,
    'two_inputs_two_outputs': _two_io,
}


def _phase_inputs(kind, rows):
    if kind == 'batchnorm_conv':
        return rand(rows, 8, 8, 2)
    if kind == 'two_inputs_two_outputs':
        return [rand(rows, 5), rand(rows, 3, seed=1)]
    return rand(rows, 5)


@pytest.mark.parametrize('kind', sorted(PHASE_READERS))
def test_models_reading_the_learning_phase_get_it_fixed_and_equal_plain(kind):
    model = PHASE_READERS[kind]()
    if kind == 'batchnorm_conv':        # moving statistics of their own, not 0 and 1
        bn = model.layers[1]
        bn.set_weights([w + np.linspace(0.1, 0.5, w.size).astype('float32')
                        for w in bn.get_weights()])
    assert model.uses_learning_phase
    entry = loop_against_plain(model, _phase_inputs(kind, 30))
    assert entry.inference_graph.startswith('used'), entry.inference_graph
    assert entry.inference_graph_ops > 0
    # Its run holds no switch on the learning phase (the inference branches alone).
    graph = model.outputs[0].graph
    ops = {op.name: op for op in graph.get_operations()}
    seen, todo = set(), [t.op for t in entry._io[1]]
    while todo:
        op = todo.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        todo += [t.op for t in op.inputs] + list(op.control_inputs)
    assert not any(ops[name].type in ('Switch', 'Merge') for name in seen)
    assert not any('keras_learning_phase' in name for name in seen)


def test_a_model_built_in_the_training_phase_is_left_as_it_is():
    """K.set_learning_phase(1) before building: Keras builds the training branches alone
    (BatchNormalization normalises by the batch's own statistics) and its outputs read no
    phase; nothing is built with the phase fixed to inference."""
    from keras import backend as K
    from keras.backend import tensorflow_backend as tfb
    # The graph's phase placeholder is put back after: models built earlier in it feed
    # that one (a new one made them refused: 'predict function with other inputs').
    phases, graph = tfb._GRAPH_LEARNING_PHASES, tf_graph()
    had, old = graph in phases, phases.get(graph)
    K.set_learning_phase(1)
    try:
        model = keras.models.Sequential([L.Dense(4, input_shape=(5,)),
                                         L.BatchNormalization(), L.Dense(2)])
    finally:
        if had:
            phases[graph] = old
        else:
            phases.pop(graph, None)
    assert not model.uses_learning_phase
    X = rand(20, 5)
    expected = unpatched_predict(model, X[:8])
    kfp.patch()
    assert_same(model.predict(X[:8]), expected)
    entry = keras_adapter.lookup(model)
    assert entry.inference_graph.startswith('not used'), entry.inference_graph
    assert entry.inference_graph_ops == 0


def tf_graph():
    import tensorflow as tf
    return tf.compat.v1.get_default_graph()


def test_masking_and_several_inputs():
    tokens = L.Input((6,))
    embedded = L.Embedding(20, 4, mask_zero=True)(tokens)
    extra = L.Input((3,))
    hidden = L.LSTM(5)(embedded)
    model = keras.models.Model([tokens, extra],
                               L.Dense(2)(L.concatenate([hidden, L.Dense(3)(extra)])))
    T = np.random.RandomState(1).randint(0, 20, (40, 6)).astype('int32')
    T[:, 4:] = 0                                      # padded, masked steps
    entry = loop_against_plain(model, [T, rand(40, 3)])
    assert entry.inference_graph.startswith('used')


def lstm_or_batchnorm(kind):
    """A small model of either kind of inference graph, on rows of 7 x 4."""
    if kind == 'lstm':
        return keras.models.Sequential([L.LSTM(6, input_shape=(7, 4)), L.Dense(2)])
    return keras.models.Sequential([L.Flatten(input_shape=(7, 4)), L.BatchNormalization(),
                                    L.Dense(2)])


@pytest.mark.parametrize('kind', ['lstm', 'batchnorm'])
def test_weights_changed_between_calls_are_seen(kind):
    model = lstm_or_batchnorm(kind)
    X = rand(10, 7, 4)
    kfp.patch()
    for i in range(4):
        model.predict(X[i:i + 1].copy())
    assert keras_adapter.lookup(model).inference_graph.startswith('used')
    for step in range(3):
        weights = [w * 0.9 + 0.01 * step for w in model.get_weights()]
        model.set_weights(weights)
        got = model.predict(X[:1].copy())
        kfp.unpatch()
        assert_same(got, unpatched_predict(model, X[:1]))
        kfp.patch()


class CountsCalls(L.Layer):
    """Scales by how often the layer was applied: a second application differs."""
    applied = 0

    def call(self, inputs):
        CountsCalls.applied += 1
        return inputs * float(CountsCalls.applied)


def test_an_inference_graph_that_disagrees_is_not_used():
    CountsCalls.applied = 0
    model = keras.models.Sequential([L.LSTM(4, input_shape=(5, 3)), CountsCalls()])
    entry = loop_against_plain(model, rand(20, 5, 3))
    assert entry.inference_graph.startswith('not used')


def test_option_turns_it_off_and_stateful_models_keep_their_graph():
    model = keras.models.Sequential([L.LSTM(4, input_shape=(5, 3))])
    kfp.patch(inference_graph=False)
    model.predict(rand(1, 5, 3))
    assert keras_adapter.lookup(model).inference_graph == 'off'
    kfp.unpatch()
    stateful = keras.models.Sequential([L.LSTM(4, stateful=True, batch_input_shape=(1, 5, 3))])
    X = rand(8, 1, 5, 3)
    expected = [unpatched_predict(stateful, x) for x in X]
    stateful.reset_states()
    kfp.patch()
    got = [stateful.predict(x) for x in X]
    for g, e in zip(got, expected):
        assert_same(g, e)
    assert keras_adapter.lookup(stateful).inference_graph == 'off'


def test_no_graph_ops_after_the_first_calls():
    model = keras.models.Sequential([L.GRU(4, input_shape=(5, 3)), L.Dense(2)])
    X = rand(30, 5, 3)
    graph = model.outputs[0].graph
    kfp.patch()
    for i in range(5):
        model.predict(X[i:i + 1].copy())
    ops = len(graph.get_operations())
    for i in range(30):
        model.predict(X[i:i + 1])
        model.predict_on_batch(X[:4])
    assert len(graph.get_operations()) == ops
    assert_same(model.predict_on_batch(X[:4]), unpatched_predict_on_batch(model, X[:4]))


def test_built_once_per_model_across_patches():
    """@fast_predict patches for each call when nothing else did: the inference graph
    must not be built again each time (no graph growth)."""
    model = keras.models.Sequential([L.LSTM(4, input_shape=(5, 3)), L.Dense(2)])
    X = rand(12, 5, 3)
    graph = model.outputs[0].graph

    @kfp.fast_predict
    def score(rows):
        return [model.predict(r[None]) for r in rows]

    first = score(X[:6])
    ops = len(graph.get_operations())
    for _ in range(5):
        again = score(X[:6])
    assert len(graph.get_operations()) == ops
    for a, f in zip(again, first):
        assert_same(a, f)
    assert_same(np.concatenate(again), unpatched_predict(model, X[:6]))
    kfp.patch()
    model.predict(X[:1].copy())
    assert keras_adapter.lookup(model).inference_graph.startswith('used')     # checked once already


def test_keras_names_and_nodes_are_untouched():
    """The inference graph takes no name from Keras' counters (a model built after it
    gets the names it gets plainly) and leaves no node on the model's layers."""
    from keras.backend import tensorflow_backend as tfb
    first = keras.models.Sequential([L.LSTM(4, input_shape=(5, 3)), L.Dense(2)])
    counters = dict(tfb._GRAPH_UID_DICTS[first.outputs[0].graph])
    kfp.patch()
    for i in range(4):
        first.predict(rand(1, 5, 3, seed=i))
    assert keras_adapter.lookup(first).inference_graph.startswith('used')
    assert dict(tfb._GRAPH_UID_DICTS[first.outputs[0].graph]) == counters
    assert all(len(layer._inbound_nodes) == 1 for layer in first.layers)
    assert all(len(layer._outbound_nodes) == (0 if layer is first.layers[-1] else 1)
               for layer in first.layers)


def test_a_model_built_in_another_thread_meanwhile_keeps_its_learning_phase():
    """While the first patched predict of a recurrent model builds its inference graph,
    another thread building a model with dropout in the same graph gets Keras' learning
    phase, as plainly (it once got the int 0: no dropout when trained, and
    K.function([x, K.learning_phase()]) raised)."""
    import threading
    from keras import backend as K

    def build_dropout_model(graph):
        # (built in the window; run later, as the build holds the engine's lock)
        with graph.as_default():
            m = keras.models.Sequential([L.Dense(16, input_shape=(8,)), L.Dropout(0.5)])
            phase = K.learning_phase()
            try:
                f = K.function([m.input, phase], [m.output])
            except Exception as exc:  # noqa: BLE001 - compared with plain Keras'
                return type(phase).__name__, m.uses_learning_phase, type(exc), str(exc)
            return type(phase).__name__, m.uses_learning_phase, f

    def dropped(built):
        if callable(built[-1]):
            v = np.ones((64, 8), 'float32')
            f = built[-1]
            return built[:2] + (bool((f([v, 1])[0] == 0).any()),
                                bool((f([v, 0])[0] == 0).any()))
        return built

    def run(patched):
        model = keras.models.Sequential([L.LSTM(4, input_shape=(5, 3)), L.Dense(2)])
        graph = model.outputs[0].graph
        lstm = model.layers[0]
        seen = {}
        original = lstm.call

        def call(*args, **kwargs):
            inside = graph.get_name_scope().startswith(inference_graph._SCOPE)
            if not seen and inside:             # inside the inference graph's build
                def other():
                    try:
                        seen['other'] = build_dropout_model(graph)
                    except Exception as exc:  # noqa: BLE001 - compared with plain Keras'
                        seen['other'] = type(exc), str(exc)
                th = threading.Thread(target=other)
                th.start()
                th.join()
            return original(*args, **kwargs)
        lstm.call = call
        if patched:
            kfp.patch()
            model.predict(rand(1, 5, 3))
            assert keras_adapter.lookup(model).inference_graph != 'off'
        else:
            seen['other'] = build_dropout_model(graph)
        return dropped(seen['other']) if 'other' in seen else None
    expected = run(patched=False)
    assert expected[:2] == ('Tensor', True) and expected[2:] == (True, False)
    assert run(patched=True) == expected


# -- the default: built once it has paid for itself, used only if faster -------------------

@pytest.mark.auto_policy
@pytest.mark.parametrize('kind', ['lstm', 'batchnorm'])
def test_a_short_loop_builds_nothing(kind):
    model = lstm_or_batchnorm(kind)
    graph = model.outputs[0].graph
    rows = [np.array(r[None]) for r in rand(30, 7, 4)]
    expected = [unpatched_predict(model, r) for r in rows]
    ops = len(graph.get_operations())
    kfp.patch()
    got = [model.predict(r) for r in rows]
    for g, e in zip(got, expected):
        assert_same(g, e)
    assert keras_adapter.lookup(model).inference_graph.startswith(
        'waiting: built once runs have cost')
    assert len(graph.get_operations()) == ops
    assert 'inference graph' not in kfp.stats(model)['one_time_ms']


@pytest.mark.auto_policy
@pytest.mark.parametrize('kind', [inference_graph.UNROLL, inference_graph.PHASE])
@pytest.mark.parametrize('slower', ['inference graph', 'own graph'])
def test_once_paid_for_it_is_used_only_if_faster(monkeypatch, slower, kind):
    """Built once the runs have cost its estimate (here nothing: the estimate is made
    0), then used only if its timed runs beat the model's own (one side's runs are
    made 50 ms slower, so that the outcome does not depend on the machine)."""
    import time
    if kind == inference_graph.UNROLL:
        model = keras.models.Sequential([L.LSTM(6, input_shape=(7, 4)), L.Dense(2)])
    else:
        model = keras.models.Sequential([L.Flatten(input_shape=(7, 4)), L.Dropout(0.3),
                                         L.BatchNormalization(), L.Dense(2)])
    rows = [np.array(r[None]) for r in rand(12, 7, 4)]
    expected = [unpatched_predict(model, r) for r in rows]
    monkeypatch.setitem(inference_graph._cost, kind, 0.0)
    monkeypatch.setattr(compiled, '_other_threads', lambda: [])   # (pytest-xdist's own)
    kfp.patch()
    got = [model.predict(rows[0]), model.predict(rows[1])]    # due, then built
    entry = keras_adapter.lookup(model)
    assert entry.inference_graph in ('building', 'checking')
    compiled._join_makers()                 # its callable is made on a thread of its own
    assert entry.inference_graph == 'checking'
    for made, slow in ((entry._ways, slower == 'own graph'),
                       (entry._candidate[0], slower == 'inference graph')):
        if slow:
            run = made._tf_run

            def slowed(session, handle, arrays, options, run=run):
                time.sleep(0.05)
                return run(session, handle, arrays, options)
            monkeypatch.setattr(made, '_tf_run', slowed)
    got += [model.predict(r) for r in rows[2:]]
    for g, e in zip(got, expected):
        assert_same(g, e)
    assert 'inference graph' in kfp.stats(model)['one_time_ms']
    if slower == 'own graph':
        assert entry.inference_graph.startswith('used: '), entry.inference_graph
    else:
        assert entry.inference_graph.startswith(
            "not used: no faster than the model's own graph"), entry.inference_graph


@pytest.mark.auto_policy
def test_not_built_in_the_middle_of_a_loop_while_other_threads_run(monkeypatch):
    """TF 1.15 keeps one control-flow context per graph: ops built while another thread
    builds a while loop land in each other's loops (a reviewer's repro: the other thread's
    models then failed with 'has inputs from different frames'). Plain Keras builds
    nothing mid-loop, so when the inference graph falls due while other Python threads
    run, it is not built; the loop stays on the model's own graph, results as plain."""
    import threading
    model = keras.models.Sequential([L.LSTM(6, input_shape=(7, 4)), L.Dense(2)])
    graph = model.outputs[0].graph
    rows = [np.array(r[None]) for r in rand(12, 7, 4)]
    expected = [unpatched_predict(model, r) for r in rows]
    ops = len(graph.get_operations())
    monkeypatch.setitem(inference_graph._cost, inference_graph.UNROLL, 0.0)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, name='user-thread')
    other.start()
    try:
        kfp.patch()
        got = [model.predict(r) for r in rows]
        # The threads the message names (the first three): other tests' threads may
        # still run in this process (tf.keras leaves seven, Thread-1 to Thread-7).
        running = [t.name for t in threading.enumerate() if t is not threading.current_thread()
                   and not t.name.startswith('keras_fastpredict-') and t.is_alive()]
    finally:
        stop.set()
        other.join()
    for g, e in zip(got, expected):
        assert_same(g, e)
    entry = keras_adapter.lookup(model)
    assert entry.inference_graph.startswith('not used: other threads were running'), \
        entry.inference_graph
    assert 'user-thread' in running
    assert '(%s)' % ', '.join(running[:3]) in entry.inference_graph, entry.inference_graph
    assert entry.unroll_ready is False
    assert len(graph.get_operations()) == ops


def test_other_threads_never_see_the_layers_unrolled():
    """The layers unroll in the building thread only: another thread reading the model
    while its inference graph is built sees the layer's own settings (`unroll` was once
    set on the shared layer objects for the build). Results as plain."""
    import threading
    from keras_fastpredict.engine import step_copies
    model = keras.models.Sequential([L.LSTM(5, input_shape=(6, 3)), L.Dense(2)])
    x = rand(1, 6, 3)
    expected = unpatched_predict(model, x)
    seen = []
    copy = step_copies._Template.copy

    def copying(self, flat):
        if not seen:                    # inside the build: look from another thread
            t = threading.Thread(target=lambda: seen.append(
                (model.layers[0].unroll, '"unroll": true' in model.to_json())))
            t.start()
            t.join()
        return copy(self, flat)
    step_copies._Template.copy = copying
    try:
        kfp.patch()
        got = model.predict(x)
    finally:
        step_copies._Template.copy = copy
    assert_same(got, expected)
    assert keras_adapter.lookup(model).inference_graph in ('checking', 'used', 'building') \
        or keras_adapter.lookup(model).inference_graph.startswith('used')
    assert seen == [(False, False)]


@pytest.mark.auto_policy
def test_sizes_settled_in_the_callers_thread_stay_there_on_the_inference_graph(monkeypatch):
    """Making a callable holds the GIL (LSTM(128) x 40 steps: the caller's call waited 214
    ms for the unrolled graph's pool callable at its 1,241st call, and the pool lost there
    too). Where the model's own graph settled on the caller's thread, the inference graph's
    first callable is made for it, and the row counts settled there stay there, the pool
    not tried for them; another row count calibrates anew."""
    model = keras.models.Sequential([L.LSTM(6, input_shape=(7, 4)), L.Dense(2)])
    rows = [np.array(r[None]) for r in rand(30, 7, 4)]
    pairs = [np.array(r) for r in rand(30, 2, 7, 4, seed=1)]
    expected = [unpatched_predict(model, r) for r in rows + pairs]
    monkeypatch.setitem(inference_graph._cost, inference_graph.UNROLL, 0.0)
    monkeypatch.setattr(compiled, '_other_threads', lambda: [])   # (pytest-xdist's own)
    kfp.patch()
    got = [model.predict(rows[0])]              # the inference graph falls due
    entry = keras_adapter.lookup(model)
    entry._ways.run_on(ways.INLINE, entry.session._session, [rows[0]])
    entry._ways.choice[1] = ways.INLINE         # one row: the caller's thread won
    monkeypatch.setattr(config.settings, 'inference_graph', True)     # used if equal
    got.append(model.predict(rows[1]))          # built, its callable made beside
    compiled._join_makers()
    assert entry.inference_graph == 'checking', entry.inference_graph
    got += [model.predict(r) for r in rows[2:10]]
    assert entry.inference_graph.startswith('used'), entry.inference_graph
    made = entry._ways
    assert made.first == ways.INLINE and made.choice[1] == ways.INLINE
    made.make_s = 0.0                           # the pool's callable may be bought at once
    monkeypatch.setattr(ways, 'POOL_HANDOFF_S', 0.0)
    monkeypatch.setattr(ways, 'POOL_MIN_RUN_S', 0.0)
    monkeypatch.setattr(ways, 'CORES', 2)
    got += [model.predict(r) for r in rows[10:]]
    assert made.choice[1] == ways.INLINE        # one row: not tried again
    got += [model.predict(p) for p in pairs]
    for g, e in zip(got, expected):
        assert_same(g, e)
    assert made.has(ways.POOL) and made.choice[2] in (ways.POOL, ways.INLINE)   # two rows


@pytest.mark.auto_policy
def test_a_callable_made_during_the_checks_is_not_timed_as_a_run(monkeypatch):
    """Found by review of 5b4057c: the checks run both graphs the way the model's own
    graph runs that size, and a way the inference graph had no callable for yet was made
    inside its timed run (here a two-row call, on the pool, while its first callable runs
    in the caller's thread where one row settled): its price counted as run time and a
    faster inference graph was rejected. The own graph's runs are made 50 ms slower and the
    candidate's pool callable 300 ms slower to make, so the outcome does not depend on the
    machine."""
    import time
    model = keras.models.Sequential([L.LSTM(6, input_shape=(7, 4)), L.Dense(2)])
    rows = [np.array(r[None]) for r in rand(12, 7, 4)]
    pair = rand(2, 7, 4, seed=1)
    calls = rows[:3] + [pair] + rows[3:]
    expected = [unpatched_predict(model, r) for r in calls]
    monkeypatch.setitem(inference_graph._cost, inference_graph.UNROLL, 0.0)
    monkeypatch.setattr(compiled, '_other_threads', lambda: [])   # (pytest-xdist's own)
    kfp.patch()
    got = [model.predict(calls[0])]             # the inference graph falls due
    entry = keras_adapter.lookup(model)
    own = entry._ways
    assert own.first == ways.INLINE             # (a loop)
    own.choice[1] = ways.INLINE                 # one row: the caller's thread won
    own.run_on(ways.POOL, entry.session._session, [pair])
    own.choice[2] = ways.POOL                   # two rows: the pool won
    got.append(model.predict(calls[1]))         # built, its callable made beside
    compiled._join_makers()
    assert entry.inference_graph == 'checking', entry.inference_graph
    candidate = entry._candidate[0]
    assert candidate.first == ways.INLINE and not candidate.has(ways.POOL)
    make, run = candidate._make, own._tf_run

    def slow_make(way):
        if way == ways.POOL:
            time.sleep(0.3)
        return make(way)

    def slow_run(session, handle, arrays, options):
        time.sleep(0.05)
        return run(session, handle, arrays, options)
    monkeypatch.setattr(candidate, '_make', slow_make)
    monkeypatch.setattr(own, '_tf_run', slow_run)
    got += [model.predict(r) for r in calls[2:]]
    for g, e in zip(got, expected):
        assert_same(g, e)
    assert candidate.has(ways.POOL)             # made for the two-row check
    assert entry.inference_graph.startswith('used: '), entry.inference_graph


# -- what the build leaves behind: nothing a user of the model or graph can see -------------

def _bn_with_regularizers():
    inner = keras.models.Sequential([L.Dense(6, input_shape=(5,)), L.BatchNormalization()],
                                    name='inner_bn')
    return keras.models.Sequential([
        inner, L.Dense(4, kernel_regularizer='l2', activity_regularizer='l1'),
        L.Dropout(0.3), L.BatchNormalization(), L.Dense(2)])


def _everything_a_user_reads(model):
    """Per layer (nested ones too) and for the model: its updates and losses, by name;
    the graph's variables; the model's config."""
    def names(items):
        return sorted(getattr(t, 'name', repr(t)) for t in items)

    def walk(layer):
        yield layer
        for sub in getattr(layer, 'layers', None) or []:
            yield from walk(sub)
    seen = [(layer.name, names(layer.updates), names(layer.losses)) for layer in walk(model)]
    import tensorflow as tf
    graph = model.outputs[0].graph
    return dict(layers=seen, updates=names(model.updates), losses=names(model.losses),
                unconditional=names(model.get_updates_for(None) + model.get_losses_for(None)),
                variables=[v.name for v in graph.get_collection(tf.GraphKeys.GLOBAL_VARIABLES)],
                json=model.to_json())


@pytest.mark.parametrize('kind', ['phase', 'unroll'])
def test_the_build_leaves_layers_updates_losses_and_variables_as_plain(kind):
    """Found by review of f4b731f: applying the layers again added BatchNormalization's
    update ops (and its zero-debias variables, ``moving_mean/biased_1`` and
    ``local_step_1``) and the activity regulariser's loss to the layers, so
    ``layer.updates`` and ``layer.losses`` grew and ``tf.global_variables()`` held four
    uninitialised variables more than plain Keras (a ``tf.train.Saver`` made then saved
    or restored them: see the next test)."""
    model = _bn_with_regularizers()
    if kind == 'unroll':
        model = keras.models.Sequential([L.LSTM(5, input_shape=(6, 5)), L.Reshape((5,)),
                                         model])
        X = rand(10, 6, 5)
    else:
        X = rand(10, 5)
    model.compile('sgd', 'mse')
    expected = unpatched_predict(model, X[:1])
    plain = _everything_a_user_reads(model)
    kfp.patch()
    for i in range(4):
        got = model.predict(X[i:i + 1].copy())
    assert_same(model.predict(X[:1].copy()), expected)
    assert keras_adapter.lookup(model).inference_graph.startswith('used'), \
        keras_adapter.lookup(model).inference_graph
    assert got is not None
    assert _everything_a_user_reads(model) == plain


def test_a_checkpoint_of_plain_keras_restores_after_the_build(tmp_path):
    """A ``tf.train.Saver`` made after the build (legacy TF 1 code saving a Keras model's
    session) restores a checkpoint that plain Keras saved: it once held the build's
    zero-debias variables of BatchNormalization, not in the checkpoint (NotFoundError)."""
    import tensorflow as tf
    from keras import backend as K
    model = keras.models.Sequential([L.Dense(4, input_shape=(5,)), L.BatchNormalization(),
                                     L.Dense(2)])
    X = rand(6, 5)
    expected = unpatched_predict(model, X)
    path = str(tmp_path / 'plain.ckpt')

    before = set(tf.compat.v1.global_variables())

    def saver():
        # The model's variables and any the graph gained since, as a default Saver made
        # then would take them (the whole graph holds other tests' models, not all
        # initialised in this session).
        return tf.compat.v1.train.Saver(var_list=list(model.weights) + [
            v for v in tf.compat.v1.global_variables() if v not in before])
    saver().save(K.get_session(), path)
    kfp.patch()
    for i in range(4):
        model.predict(X[i:i + 1].copy())
    assert keras_adapter.lookup(model).inference_graph.startswith('used')
    saver().restore(K.get_session(), path)
    assert_same(model.predict(X), expected)


@pytest.mark.parametrize('change', ['add', 'pop'])
def test_a_sequential_changed_and_compiled_again_is_not_served_its_old_graph(change):
    """Found by review of f4b731f: the inference graph is kept per model, and one checked
    equal was adopted again unchecked by the model's next entry (after ``compile``); after
    ``model.add`` or ``model.pop`` that was the old stack of layers (outputs of 2 columns
    where plain Keras gave 3 or 4)."""
    model = keras.models.Sequential([L.Dense(4, input_shape=(5,)), L.BatchNormalization(),
                                     L.Dropout(0.3), L.Dense(2)])
    X = rand(8, 5)
    kfp.patch()
    for i in range(4):
        model.predict(X[i:i + 1].copy())
    assert keras_adapter.lookup(model).inference_graph.startswith('used')
    if change == 'add':
        model.add(L.Dense(3))
    else:
        model.pop()
    model.compile('sgd', 'mse')
    got = [model.predict(X[i:i + 1].copy()) for i in range(6)] + [model.predict(X)]
    kfp.unpatch()
    expected = [unpatched_predict(model, X[i:i + 1]) for i in range(6)] + [
        unpatched_predict(model, X)]
    for g, e in zip(got, expected):
        assert_same(g, e)


def test_layers_that_make_variables_when_applied_keep_the_models_own_graph():
    """A Lambda making a variable in each call: applied again, it would add an
    uninitialised one to the graph's variables (plain predict adds none). The build
    refuses to make variables, so the model keeps its own graph, with the reason."""
    import tensorflow as tf
    from keras import backend as K
    model = keras.models.Sequential([
        L.Dense(4, input_shape=(5,)), L.Dropout(0.2),
        L.Lambda(lambda t: t * K.variable(2.0, name='scale')), L.Dense(2)])
    X = rand(6, 5)
    expected = [unpatched_predict(model, X[i:i + 1]) for i in range(4)]
    variables = tf.compat.v1.global_variables()
    kfp.patch()
    got = [model.predict(X[i:i + 1].copy()) for i in range(4)]
    for g, e in zip(got, expected):
        assert_same(g, e)
    reason = keras_adapter.lookup(model).inference_graph
    assert reason.startswith('not used: could not apply the layers again: a layer made a '
                             'variable'), reason
    assert tf.compat.v1.global_variables() == variables
