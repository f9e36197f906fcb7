"""examples/flask_server.py, patched, in a subprocess: concurrent callers each get the
prediction of their own row (as plain Keras computes it here), through the fast path."""
import urllib.error

import numpy as np
import pytest

from server_support import assert_distinct, concurrent_answers, example, plain_keras

pytest.importorskip('flask')

SEED = 3
THREADS = 8
REQUESTS = 20

load = example('load')


@pytest.fixture(scope='module')
def port():
    server = load.Server(unpatched=False, seed=SEED, startup_timeout=90)
    try:
        yield server.port
    finally:
        server.stop()
        assert server.proc.returncode is not None


@pytest.mark.timeout(120)
def test_concurrent_callers_get_their_own_rows(port):
    rows = np.random.RandomState(11).uniform(
        -1, 1, (THREADS * REQUESTS, load.N_FEATURES)).astype('float32')
    expected = plain_keras(SEED, rows)
    assert_distinct(expected)

    before = load.get_stats(port).get('mlp', {}).get('calls', 0)
    answers = concurrent_answers(
        len(rows), [range(t * REQUESTS, (t + 1) * REQUESTS) for t in range(THREADS)],
        lambda _, i: load.post(port, rows[i:i + 1], timeout=30), join_timeout=60)
    for i, answer in enumerate(answers):
        assert answer.shape == (1, 10)
        np.testing.assert_allclose(answer[0], expected[i], rtol=1e-5, atol=1e-6,
                                   err_msg='row %d' % i)

    s = load.get_stats(port)['mlp']
    # Guaranteed whatever the scheduling: no call fell back to Keras, none was refused or
    # timed out. (Not calls == fast_calls == 160 exactly: the counters are bumped with
    # unlocked `+=` from the request threads and can, rarely, lose an update.)
    assert s['fallbacks'] == 0 and s['fallback_reasons'] == {}
    assert s['rejected'] == 0 and s['timeouts'] == 0
    assert 0 < s['calls'] - before <= len(rows) and s['fast_calls'] > 0
    # Calls that queued were merged into batches (there may be none on 2 busy cores):
    # the one batcher thread keeps its counters consistent.
    assert sum(s['batch_size_histogram'].values()) == s['batches']
    assert s['batched_rows'] >= s['batches']
    print('batches %d, mean batch size %.2f, histogram %s' % (
        s['batches'], s['mean_batch_size'], s['batch_size_histogram']))


def test_bad_input_is_a_400(port):
    for rows in ([[0.0] * (load.N_FEATURES - 1)], [[[0.0] * load.N_FEATURES]]):
        with pytest.raises(urllib.error.HTTPError) as caught:
            load.post(port, rows, timeout=30)
        assert caught.value.code == 400


@pytest.mark.timeout(120)
def test_load_generator_checks_every_answer(port, capsys):
    assert load.main(['--port', str(port), '--clients', '4', '--requests', '10',
                      '--rows-per-client', '3', '--duration', '60']) == 0
    out = capsys.readouterr().out
    assert 'ok 40/40   errors 0   wrong 0' in out
