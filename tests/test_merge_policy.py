"""The merge policy alone: made-up arrivals and a made-up clock in, the way per load level
out (no threads, no TensorFlow)."""
import math

import pytest

from keras_fastpredict.engine import merge_policy
from keras_fastpredict.engine.merge_policy import (DIRECT, MERGE, GAP, REFERENCE, TRIAL,
                                                   GAP_FIRST, GAP_MAX, GAP_PER_LOSS,
                                                   GAP_SWITCH_MAX,
                                                   GAP_LOSS_MAX, DRAIN, DRAIN_MAX,
                                                   MARGIN, loss_gap)


class Clock(object):
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def policy(first=DIRECT, slots=2, wait=0):
    return merge_policy.Policy(slots, lambda key: (first, wait), Clock())


def opened(p, key):
    """The level ``key`` of policy ``p``, opened as a first call opens it, past its first
    epoch (not measured: its callers are just arriving)."""
    level = p.levels.get(key)
    if level is None:
        level = p._open(key)
        while level.current[1] is GAP:
            way, ticket = p.way(key, p.slots << key)
            p.clock.t += 1e-3
            if ticket is not None:
                p.turn(ticket)
    return level


def phase(p, key, cost, callers=None):
    """Arrivals at level ``key`` until its phase ends. A closed loop: ``callers`` callers
    (the level's most, by default) call again as soon as they return, and a call takes
    cost[way] seconds, so one arrives every cost[way] / callers seconds. ``cost`` may
    also map a way to (seconds between arrivals, callers inside): an open loop. Returns
    (way, phase, arrivals)."""
    level = opened(p, key)
    current = level.current
    n = callers or (p.slots << key)
    count = 0
    while level.current is current:
        c = cost[level.current[0]]
        step, inside = c if isinstance(c, tuple) else (c / n, n)
        way, ticket = p.way(key, inside)
        count += 1
        p.clock.t += step
        if ticket is not None:
            p.turn(ticket)
    return current[0], current[1], count


def phases(p, key, cost, n, callers=None):
    return [phase(p, key, cost, callers) for _ in range(n)]


def test_levels_are_powers_of_two_above_the_slots():
    p = policy(slots=2)
    assert [p.level(c) for c in (1, 2, 3, 4, 5, 8, 9, 16, 17, 32)] == \
        [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    p = policy(slots=1)
    assert [p.level(c) for c in (1, 2, 3, 4, 5)] == [0, 1, 2, 2, 3]


def test_an_epoch_measures_the_mean_time_inside_by_littles_law():
    # 16 callers, each call 2 ms: an arrival every 0.125 ms, so W = 16 / 8000/s = 2 ms.
    p = policy(first=DIRECT)
    key = p.level(16)
    way, name, arrivals = phase(p, key, {DIRECT: 2e-3, MERGE: 1e-3})
    level = p.levels[key]
    assert (way, name, arrivals) == (DIRECT, REFERENCE, level.calls + 1)
    # (The ending arrival's own interval counts: W is off by one arrival in 64.)
    assert level.times[DIRECT] == pytest.approx(2e-3 * (level.calls + 1) / level.calls)


def test_with_calls_arriving_at_a_fixed_rate_fewer_callers_inside_wins():
    # A server below capacity: calls arrive every 0.1 ms whichever way; merged, 4 callers
    # are inside on average, direct 8 (each call takes twice as long).
    p = policy(first=DIRECT)
    key = p.level(8)
    phases(p, key, {DIRECT: (1e-4, 8), MERGE: (1e-4, 4)}, 2)
    assert p.levels[key].best == MERGE
    assert p.levels[key].times[MERGE] == pytest.approx(p.levels[key].times[DIRECT] / 2,
                                                       rel=0.05)


def test_a_check_is_a_reference_epoch_then_a_trial_then_a_gap():
    p = policy(first=DIRECT)
    key = p.level(16)
    calls = opened(p, key).calls
    seen = phases(p, key, {DIRECT: 1.0, MERGE: 1.03}, 4)
    assert [s[:2] for s in seen] == [(DIRECT, REFERENCE), (MERGE, TRIAL), (DIRECT, GAP),
                                     (DIRECT, REFERENCE)]
    # After a close loss the gap is 2 x GAP_FIRST epochs' worth of calls (the turn's
    # call included). (3% lost: the trial's 112 calls, its drain's included, cost
    # 3.4 calls more than direct ones, within 1 / GAP_PER_LOSS of 2 epochs' 128.)
    assert seen[2][2] == 2 * GAP_FIRST * calls + 1


def test_the_faster_way_is_found_and_kept():
    # Guess DIRECT; merging is twice as fast: the first trial switches for good, and
    # later DIRECT runs only in trials, ever rarer.
    p = policy(first=DIRECT)
    key = p.level(16)
    seen = phases(p, key, {DIRECT: 2.0, MERGE: 1.0}, 40)
    assert seen[1][:2] == (MERGE, TRIAL) and p.levels[key].best == MERGE
    later = seen[2:]
    assert all(name == TRIAL for way, name, _ in later if way == DIRECT)
    assert sum(n for way, _, n in later if way == DIRECT) < 0.05 * sum(n for *_, n in later)
    assert p.levels[key].switches == 1


def test_a_wrong_guess_costs_one_epoch():
    p = policy(first=MERGE)
    key = p.level(4)
    seen = phases(p, key, {DIRECT: 1.0, MERGE: 1.5}, 3)
    assert [s[:2] for s in seen] == [(MERGE, REFERENCE), (DIRECT, TRIAL), (DIRECT, GAP)]
    assert p.levels[key].best == DIRECT and p.levels[key].switches == 1


def test_a_losing_way_is_checked_ever_less_often():
    p = policy(first=DIRECT)
    key = p.level(8)
    calls = opened(p, key).calls
    seen = phases(p, key, {DIRECT: 1.0, MERGE: 1.03}, 60)
    gaps = [n - 1 for _, name, n in seen if name == GAP]
    assert gaps == [min(GAP_FIRST << (i + 1), GAP_MAX) * calls for i in range(len(gaps))]
    assert p.levels[key].best == DIRECT and p.levels[key].switches == 0


def gap_after_loss(gap, ratio, ran, calls):
    """The gap after a loss: doubling up to GAP_MAX, or in proportion to the loss and to
    the trial's ``ran`` calls (an epoch's at least)."""
    return max(min(2 * gap, GAP_MAX), loss_gap(ratio, ran, calls))


def test_loss_gap():
    # GAP_PER_LOSS x the calls' extra time, in epochs, rounded up: 64 calls at 1.5 times
    # the best way's time cost 32 calls' time more, so 32 x 32 calls = 16 epochs of 64.
    assert loss_gap(1.5, 64, 64) == GAP_PER_LOSS // 2
    assert loss_gap(1.5, 96, 64) == 3 * GAP_PER_LOSS // 4
    assert loss_gap(1.5, 10, 64) == GAP_PER_LOSS // 2           # an epoch's at least
    assert loss_gap(1.01, 64, 64) == 1 and loss_gap(0.95, 64, 64) <= 0
    assert loss_gap(1e6, 64, 64) == loss_gap(float('inf'), 64, 64) == GAP_LOSS_MAX


def test_the_worse_a_way_lost_the_longer_until_it_is_checked_again():
    # A check costs (its time / the best's - 1) x its calls more than the best way would
    # have: the trial's 65 calls and its drain's (3 reference times: 48 / ratio calls at
    # 16 callers), 64 at least. After a loss the gap is at least GAP_PER_LOSS times that,
    # so checks stay a small share of the time, also past GAP_MAX for a way many times
    # slower (up to GAP_LOSS_MAX). (A trial 6 times slower is cut early: charged 64.)
    for ratio, gap in [(1.05, 3), (1.3, 16), (1.5, 25), (6.0, 5 * GAP_PER_LOSS),
                       (1000.0, GAP_LOSS_MAX)]:
        p = policy(first=DIRECT)
        key = p.level(16)
        (_, _, _), (way, name, ran) = phases(p, key, {DIRECT: 1.0, MERGE: ratio}, 2)
        level = p.levels[key]
        assert (way, name) == (MERGE, TRIAL) and level.current[:2] == (DIRECT, GAP)
        measured = level.times[MERGE] / level.times[DIRECT]
        assert level.gap == gap_after_loss(GAP_FIRST, measured, ran, level.calls)
        assert abs(level.gap - gap) <= max(1, 0.05 * gap), (ratio, level.gap)


def test_checks_cost_at_most_their_share_of_the_time_the_trials_drain_included():
    # A check costs what its calls of the other way took beyond what the best way would
    # have: every one of them, the trial's drain (3 reference times after the switch, run
    # the trial's way but not counted in its W) included. The gap after a loss keeps each
    # check, with the gap after it, within 1 / GAP_PER_LOSS of the time. (Closed loop:
    # N callers, a call of way w takes cost[w], so each arrival of way w adds
    # cost[w] / N seconds; 8 callers: 32-call epochs and a drain of 24 / ratio arrivals;
    # 16 callers: 64 and 48 / ratio.)
    for callers in (8, 16):
        for ratio in (1.05, 1.15, 1.3, 1.6, 2.0, 3.0, 20.0):
            p = policy(first=DIRECT)
            key = p.level(callers)
            cost = {DIRECT: 1.0, MERGE: ratio}
            seen = phases(p, key, cost, 3 * 12)
            assert [s[1] for s in seen] == [REFERENCE, TRIAL, GAP] * 12
            for k in range(0, len(seen), 3):
                spent = sum(n * cost[way] / callers for way, _, n in seen[k:k + 3])
                trial = seen[k + 1][2]
                extra = trial * (ratio - 1.0) / callers
                assert extra <= spent / GAP_PER_LOSS, (callers, ratio, k, extra / spent)


def test_a_trial_that_cannot_win_ends_early():
    # Judged from its second arrival against a bar that comes down as arrivals add up
    # (10 times the reference at 2, 4 at 8): a trial 20 times slower ends at its second
    # counted arrival, one 3 times slower within its first 32 (of 64).
    for ratio, most in [(20.0, 2), (3.0, 32)]:
        p = policy(first=DIRECT)
        key = p.level(16)
        level = opened(p, key)
        phase(p, key, {DIRECT: 1.0, MERGE: ratio})
        reference = level.times[DIRECT]
        way, name, arrivals = phase(p, key, {DIRECT: 1.0, MERGE: ratio})
        # Arrivals in the drain (3 reference times, one every ratio/16 s) are not counted.
        drain = int(DRAIN * reference / (ratio / 16)) + 1
        assert (way, name) == (MERGE, TRIAL) and level.calls == 64
        assert 2 <= arrivals - drain <= most, (ratio, arrivals - drain)
        assert level.current[:2] == (DIRECT, GAP)
        assert level.gap == gap_after_loss(GAP_FIRST, level.times[MERGE] / reference,
                                           arrivals, level.calls)


def test_after_a_switch_arrivals_count_once_the_other_way_drained():
    # Calls made the old way and still out (queued, say) would make the first calls of
    # the new way look faster or slower than they are.
    p = policy(first=DIRECT)
    key = p.level(16)
    level = opened(p, key)
    phase(p, key, {DIRECT: 1.0, MERGE: 1.0})
    assert level.current[:2] == (MERGE, TRIAL)
    start = level.current[4]
    assert start == pytest.approx(p.clock.t + DRAIN * level.times[DIRECT])
    p.clock.t = start - 0.01
    p.way(key, 16)
    assert level.current[3] == []                   # not counted
    p.clock.t = start
    p.way(key, 16)
    assert level.current[3] == [16] and level.began == start


def test_a_merge_trial_counts_no_arrival_while_the_direct_runs_begun_before_it_are_out():
    # 16 oversubscribed direct runs take up to several times their mean: a trial of
    # merging begun after DRAIN mean times would be judged on their stragglers. Its drain
    # lasts while ``pending`` says they are out (asked as the trial begins, with the way
    # switched from), and DRAIN_MAX mean times at most.
    out = [True]
    asked = []

    def pending(way):
        asked.append(way)
        return lambda: out[0]
    for returned in (True, False):
        out[0] = True
        p = merge_policy.Policy(2, lambda key: (DIRECT, 0), Clock(), pending=pending)
        key = p.level(16)
        level = opened(p, key)
        phase(p, key, {DIRECT: 1.0, MERGE: 1.0})
        assert level.current[:2] == (MERGE, TRIAL) and asked[-1] == DIRECT
        start, reference = level.current[4], level.times[DIRECT]
        p.clock.t = start + reference
        p.way(key, 16)
        assert level.current[3] == []                   # the direct runs are out
        if returned:
            out[0] = False
            p.clock.t += 1e-3
        else:
            assert level.hold_end == pytest.approx(start + (DRAIN_MAX - DRAIN) * reference)
            p.clock.t = level.hold_end
        p.way(key, 16)
        assert level.current[3] == [16] and level.began == p.clock.t
        out[0] = True                   # (over for good: a run begun since does not count)
        p.way(key, 16)
        assert level.current[3] == [16, 16]
    # A trial of direct runs (after a reference of merging) is not asked about.
    asked[:] = []
    p = merge_policy.Policy(2, lambda key: (MERGE, 0), Clock(), pending=pending)
    key = p.level(16)
    opened(p, key)
    phase(p, key, {DIRECT: 1.0, MERGE: 1.0})
    assert asked == [MERGE] and p.levels[key].current[:2] == (DIRECT, TRIAL)


def test_after_a_lost_trial_the_next_reference_waits_for_its_calls():
    p = policy(first=DIRECT)
    key = p.level(16)
    level = opened(p, key)
    phases(p, key, {DIRECT: 1.0, MERGE: 1.5}, 2)           # the reference; the trial, lost
    assert level.current[:2] == (DIRECT, GAP)
    resume = level.resume
    assert resume is not None and resume > p.clock.t
    for _ in range(level.current[5] + 1):                   # the gap, with its turn
        way, ticket = p.way(key, 16)
        if ticket is not None:
            p.turn(ticket)
    assert level.current[:2] == (DIRECT, REFERENCE) and level.current[4] == resume
    p.way(key, 16)
    assert level.current[3] == []
    p.clock.t = resume
    p.way(key, 16)
    assert level.current[3] == [16]


def test_a_phase_ended_already_is_not_ended_again():
    # Two arrivals may both find a trial losing: the second's ticket changes nothing.
    p = policy(first=DIRECT)
    key = p.level(16)
    level = opened(p, key)
    phase(p, key, {DIRECT: 1.0, MERGE: 1.0})
    p.clock.t = level.current[4]                    # the trial's drain is over
    for _ in range(20):
        p.way(key, 16)
    ticket = (key, level.current, merge_policy._LOST)
    p.turn(ticket)
    assert level.current[:2] == (DIRECT, GAP)
    after = (level.current, level.gap, dict(level.times), level.epochs)
    p.turn(ticket)
    assert (level.current, level.gap, level.times, level.epochs) == after


def test_a_change_of_load_is_followed():
    # Merging wins, then stops winning (the machine got busy, the model's runs got
    # cheaper...): the level goes back at its next check, within GAP_MAX epochs.
    p = policy(first=DIRECT)
    key = p.level(16)
    calls = opened(p, key).calls
    phases(p, key, {DIRECT: 2.0, MERGE: 1.0}, 60)
    assert p.levels[key].best == MERGE
    made = 0
    for way, name, n in phases(p, key, {DIRECT: 1.0, MERGE: 2.0}, 4):
        if way == DIRECT and name == TRIAL:
            break
        made += n
    assert made <= (GAP_MAX + 2) * calls + 1
    assert p.levels[key].best == DIRECT and p.levels[key].switches == 2


def test_a_trial_is_judged_against_the_reference_just_before_it():
    # The load doubled all times since the last check: the reference epoch measures the
    # best way under today's load, so the trial is not judged by yesterday's.
    p = policy(first=DIRECT)
    key = p.level(16)
    phases(p, key, {DIRECT: 1.0, MERGE: 1.5}, 3)            # reference, trial, gap
    seen = phases(p, key, {DIRECT: 2.0, MERGE: 1.6}, 2)
    assert [s[:2] for s in seen] == [(DIRECT, REFERENCE), (MERGE, TRIAL)]
    assert p.levels[key].best == MERGE


def test_a_trial_must_win_clearly():
    # A trial is measured just after a switch, a reference in steady state: a trial a
    # little faster (5%) does not change the way; one faster by more than MARGIN does.
    p = policy(first=DIRECT)
    key = p.level(16)
    phases(p, key, {DIRECT: 1.0, MERGE: 0.95}, 2)
    assert p.levels[key].best == DIRECT
    q = policy(first=DIRECT)
    phases(q, key, {DIRECT: 1.0, MERGE: 0.85}, 2)
    assert q.levels[key].best == MERGE
    assert MARGIN == 0.1


def test_each_level_keeps_its_own_way():
    p = policy(first=DIRECT)
    low, high = p.level(4), p.level(16)
    phases(p, low, {DIRECT: 1.0, MERGE: 2.0}, 6)
    phases(p, high, {DIRECT: 2.0, MERGE: 1.0}, 6)
    assert (p.levels[low].best, p.levels[high].best) == (DIRECT, MERGE)
    described = {d['callers']: d for d in p.describe()}
    assert described['3-4']['way'] == DIRECT and described['9-16']['way'] == MERGE
    assert described['9-16']['merge_ms'] == pytest.approx(1000.0, rel=0.02)


def test_a_new_level_starts_the_way_its_nearest_measured_neighbour_goes():
    p = policy(first=DIRECT)
    phases(p, p.level(16), {DIRECT: 2.0, MERGE: 1.0}, 3)     # 9-16 callers: MERGE
    assert p.way(p.level(4), 4)[0] == MERGE                   # 3-4: nearest is 9-16
    assert p.way(p.level(64), 64)[0] == MERGE
    q = policy(first=DIRECT)
    assert q.way(q.level(64), 64)[0] == DIRECT                # nothing measured: the guess


def test_an_epoch_restarts_when_its_arrivals_come_sparsely():
    # A level callers reach now and then (on their way to another) is not measured over
    # the time they spent elsewhere: a long gap between its arrivals restarts its epoch.
    p = policy(first=DIRECT)
    key = p.level(8)
    level = opened(p, key)
    for _ in range(10):
        p.way(key, 8)
        p.clock.t += 0.001
    assert len(level.current[3]) == 10
    p.clock.t += 1.0                                # a second of other levels' calls
    way, ticket = p.way(key, 8)
    assert ticket is not None
    p.turn(ticket)
    assert level.current[:2] == (DIRECT, REFERENCE) and level.current[3] == []
    assert level.began == p.clock.t and level.epochs == 0
    # A trial whose arrivals turn sparse ends, inconclusive: back to the best way, with
    # the same gap before the next check.
    phase(p, key, {DIRECT: 1.0, MERGE: 1.0})
    assert level.current[:2] == (MERGE, TRIAL)
    p.clock.t = level.current[4]
    for _ in range(10):
        p.way(key, 8)
        p.clock.t += 0.001
    gap = level.gap
    p.clock.t += 1.0
    way, ticket = p.way(key, 8)
    p.turn(ticket)
    assert level.current[:2] == (DIRECT, GAP) and level.gap == gap
    assert level.best == DIRECT and level.times[MERGE] is None


def test_restart_begins_every_measured_epoch_again():
    p = policy(first=DIRECT)
    low, high = p.level(4), p.level(16)
    opened(p, low)                                  # low: in its reference epoch
    phase(p, high, {DIRECT: 1.0, MERGE: 1.0})       # high: in its trial now
    p.clock.t = p.levels[high].current[4]
    for _ in range(5):
        p.way(low, 4)
        p.way(high, 16)
    p.restart()
    assert p.levels[low].current[:2] == (DIRECT, REFERENCE) and p.levels[low].current[3] == []
    assert p.levels[high].current[:2] == (DIRECT, REFERENCE)
    assert p.levels[high].current[3] == []


def test_a_new_level_first_goes_half_an_epoch_unmeasured():
    # Its callers have just arrived (threads starting, first runs of new batch sizes):
    # measured then, the way in use would look far slower than it is. Half an epoch: two
    # calls of each of the level's most callers.
    p = policy(first=DIRECT)
    key = p.level(16)
    level = p._open(key)
    calls = level.calls // 2
    assert calls == 2 * 16 and merge_policy.WARM_UP == 0.5
    assert level.current[:2] == (DIRECT, GAP)
    tickets = [p.way(key, 16)[1] for _ in range(calls + 1)]
    assert tickets[:calls] == [None] * calls and tickets[calls] is not None
    p.turn(tickets[calls])
    assert level.current[:2] == (DIRECT, REFERENCE) and level.epochs == 0
    assert level.gap == GAP_FIRST


def test_the_models_guess_is_read_after_a_first_epoch_run_direct():
    # When a level first opens the model may have run once, cold: the first epoch runs
    # direct (as concurrent=False does) and the guess is read at its end. A model faster
    # than a thread hand-off (see concurrent_batcher) stays direct and is first checked
    # some epochs later; a slower one merges, checked after one epoch.
    guesses = []
    p = merge_policy.Policy(2, lambda key: guesses.pop(0), Clock())
    key = p.level(16)
    guesses.append((DIRECT, 16))
    level = p._open(key)
    assert level.current[:2] == (DIRECT, GAP) and level.current[5] == level.calls // 2
    assert level.guess
    phase(p, key, {DIRECT: 1.0, MERGE: 1.0})           # the warm-up: the guess is read
    assert not guesses and level.current[:2] == (DIRECT, GAP)
    assert level.current[5] == 16 * level.calls and level.gap == GAP_FIRST
    q = merge_policy.Policy(2, lambda key: guesses.pop(0), Clock())
    guesses.append((MERGE, 0))
    q._open(key)
    phase(q, key, {DIRECT: 1.0, MERGE: 1.0})
    assert q.levels[key].current[:2] == (MERGE, REFERENCE)


def test_no_trial_of_merging_begins_before_merged_runs_are_real():
    # ready() says whether a merged run would be one (TF's multi-row kernels made: until
    # then merged calls run alone, one after another). While it says no, the reference
    # epoch of direct is measured again; once it says yes, the trial begins.
    made = []
    p = merge_policy.Policy(2, lambda key: (DIRECT, 0), Clock(), ready=lambda: bool(made))
    key = p.level(16)
    seen = phases(p, key, {DIRECT: 2.0, MERGE: 1.0}, 3)
    assert [s[:2] for s in seen] == [(DIRECT, REFERENCE)] * 3
    assert p.levels[key].checks == 0 and p.levels[key].times[MERGE] is None
    made.append(True)
    seen = phases(p, key, {DIRECT: 2.0, MERGE: 1.0}, 2)
    assert [s[:2] for s in seen] == [(DIRECT, REFERENCE), (MERGE, TRIAL)]
    assert p.levels[key].best == MERGE
    # A trial of direct (after a reference of merging) does not ask.
    made.clear()
    q = merge_policy.Policy(2, lambda key: (MERGE, 0), Clock(), ready=lambda: bool(made))
    q.levels[key] = merge_policy.Level(key, 2, MERGE)
    q._begin(q.levels[key], REFERENCE, MERGE, None)
    seen = phases(q, key, {DIRECT: 1.0, MERGE: 2.0}, 2)
    assert [s[:2] for s in seen] == [(MERGE, REFERENCE), (DIRECT, TRIAL)]


@pytest.mark.parametrize('ratio', [1.15, 1.5, 2.5, 10.0])
def test_after_a_switch_the_way_left_is_checked_as_after_a_lost_trial(ratio):
    # A switch is a check the way left lost, by the ratio of the two epochs' times: the
    # gap before its next check is a lost trial's (its reference epoch charged as the
    # trial's calls), GAP_SWITCH_MAX epochs at most.
    p = policy(first=DIRECT)
    key = p.level(16)
    calls = opened(p, key).calls
    seen = phases(p, key, {DIRECT: ratio, MERGE: 1.0}, 4)
    assert [s[:2] for s in seen] == [(DIRECT, REFERENCE), (MERGE, TRIAL), (MERGE, GAP),
                                     (MERGE, REFERENCE)]
    level = p.levels[key]
    ratio_seen = level.times[DIRECT] / level.times[MERGE]
    assert ratio_seen == pytest.approx(ratio, rel=0.05)
    gap = max(GAP_FIRST, min(GAP_SWITCH_MAX, math.ceil(GAP_PER_LOSS * (ratio_seen - 1))))
    assert seen[2][2] == gap * calls + 1
    assert GAP_FIRST < gap <= GAP_SWITCH_MAX
