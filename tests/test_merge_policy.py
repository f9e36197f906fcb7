"""The merge policy alone: made-up latencies in, the way per load level out (no clock, no
threads, no TensorFlow)."""
import pytest

from keras_fastpredict.engine import merge_policy
from keras_fastpredict.engine.merge_policy import DIRECT, MERGE, GAP_FIRST, GAP_MAX


def policy(first=DIRECT, slots=2):
    return merge_policy.Policy(slots, lambda: first)


def opened(p, key):
    """The level ``key`` of policy ``p``, made as a first call makes it."""
    p.levels.setdefault(key, merge_policy.Level(key, p.slots, p.prior()))
    return p.levels[key]


def epoch(p, key, cost):
    """Calls at level ``key`` until its epoch ends; each timed call takes cost[way] (a
    number, or a function of the call's index in the epoch). Returns (way, calls made)."""
    calls = 0
    while True:
        way, ticket = p.way(key)
        level = p.levels[key]
        if calls == 0:
            first, number = way, level.current[1]
        calls += 1
        if ticket is not None:
            c = cost[way]
            p.record(ticket, c(calls) if callable(c) else c)
        if level.current[1] != number:
            return first, calls


def ways(p, key, cost, epochs):
    return [epoch(p, key, cost)[0] for _ in range(epochs)]


def test_levels_are_powers_of_two_above_the_slots():
    p = policy(slots=2)
    assert [p.level(c) for c in (1, 2, 3, 4, 5, 8, 9, 16, 17, 32)] == \
        [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    p = policy(slots=1)
    assert [p.level(c) for c in (1, 2, 3, 4, 5)] == [0, 1, 2, 2, 3]


def test_an_epoch_times_its_first_arrivals():
    p = policy(slots=2)
    key = p.level(16)                   # 9-16 callers: 32 calls timed per epoch
    tickets = [p.way(key)[1] for _ in range(50)]
    assert [t[2] for t in tickets] == [True] * 32 + [False] * 18
    assert p.levels[key].calls == 32


def test_after_a_switch_calls_are_timed_once_the_previous_way_drained():
    # Calls made the old way and still out (queued, say) would make the first calls of
    # the new way look faster or slower than they are: none is timed before they return.
    p = policy(first=DIRECT)
    key = p.level(16)
    level = opened(p, key)
    for _ in range(level.calls - 1):
        p.record(p.way(key)[1], 1.0)
    last = p.way(key)[1]
    out = [p.way(key)[1] for _ in range(5)]        # untimed, still out at the switch
    assert last[2] and not any(t[2] for t in out)
    p.record(last, 1.0)
    assert level.current[:2] == (MERGE, 1) and level.trying    # the first trial
    early = [p.way(key)[1] for _ in range(7)]
    assert not any(t[2] for t in early)            # the old way's calls are still out
    for ticket in out:
        p.record(ticket, 1.0)
    later = [p.way(key)[1] for _ in range(level.calls + 1)]
    assert [t[2] for t in later] == [True] * level.calls + [False]
    for ticket in early + later:
        p.record(ticket, 0.5)
    assert level.best == MERGE and level.means == {DIRECT: 1.0, MERGE: 0.5}


def test_the_same_way_goes_on_timing_without_a_pause():
    p = policy(first=MERGE)
    key = p.level(16)
    level = opened(p, key)
    level.gap = 1000                                 # no trial for a while
    for _ in range(level.calls - 1):
        p.record(p.way(key)[1], 1.0)
    last = p.way(key)[1]
    out = p.way(key)[1]                              # untimed, out across the new epoch
    p.record(last, 1.0)
    assert level.current[:2] == (MERGE, 1) and not out[2]
    assert p.way(key)[1][2]                          # the next arrival is timed at once


def test_the_faster_way_is_found_and_kept():
    # Prior DIRECT; merging is twice as fast: the first trial switches for good.
    p = policy(first=DIRECT)
    key = p.level(16)
    seen = ways(p, key, {DIRECT: 2.0, MERGE: 1.0}, 40)
    assert seen[:GAP_FIRST + 1] == [DIRECT] * GAP_FIRST + [MERGE]
    # Later, DIRECT only in trials, ever rarer: 40 epochs hold at most 6 of them.
    trials = [i for i, w in enumerate(seen) if w == DIRECT][GAP_FIRST:]
    assert len(trials) <= (40 // GAP_FIRST).bit_length()
    assert all(seen[i - 1] == seen[i + 1] == MERGE for i in trials if i + 1 < len(seen))
    assert p.levels[key].best == MERGE


def test_a_prior_that_is_wrong_is_corrected():
    p = policy(first=MERGE)
    key = p.level(4)
    seen = ways(p, key, {DIRECT: 1.0, MERGE: 1.5}, 20)
    assert seen[GAP_FIRST] == DIRECT and p.levels[key].best == DIRECT
    assert p.levels[key].switches == 1


def test_a_losing_way_is_tried_ever_less_often():
    p = policy(first=DIRECT)
    key = p.level(8)
    seen = ways(p, key, {DIRECT: 1.0, MERGE: 3.0}, 600)
    trials = [i for i, w in enumerate(seen) if w == MERGE]
    gaps = [b - a - 1 for a, b in zip([-1] + trials, trials)]
    # Each loss doubles the gap before the next trial, up to GAP_MAX epochs.
    assert gaps[:5] == [GAP_FIRST, 2 * GAP_FIRST, 4 * GAP_FIRST, 8 * GAP_FIRST,
                        16 * GAP_FIRST]
    assert max(gaps) == GAP_MAX
    doubling = (GAP_MAX // GAP_FIRST).bit_length()          # trials until the gap is full
    assert len(trials) <= doubling + 600 // GAP_MAX
    assert p.levels[key].best == DIRECT and p.levels[key].switches == 0


def test_a_trial_that_cannot_win_ends_early():
    p = policy(first=DIRECT)
    key = p.level(16)
    level = opened(p, key)
    for _ in range(GAP_FIRST):
        assert epoch(p, key, {DIRECT: 1.0, MERGE: 4.0}) == (DIRECT, level.calls)
    way, calls = epoch(p, key, {DIRECT: 1.0, MERGE: 4.0})
    # Four times slower: its sum passes the best's whole epoch after a quarter of it.
    assert way == MERGE and calls == level.calls // 4 + 1
    assert level.current[0] == DIRECT


def test_a_change_of_load_is_followed():
    # Merging wins, then stops winning (a model's runs got cheaper, other load...): the
    # level goes back within the longest gap.
    p = policy(first=DIRECT)
    key = p.level(16)
    ways(p, key, {DIRECT: 2.0, MERGE: 1.0}, 300)
    assert p.levels[key].best == MERGE
    later = ways(p, key, {DIRECT: 1.0, MERGE: 2.0}, GAP_MAX + 2)
    assert later.index(DIRECT) <= GAP_MAX          # the next trial of DIRECT switches
    assert p.levels[key].best == DIRECT and p.levels[key].switches == 2


def test_the_best_way_is_compared_with_its_latest_epoch():
    # The best way's mean is its last epoch's, so a trial is judged against the load of
    # the moment: here the load doubled all latencies before the trial.
    p = policy(first=DIRECT)
    key = p.level(16)
    ways(p, key, {DIRECT: 1.0, MERGE: 1.5}, GAP_FIRST - 1)
    seen = ways(p, key, {DIRECT: 2.0, MERGE: 1.8}, 2)
    assert seen == [DIRECT, MERGE] and p.levels[key].best == MERGE


def test_calls_of_an_ended_epoch_are_not_counted():
    # A trial that lost early leaves timed calls in flight: their latencies come after
    # the next epoch began; they end its wait for them, and are not timed in it.
    p = policy(first=DIRECT)
    key = p.level(16)
    ways(p, key, {DIRECT: 1.0, MERGE: 1.0}, GAP_FIRST)
    level = p.levels[key]
    tickets = [p.way(key) for _ in range(level.calls)]
    assert tickets[-1][0] == MERGE and level.trying
    in_flight = [t for _, t in tickets]
    while level.trying:
        p.record(in_flight.pop(0), 10.0)
    assert in_flight and level.current[:2] == (DIRECT, GAP_FIRST + 1)
    assert level.current[3] is None                  # waiting for the trial's calls
    for ticket in in_flight:
        p.record(ticket, 10.0)
    assert (level.n, level.total) == (0, 0.0) and level.current[3] is not None
    assert level.current[:2] == (DIRECT, GAP_FIRST + 1)


def test_each_level_keeps_its_own_way():
    p = policy(first=DIRECT)
    low, high = p.level(4), p.level(16)
    ways(p, low, {DIRECT: 1.0, MERGE: 2.0}, 20)
    ways(p, high, {DIRECT: 2.0, MERGE: 1.0}, 20)
    assert (p.levels[low].best, p.levels[high].best) == (DIRECT, MERGE)
    described = {d['callers']: d for d in p.describe()}
    assert described['3-4']['way'] == DIRECT and described['9-16']['way'] == MERGE
    assert described['9-16']['merge_ms'] == pytest.approx(1000.0)
