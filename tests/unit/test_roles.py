"""The role planner (scheduler/roles.py): when a worker's role changes, and when not.
Pure: time passed in."""

from scheduler.roles import RolePlanner, RolePlannerConfig, Signals, kinds


def ticks(pl, s, start, end, every=5):
    """The flips of ticks every `every` s over [start, end), all with signals `s`."""
    return [f for t in range(start, end, every) for f in pl.tick(float(t), s)]


def test_role_kinds():
    assert kinds("prefill") == {"prefill"}
    assert kinds("mixed") == {"prefill", "decode", "local"}
    assert kinds("mixed", "prefill") == {"prefill"}          # draining decode work


def test_role_planner_flips_only_after_a_sustained_shift():
    pl = RolePlanner(RolePlannerConfig(window_s=30, dwell_s=60))
    roles = {"p": "prefill", "d": "decode"}
    decode_heavy = Signals(decode_pressure=1.2, prefill_pressure=0.0, roles=roles)
    assert pl.tick(0.0, decode_heavy) == []
    assert pl.tick(20.0, decode_heavy) == []
    flips = pl.tick(31.0, decode_heavy)
    assert [(f.worker_id, f.role, f.reason) for f in flips] == [("p", "mixed",
                                                                 "decode_pressure")]
    roles = {"p": "mixed", "d": "decode"}
    prefill_heavy = Signals(0.2, 0.9, roles, decode_after=0.6)
    assert pl.tick(40.0, prefill_heavy) == []
    assert pl.tick(80.0, prefill_heavy) == []         # 40 s of it, but inside the dwell
    assert [f.role for f in pl.tick(92.0, prefill_heavy)] == ["prefill"]


def test_a_mixed_worker_stays_mixed_while_the_decode_side_could_not_carry_its_streams():
    """Prefill pressure alone is not enough to go back: were the mixed worker's streams
    to move, the decode worker would be pressed past the point that made it mixed."""
    pl = RolePlanner(RolePlannerConfig(window_s=30, dwell_s=60))
    roles = {"p": "mixed", "d": "decode"}
    assert ticks(pl, Signals(0.6, 0.9, roles, decode_after=0.9), 0, 300) == []
    # the same pressures, but one worker could carry every stream: back after the window
    flips = ticks(pl, Signals(0.6, 0.9, roles, decode_after=0.7), 300, 380)
    assert [(f.worker_id, f.role, f.reason) for f in flips] == [("p", "prefill",
                                                                 "prefill_pressure")]


def test_no_flip_to_mixed_where_one_more_decoder_would_save_next_to_nothing():
    """A step that is mostly its fixed part (a CPU engine at a few streams) sits near the
    threshold at any batch: spreading the streams gains nothing, so no flip (a matrix run
    saw a prefill worker made mixed at pressure 0.81 against 0.80, then lose cells)."""
    pl = RolePlanner(RolePlannerConfig(window_s=30, dwell_s=60))
    roles = {"p": "prefill", "d": "decode"}
    assert ticks(pl, Signals(0.81, 0.08, roles, decode_gain=0.02), 0, 300) == []
    flips = ticks(pl, Signals(1.1, 0.08, roles, decode_gain=0.3), 300, 340)
    assert [(f.worker_id, f.role) for f in flips] == [("p", "mixed")]


def test_a_mixed_worker_goes_back_once_its_decoding_buys_next_to_nothing():
    pl = RolePlanner(RolePlannerConfig(window_s=30, dwell_s=60))
    roles = {"p": "mixed", "d": "decode"}
    pl.last_flip = 0.0                      # it just became mixed
    busy = Signals(0.9, 0.1, roles, decode_after=1.2, decode_gain=0.1, decode_loss=0.3)
    idle = Signals(0.3, 0.1, roles, decode_after=0.31, decode_gain=0.0, decode_loss=0.01)
    assert ticks(pl, busy, 0, 200) == []
    assert pl.tick(200.0, idle) == []
    assert pl.tick(220.0, idle) == []                 # inside its window
    flips = pl.tick(231.0, idle)
    assert [(f.worker_id, f.role, f.reason) for f in flips] == [("p", "prefill",
                                                                 "decode_slack")]
    # inside the dwell after a flip: not again
    pl2 = RolePlanner(RolePlannerConfig(window_s=30, dwell_s=60))
    pl2.last_flip = 0.0
    assert ticks(pl2, idle, 0, 60) == []


def test_role_planner_does_not_flap_on_a_noisy_trace():
    pl = RolePlanner(RolePlannerConfig(window_s=30, dwell_s=60))
    roles = {"p": "prefill", "d": "decode"}
    flips = []
    for i in range(600):          # pressure flickers above and below the thresholds
        t = i * 1.0
        dp = 1.0 if (i // 7) % 2 else 0.3
        pp = 0.6 if (i // 11) % 2 else 0.1
        flips += pl.tick(t, Signals(dp, pp, roles))
    assert flips == []
    # a mixed worker whose decoding is worth a lot one moment and nothing the next
    pl = RolePlanner(RolePlannerConfig(window_s=30, dwell_s=60))
    roles = {"p": "mixed", "d": "decode"}
    for i in range(600):
        loss = 0.02 if (i // 13) % 2 else 0.4
        flips += pl.tick(i * 1.0, Signals(0.9, 0.1, roles, 1.3, 0.3, loss))
    assert flips == []
