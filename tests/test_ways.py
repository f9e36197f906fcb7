"""engine.ways: which callable each run goes through, each made once it may pay; every
run's result as plain TF's ``Session.run`` of the same graph."""
import numpy as np
import pytest
import tensorflow as tf

from keras_fastpredict.engine import ways


@pytest.fixture
def graph():
    """A small graph, its session, and a maker that logs the ways it made."""
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, (None, 3))
        y = tf.tanh(tf.matmul(x, tf.constant(np.arange(6, dtype='float32').reshape(3, 2))))
    session = tf.compat.v1.Session(graph=g)
    made = []

    def make(way):
        from tensorflow.core.protobuf import config_pb2
        options = config_pb2.CallableOptions()
        options.feed.append(x.name)
        options.fetch.append(y.name)
        if way == ways.INLINE:
            options.run_options.inter_op_thread_pool = -1
        made.append(way)
        return session._make_callable_from_options(options)
    yield session, x, y, make, made
    session.close()


def _runs(session, x, y, runner, sizes):
    """One run per size, each compared with plain ``Session.run``."""
    rng = np.random.RandomState(0)
    for rows in sizes:
        arr = rng.uniform(-1, 1, (rows, 3)).astype('float32')
        got = runner.run(session._session, [arr])
        np.testing.assert_array_equal(got[0], session.run(y, {x: arr}))


def test_pool_first_the_inline_callable_only_once_its_rent_is_paid(graph, monkeypatch):
    session, x, y, make, made = graph
    paid = []
    runner = ways.Ways(make, lambda name, s: paid.append(name))
    assert made == [ways.POOL] and paid == ['callable']
    # Each run could have saved the hand-off (made tiny, exact in binary, so that every run
    # is longer): the rent is paid at the 30th.
    monkeypatch.setattr(ways, 'POOL_HANDOFF_S', 2.0 ** -30)
    runner.make_s = 29.5 * 2.0 ** -30
    _runs(session, x, y, runner, [1] * 29)
    assert made == [ways.POOL]
    _runs(session, x, y, runner, [1])
    assert made == [ways.POOL, ways.INLINE] and paid == ['callable', 'inline callable']
    # Each size then tries both, alternating, and settles on the faster.
    _runs(session, x, y, runner, [1] * (2 * ways.CALIBRATION_RUNS))
    assert runner.choice[1] in (ways.POOL, ways.INLINE)
    _runs(session, x, y, runner, [5] * (2 * ways.CALIBRATION_RUNS))
    assert runner.choice[3] in (ways.POOL, ways.INLINE)
    assert made == [ways.POOL, ways.INLINE]


def test_inline_first_runs_too_fast_for_the_pool_never_make_its_callable(graph, monkeypatch):
    session, x, y, make, made = graph
    monkeypatch.setattr(ways, 'POOL_MIN_RUN_S', float('inf'))
    runner = ways.Ways(make, first=ways.INLINE)
    runner.make_s = 0.0
    _runs(session, x, y, runner, [1] * 20)
    assert made == [ways.INLINE] and runner.choice[1] == ways.INLINE


def _inline_first_free_pool(make, monkeypatch):
    """Ways that start in the caller's thread, where every run could have paid the pool's
    callable (free, and half of any run saved on 2 cores)."""
    monkeypatch.setattr(ways, 'POOL_MIN_RUN_S', 0.0)
    monkeypatch.setattr(ways, 'POOL_HANDOFF_S', 0.0)
    monkeypatch.setattr(ways, 'CORES', 2)
    runner = ways.Ways(make, first=ways.INLINE)
    runner.make_s = 0.0
    return runner


def test_inline_first_slow_runs_buy_the_pool(graph, monkeypatch):
    session, x, y, make, made = graph
    runner = _inline_first_free_pool(make, monkeypatch)
    _runs(session, x, y, runner, [1] * 10)
    assert made == [ways.INLINE, ways.POOL] and runner.choice[1] in (ways.POOL, ways.INLINE)


def test_never_bought_on_a_sizes_first_run_alone(graph, monkeypatch):
    """A size's first run pays one-time work (the kernels for its shape): however long
    it took, the other way's callable waits for a second run of that size."""
    session, x, y, make, made = graph
    runner = _inline_first_free_pool(make, monkeypatch)
    _runs(session, x, y, runner, [1, 5, 40])        # three sizes, one run each
    assert made == [ways.INLINE]
    _runs(session, x, y, runner, [5])
    assert made == [ways.INLINE, ways.POOL]


def test_a_concurrent_call_runs_on_the_pool(graph):
    session, x, y, make, made = graph
    runner = ways.Ways(make, first=ways.INLINE)
    arr = np.ones((2, 3), 'float32')
    got = runner.run(session._session, [arr], pool=True)
    np.testing.assert_array_equal(got[0], session.run(y, {x: arr}))
    assert made == [ways.INLINE, ways.POOL]


def test_a_failed_purchase_leaves_the_run_and_stops_renting(graph):
    session, x, y, make, made = graph

    def make_once(way):
        if made:
            raise RuntimeError('closed meanwhile')
        return make(way)
    runner = ways.Ways(make_once)
    runner.make_s = 0.0
    _runs(session, x, y, runner, [1] * 5)
    assert made == [ways.POOL] and runner.make_s == float('inf')


def test_the_preferred_way_is_the_one_settled_on_else_the_first(graph):
    session, x, y, make, made = graph
    runner = ways.Ways(make)
    assert runner.preferred() == ways.POOL
    runner.choice.update({1: ways.INLINE, 2: ([], [])})
    assert runner.preferred() == ways.INLINE
    runner.choice[3] = ways.POOL            # both settled somewhere: the first
    assert runner.preferred() == ways.POOL
    assert ways.Ways(make, first=ways.INLINE).preferred() == ways.INLINE


def test_saving_bounds():
    assert ways.saving_bound(ways.INLINE, 1.0) == ways.POOL_HANDOFF_S
    assert ways.saving_bound(ways.INLINE, 1e-6) == 1e-6
    assert ways.saving_bound(ways.POOL, ways.POOL_MIN_RUN_S) == 0.0
    if ways.CORES > 1:
        assert ways.saving_bound(ways.POOL, 1.0) == pytest.approx(
            1.0 - 1.0 / ways.CORES - ways.POOL_HANDOFF_S)


def test_runs_without_rows_share_one_choice():
    """A ``Session.run`` may feed a scalar, or nothing: such runs calibrate as one size."""
    from tensorflow.core.protobuf import config_pb2
    g = tf.Graph()
    with g.as_default():
        s = tf.compat.v1.placeholder(tf.float32, ())
        y = s * 3.0
        z = tf.constant([1.0, 2.0]) * 2.0
    session = tf.compat.v1.Session(graph=g)

    def maker(feeds, fetch):
        def make(way):
            options = config_pb2.CallableOptions()
            options.feed.extend(t.name for t in feeds)
            options.fetch.append(fetch.name)
            if way == ways.INLINE:
                options.run_options.inter_op_thread_pool = -1
            return session._make_callable_from_options(options)
        return make
    scalar, nothing = ways.Ways(maker([s], y)), ways.Ways(maker([], z))
    scalar.make_s = nothing.make_s = 0.0
    for i in range(10):
        value = np.array(i, 'float32')
        assert scalar.run(session._session, [value])[0] == session.run(y, {s: value})
        np.testing.assert_array_equal(nothing.run(session._session, [])[0], session.run(z))
    assert scalar.choice[-1] in (ways.POOL, ways.INLINE)
    assert nothing.choice[-1] in (ways.POOL, ways.INLINE)
    session.close()


def test_settled_sizes_read_while_another_thread_adds_a_size(graph):
    """Found by review: the inference graph's maker thread reads the sizes settled while
    the caller's thread calibrates a new size (adds it to the choice). A thread switch
    between two steps of that read (simulated here by a trace function adding a size at
    each line run in engine/ways.py meanwhile) raised 'dictionary changed size during
    iteration' in the maker thread, which then died with its callable unmade."""
    import sys
    session, x, y, make, made = graph
    runner = ways.Ways(make)
    runner.choice.update({1: ways.INLINE, 2: ways.POOL, 3: ([], [])})
    added = []

    def local(frame, event, arg):
        if event == 'line':
            added.append(100 + len(added))
            runner.choice.setdefault(added[-1], ([], []))
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename == ways.__file__ else None
    sys.settrace(tracer)
    try:
        inline, pool = runner.settled(ways.INLINE), runner.settled(ways.POOL)
    finally:
        sys.settrace(None)
    assert added and inline == [1] and pool == [2]


def test_runs_before_the_purchase_keep_no_growing_record(graph):
    """Found by review: until the other way's callable was bought, every run's time was
    appended to its size's list and the list's minimum taken at each run, so each run cost
    more the more runs came before (over a 3,400-run list, as a MobileNet loop's before its
    rent is paid, the minimum alone took about 75 us a run here, more than the hand-off the
    purchase could save), and where no purchase comes (one that failed) without end. Here
    no purchase comes; the memory engine/ways.py holds must not grow with the runs."""
    import tracemalloc
    session, x, y, make, made = graph
    runner = ways.Ways(make)
    runner.make_s = float('inf')
    arr = np.ones((1, 3), 'float32')
    expected = session.run(y, {x: arr})
    only_ways = [tracemalloc.Filter(True, ways.__file__)]
    tracemalloc.start()
    try:
        for _ in range(100):
            runner.run(session._session, [arr])
        before = tracemalloc.take_snapshot().filter_traces(only_ways)
        for _ in range(2000):
            got = runner.run(session._session, [arr])
        after = tracemalloc.take_snapshot().filter_traces(only_ways)
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(got[0], expected)
    grown = sum(s.size_diff for s in after.compare_to(before, 'filename'))
    assert grown < 4096, grown


def test_a_purchase_under_way_stalls_no_other_callers_run(graph):
    # While one thread makes the other way's callable (7-15 ms for Dense(2048)x2 among
    # 16 threads), another thread whose run would buy it too runs the way it has, with
    # plain TF's result, instead of waiting for the purchase to end.
    import threading
    session, x, y, make, made = graph
    making, release = threading.Event(), threading.Event()

    def slow_make(way):
        if made:                    # (the purchase, not the first callable)
            making.set()
            assert release.wait(10)
        return make(way)
    runner = ways.Ways(slow_make)
    runner.make_s = 0.0
    _runs(session, x, y, runner, [1])             # a size's first run never buys
    buyer = threading.Thread(target=_runs, args=(session, x, y, runner, [1]))
    buyer.start()
    assert making.wait(10)
    done = threading.Event()

    def other():
        _runs(session, x, y, runner, [1])
        done.set()
    threading.Thread(target=other).start()
    try:
        assert done.wait(5), 'a run waited for another thread to buy a callable'
    finally:
        release.set()
        buyer.join()
    assert made == [ways.POOL, ways.INLINE]
