"""The merge policy alone: made-up latencies and a made-up clock in, the way per load
level out (no threads, no TensorFlow)."""
from keras_fastpredict.engine import merge_policy
from keras_fastpredict.engine.merge_policy import (DIRECT, MERGE, GAP, REFERENCE, TRIAL,
                                                   GAP_FIRST, GAP_MAX, DRAIN, TRIM)


class Clock(object):
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def policy(first=DIRECT, slots=2):
    return merge_policy.Policy(slots, lambda: first, Clock())


def opened(p, key):
    """The level ``key`` of policy ``p``, made as a first call makes it."""
    p.levels.setdefault(key, merge_policy.Level(key, p.slots, p.prior()))
    return p.levels[key]


def phase(p, key, cost, step=0.1):
    """Calls at level ``key`` until its phase ends, one after the other: each moves the
    clock by ``step``, and a timed one takes cost[way] seconds. Returns (way, phase,
    calls made, calls timed)."""
    level = opened(p, key)
    way, name, arrivals = level.current[:3]
    calls = timed = 0
    while level.current[2] is arrivals:
        w, ticket = p.way(key)
        calls += 1
        p.clock.t += step
        if ticket is not None:
            timed += ticket[2] is not merge_policy._TURN
            p.record(ticket, cost[w])
    return way, name, calls, timed


def phases(p, key, cost, n):
    return [phase(p, key, cost) for _ in range(n)]


def lost_after(level, ratio):
    """Timed calls after which a trial ``ratio`` times slower than the reference cannot
    win any more: the rest could displace as many of them among the fastest kept."""
    n = 1
    while ratio * (level.kept - (level.calls - n)) <= level.kept:
        n += 1
    return n


def test_levels_are_powers_of_two_above_the_slots():
    p = policy(slots=2)
    assert [p.level(c) for c in (1, 2, 3, 4, 5, 8, 9, 16, 17, 32)] == \
        [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    p = policy(slots=1)
    assert [p.level(c) for c in (1, 2, 3, 4, 5)] == [0, 1, 2, 2, 3]


def test_a_first_epoch_times_its_first_arrivals():
    p = policy(slots=2)
    key = p.level(16)                   # 9-16 callers: 32 calls timed per epoch
    tickets = [p.way(key)[1] for _ in range(50)]
    assert all(t is not None for t in tickets[:32]) and tickets[32:] == [None] * 18
    assert p.levels[key].calls == 32


def test_a_check_is_a_reference_epoch_then_a_trial_then_a_gap():
    p = policy(first=DIRECT)
    key = p.level(16)
    calls = opened(p, key).calls
    seen = phases(p, key, {DIRECT: 1.0, MERGE: 1.5}, 4)
    assert [s[:2] for s in seen] == [(DIRECT, REFERENCE), (MERGE, TRIAL), (DIRECT, GAP),
                                     (DIRECT, REFERENCE)]
    assert seen[0][3] == seen[3][3] == calls
    assert seen[1][3] == lost_after(p.levels[key], 1.5) == 23     # (it lost early)
    # The gap is untimed: after a loss, 2 x GAP_FIRST epochs' worth of calls (the turn's
    # call ends it).
    assert seen[2][2] == 2 * GAP_FIRST * calls + 1 and seen[2][3] == 0


def test_the_faster_way_is_found_and_kept():
    # Prior DIRECT; merging is twice as fast: the first trial switches for good, and
    # later checks of DIRECT are trials only, ever rarer.
    p = policy(first=DIRECT)
    key = p.level(16)
    seen = phases(p, key, {DIRECT: 2.0, MERGE: 1.0}, 40)
    assert seen[1][:2] == (MERGE, TRIAL) and p.levels[key].best == MERGE
    direct = sum(s[2] for s in seen[2:] if s[0] == DIRECT)
    assert all(s[1] == TRIAL for s in seen[2:] if s[0] == DIRECT)
    assert direct < 0.1 * sum(s[2] for s in seen[2:])
    assert p.levels[key].switches == 1


def test_a_prior_that_is_wrong_costs_one_epoch():
    p = policy(first=MERGE)
    key = p.level(4)
    seen = phases(p, key, {DIRECT: 1.0, MERGE: 1.5}, 3)
    assert [s[:2] for s in seen] == [(MERGE, REFERENCE), (DIRECT, TRIAL), (DIRECT, GAP)]
    assert p.levels[key].best == DIRECT and p.levels[key].switches == 1


def test_a_losing_way_is_checked_ever_less_often():
    p = policy(first=DIRECT)
    key = p.level(8)
    calls = opened(p, key).calls
    seen = phases(p, key, {DIRECT: 1.0, MERGE: 3.0}, 60)
    gaps = [s[2] - 1 for s in seen if s[1] == GAP]
    # Each loss doubles the gap, up to GAP_MAX epochs' worth of calls.
    expected = [min(GAP_FIRST << (i + 1), GAP_MAX) * calls for i in range(len(gaps))]
    assert gaps == expected
    assert p.levels[key].best == DIRECT and p.levels[key].switches == 0


def test_a_trial_that_cannot_win_ends_early():
    p = policy(first=DIRECT)
    key = p.level(16)
    calls = opened(p, key).calls
    phase(p, key, {DIRECT: 1.0, MERGE: 4.0})
    way, name, _, timed = phase(p, key, {DIRECT: 1.0, MERGE: 4.0})
    # Four times slower: after 12 of its 32 calls, even 20 instant ones to come would
    # leave its mean (of the fastest 28) above the reference's.
    assert (way, name) == (MERGE, TRIAL) and timed == lost_after(p.levels[key], 4.0) == 12
    assert calls == 32
    assert p.levels[key].current[:2] == (DIRECT, GAP)


def test_after_a_switch_no_call_is_timed_until_the_other_way_drained():
    # Calls made the old way and still out (queued, say) would make the first calls of
    # the new way look faster or slower than they are.
    p = policy(first=DIRECT)
    key = p.level(16)
    level = opened(p, key)
    tickets = [p.way(key)[1] for _ in range(level.calls)]
    for t in tickets[:-1]:
        p.record(t, 1.0)
    p.record(tickets[-1], 50.0)          # an outlier: left out of the mean
    assert level.current[:2] == (MERGE, TRIAL) and level.means[DIRECT] == 1.0
    drained = p.clock.t + DRAIN * 1.0
    p.clock.t = drained - 0.01
    assert p.way(key)[1] is None
    p.clock.t = drained
    assert p.way(key)[1] is not None


def test_after_a_lost_trial_the_next_reference_waits_for_its_calls():
    p = policy(first=DIRECT)
    key = p.level(16)
    level = opened(p, key)
    phase(p, key, {DIRECT: 1.0, MERGE: 5.0})
    phase(p, key, {DIRECT: 1.0, MERGE: 5.0})                 # the trial, lost
    assert level.current[:2] == (DIRECT, GAP)
    resume = level.resume
    assert resume is not None and resume > p.clock.t
    for _ in range(2 * GAP_FIRST * level.calls + 1):         # the gap, with its turn
        way, ticket = p.way(key)
        if ticket is not None:
            p.record(ticket, 1.0)
    assert level.current[:2] == (DIRECT, REFERENCE) and level.current[4] == resume
    assert p.way(key)[1] is None
    p.clock.t = resume
    assert p.way(key)[1] is not None


def test_calls_of_an_ended_phase_are_not_counted():
    # A trial that lost early leaves timed calls in flight: their latencies come after
    # the gap began, and count nowhere.
    p = policy(first=DIRECT)
    key = p.level(16)
    level = opened(p, key)
    phase(p, key, {DIRECT: 1.0, MERGE: 1.0})
    p.clock.t += 100
    tickets = [p.way(key)[1] for _ in range(level.calls)]
    assert level.current[:2] == (MERGE, TRIAL) and all(tickets)
    while level.current[1] is TRIAL:
        p.record(tickets.pop(0), 10.0)
    before = (list(level.latencies), level.current, dict(level.means))
    for ticket in tickets:
        p.record(ticket, 10.0)
    assert (level.latencies, level.current, level.means) == before


def test_a_change_of_load_is_followed():
    # Merging wins, then stops winning (the machine got busy, the model's runs got
    # cheaper...): the level goes back at its next check, within GAP_MAX epochs.
    p = policy(first=DIRECT)
    key = p.level(16)
    calls = opened(p, key).calls
    phases(p, key, {DIRECT: 2.0, MERGE: 1.0}, 60)
    assert p.levels[key].best == MERGE
    later = phases(p, key, {DIRECT: 1.0, MERGE: 2.0}, 4)
    made = 0
    for way, name, n, _ in later:
        if way == DIRECT and name == TRIAL:
            break
        made += n
    assert made <= (GAP_MAX + 2) * calls + 1
    assert p.levels[key].best == DIRECT and p.levels[key].switches == 2


def test_a_trial_is_judged_against_the_reference_just_before_it():
    # The load doubled all latencies since the last check: the reference epoch measures
    # the best way under today's load, so the trial is not judged by yesterday's.
    p = policy(first=DIRECT)
    key = p.level(16)
    phases(p, key, {DIRECT: 1.0, MERGE: 1.5}, 3)           # reference, trial, gap
    seen = phases(p, key, {DIRECT: 2.0, MERGE: 1.8}, 2)
    assert [s[:2] for s in seen] == [(DIRECT, REFERENCE), (MERGE, TRIAL)]
    assert p.levels[key].best == MERGE


def test_an_epoch_mean_leaves_out_its_slowest_eighth():
    p = policy(first=DIRECT)
    key = p.level(16)
    level = opened(p, key)
    tickets = [p.way(key)[1] for _ in range(level.calls)]
    slow = level.calls // TRIM
    for i, t in enumerate(tickets):
        p.record(t, 100.0 if i < slow else 1.0 + i / 1000.0)
    kept = [1.0 + i / 1000.0 for i in range(slow, level.calls)]
    assert level.means[DIRECT] == sum(kept) / len(kept)


def test_each_level_keeps_its_own_way():
    p = policy(first=DIRECT)
    low, high = p.level(4), p.level(16)
    phases(p, low, {DIRECT: 1.0, MERGE: 2.0}, 6)
    phases(p, high, {DIRECT: 2.0, MERGE: 1.0}, 6)
    assert (p.levels[low].best, p.levels[high].best) == (DIRECT, MERGE)
    described = {d['callers']: d for d in p.describe()}
    assert described['3-4']['way'] == DIRECT and described['9-16']['way'] == MERGE
    assert described['9-16']['merge_ms'] == 1000.0
