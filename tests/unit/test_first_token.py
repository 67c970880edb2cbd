"""A remote prefill's first token kept for the stream: the choice (scheduler/adaptive.py
`remote`), when the chooser predicts the client sees it (`released`) and the frontend's
keeping of it (frontend/client.py `_kept_first`)."""

import asyncio
import dataclasses
import time

import pytest

from frontend.client import Chunk, _kept_first, release_at
from pdserve.kept_first import release_after
from pdserve.latency import Coef
from scheduler import adaptive as A
from scheduler import ranking as R
from scheduler.models import TAIL_MIN, LatencyBook, handoff_s, load_bucket
from tests.unit.adaptive_helpers import C as HC

CPU = Coef(step=0.045, prefill_ktok=2.0, decode_seq=0.002)
SLO = A.SLO(ttft_s=4.0, tpot_s=0.064, first_token="adaptive")   # the rule under test


def test_the_handoff_goes_in_ttft_where_tpot_binds_and_ttft_has_room():
    """8-token streams whose 200 ms handoff would add 22 ms to their TPOT: kept, the
    first token comes 200 ms and a step later, and their TPOT is a decode step's."""
    p, d = A.Node("p", CPU), A.Node("d", CPU, transfer_s=0.2)
    early = A.remote(p, d, 500, 8, dataclasses.replace(SLO, first_token="early"))
    kept = A.remote(p, d, 500, 8, SLO)
    assert not early.hold and early.tpot_s > SLO.tpot_s          # the handoff breaks it
    assert kept.hold and kept.score > 0 > early.score
    step = A.tpot_on(d, 500, 8, SLO)
    assert kept.score == pytest.approx(A.score(kept.ttft_s, step, SLO))   # scored by a step
    assert kept.tpot_s == pytest.approx(step * 6 / 7)   # the first two tokens together
    assert kept.ttft_s == pytest.approx(early.ttft_s + 0.2 + step)
    assert kept.first_s == early.ttft_s         # when the token is computed
    assert "first=with_stream" in kept.describe()
    # the prefill worker's queue leaves no TTFT room: sent as soon as it is computed
    busy = A.Node("p", CPU, backlog_s=3.8)
    assert not A.remote(busy, d, 500, 8, SLO).hold
    # no handoff measured (or none to move): nothing to gain
    assert not A.remote(p, A.Node("d", CPU), 500, 8, SLO).hold
    # 48-token streams absorb it (TPOT met with room): the first token goes at once
    long = A.remote(p, A.Node("d", CPU, transfer_s=0.1), 50, 48, SLO)
    assert not long.hold and long.score >= A.MARGIN
    # a handoff short on average (TPOT met) but one in ten as long as four steps (streams
    # landing during long steps): kept, since the early option may miss
    d_tail = A.Node("d", CPU, transfer_s=0.05, transfer_tail_s=0.25)
    assert A.remote(p, A.Node("d", CPU, transfer_s=0.05), 500, 8, SLO).score >= A.MARGIN
    assert A.remote(p, d_tail, 500, 8, SLO).hold


def test_options_are_ranked_by_the_ttft_the_client_sees():
    """A kept first token reaches the client after its handoff: a free decode engine that
    computes a short prompt as fast as the prefill worker answers it a handoff sooner, and
    takes it where that is more than a tie; within a tie, remote (the decode engine stays
    for decoding)."""
    ws = dataclasses.replace(SLO, ttft_s=0.6, first_token="with_stream")
    p, d = A.Node("p", CPU), A.Node("d", CPU, transfer_s=0.02)
    opts = A.options([p], [d], 64, 16, ws, {"d"})
    kinds = {o.kind: o for o in opts}
    remote, local = kinds["remote"], kinds["local"]
    assert remote.hold and remote.first_s == pytest.approx(local.first_s)   # computed alike
    assert remote.ttft_s - local.ttft_s > R.TIE * ws.ttft_s                  # seen: a handoff
    assert opts[0].kind == "local" and min(remote.score, local.score) >= A.MARGIN
    # a loose SLO puts the handoff within TIE of it, but the client still sees a TTFT
    # that much longer: not a tie while it is over TIE_REL of the faster one
    loose = dataclasses.replace(ws, ttft_s=4.0)
    assert remote.ttft_s - local.ttft_s < R.TIE * loose.ttft_s
    assert remote.ttft_s - local.ttft_s > R.TIE_REL * local.ttft_s
    assert A.options([p], [d], 64, 16, loose, {"d"})[0].kind == "local"
    # a long prompt computed alike either way: its handoff is a small share, a tie
    opts = A.options([p], [d], 2000, 16, loose, {"d"})
    kinds = {o.kind: o for o in opts}
    assert kinds["remote"].ttft_s - kinds["local"].ttft_s < R.TIE_REL * kinds["local"].ttft_s
    assert opts[0].kind == "remote"


def test_with_stream_keeps_every_first_token_that_has_a_stream():
    """--first-token with_stream (vLLM's and SGLang's P/D): kept whatever the scores, with
    the kept option's predictions; a one-token request has no stream to wait for."""
    ws = dataclasses.replace(SLO, first_token="with_stream")
    p, d = A.Node("p", CPU), A.Node("d", CPU, transfer_s=0.1)
    long = A.remote(p, d, 50, 48, ws)
    assert long.hold and not A.remote(p, d, 50, 48, SLO).hold     # adaptive sends it early
    assert long.ttft_s == pytest.approx(A.remote(p, d, 50, 48, SLO).ttft_s + 0.1
                                        + A.tpot_on(d, 50, 48, SLO))
    assert A.remote(p, A.Node("d", CPU), 50, 48, ws).hold          # no handoff measured yet
    assert not A.remote(p, d, 50, 1, ws).hold


def test_the_handoffs_tail_is_how_far_recent_ones_ran_over_the_fit():
    b = LatencyBook()
    assert b.handoff_over_s("d") is None and b.transfer_s("d", 1000) == 0.0
    for _ in range(TAIL_MIN - 1):
        b.observe_transfer("d", 10**6, 0.06)
        b.observe_handoff("d", 10**6, 0.06)
    assert b.handoff_over_s("d") is None                                # too few yet
    for i in range(30):       # eight in ten at 60 ms, two in ten stalls of 300 ms, which
        long = i % 10 >= 8    # the fit leaves out (handoff_s)
        if not long:
            b.observe_transfer("d", 10**6, 0.06)
        b.observe_handoff("d", 10**6, 0.3 if long else 0.06)
    assert handoff_s(300.0, (300 + 6 * 45) / 7, 8) is None          # a stall for the fit...
    assert handoff_s(300.0, (300 + 6 * 45) / 7, 8, stalls=True) == pytest.approx(0.255)
    base = b.transfer_s("d", 10**6)
    assert base < 0.15 and b.handoff_over_s("d") > 0.1
    b.forget("d")
    assert b.handoff_over_s("d") is None


def test_before_the_tail_is_learned_a_handoff_may_wait_a_step():
    """Fewer than TAIL_MIN handoffs into a decode worker: its tail is taken as the fit
    plus one of its steps (a stream that lands during a step waits for it), so an 8-token
    stream whose mean handoff leaves its TPOT barely within the SLO is kept; a long one,
    which absorbs a step, is not; with no handoff measured at all, nothing is kept."""
    fresh = A.Node("d", CPU, transfer_s=0.05, transfer_tail_s=None)
    p = A.Node("p", CPU)
    assert A.remote(p, A.Node("d", CPU, transfer_s=0.05), 500, 8, SLO).score >= A.MARGIN
    assert A.remote(p, fresh, 500, 8, SLO).hold
    assert not A.remote(p, fresh, 50, 48, SLO).hold
    assert not A.remote(p, A.Node("d", CPU, transfer_tail_s=None), 500, 8, SLO).hold


def _chunk(i: int) -> Chunk:
    return Chunk([i], f"t{i}")


async def _stream(delays, log, fail_at=None):
    """A prefill's first token at once, then the decode worker's after `delays`."""
    try:
        yield _chunk(0)
        for i, d in enumerate(delays, 1):
            await asyncio.sleep(d)
            if i == fail_at:
                raise ConnectionError("decode worker down")
            yield _chunk(i)
    finally:
        log.append("closed")


async def _collect(gen, t0):
    return [(c.token_ids[0], time.perf_counter() - t0) async for c in gen]


def test_the_first_token_waits_for_the_streams_first():
    async def go():
        log, ready = [], []
        t0 = time.perf_counter()
        got = await _collect(_kept_first(_stream([0.05, 0.01], log), t0 + 5.0,
                                         lambda: ready.append(time.perf_counter() - t0)), t0)
        return got, ready, log
    got, ready, log = asyncio.run(go())
    assert [i for i, _ in got] == [0, 1, 2] and log == ["closed"]
    assert ready[0] < 0.04 <= got[0][1]             # computed at once, out with the second
    assert got[1][1] - got[0][1] < 0.02


def test_the_first_token_goes_out_by_its_deadline():
    async def go():
        log = []
        t0 = time.perf_counter()
        return await _collect(_kept_first(_stream([0.5], log), t0 + 0.05, lambda: None), t0)
    got = asyncio.run(go())
    assert [i for i, _ in got] == [0, 1]
    assert 0.04 <= got[0][1] < 0.3 and got[1][1] >= 0.45


def test_a_decode_failure_before_its_first_token_leaves_the_client_without_one():
    """The client never had the first token: the request can be placed again from the
    start (ClusterClient.generate)."""
    async def go():
        log, seen = [], []
        t0 = time.perf_counter()
        with pytest.raises(ConnectionError):
            async for c in _kept_first(_stream([0.02], log, fail_at=1), t0 + 5.0,
                                       lambda: None):
                seen.append(c)
        return seen, log
    seen, log = asyncio.run(go())
    assert seen == [] and log == ["closed"]


def test_a_client_that_leaves_while_the_token_is_kept_closes_the_stream():
    async def go():
        log, kept = [], asyncio.Event()
        t0 = time.perf_counter()
        gen = _kept_first(_stream([5.0], log), t0 + 10.0, kept.set)
        task = asyncio.ensure_future(_collect(gen, t0))
        await kept.wait()           # the first token is computed and kept
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return list(log)    # as it is now, not after asyncio.run cancels what is left
    assert asyncio.run(go()) == ["closed"]


def test_streams_that_ran_over_their_prediction_make_the_early_option_a_risk():
    """Recent remote streams on a decode worker ran 20% over their predicted TPOT (one in
    ten): an 8-token stream predicted within the SLO with room is kept; with the model
    right (or too few samples yet) it goes early."""
    p = A.Node("p", CPU)
    d = A.Node("d", CPU, transfer_s=0.05)
    early = A.remote(p, d, 500, 8, SLO)
    assert not early.hold and early.score >= A.MARGIN
    assert A.remote(p, dataclasses.replace(d, tpot_under=0.2), 500, 8, SLO).hold
    b = LatencyBook()
    for _ in range(TAIL_MIN - 1):
        b.observe_tpot("d", 0.05, 0.07)
    assert b.tpot_under("d") == 0.0                      # too few yet
    for i in range(20):                                  # nine in ten right, one 40% over
        b.observe_tpot("d", 0.05, 0.07 if i % 10 == 0 else 0.05)
    assert b.tpot_under("d") == pytest.approx(0.4)
    b.forget("d")
    assert b.tpot_under("d") == 0.0


def test_a_kept_first_token_waits_for_the_typical_handoff():
    """Kept TTFT: computed, then the handoff at its recent median (the fit leaves the
    stalls out, so it runs low), then a decode step."""
    p = A.Node("p", CPU)
    ws = dataclasses.replace(SLO, first_token="with_stream")
    d = A.Node("d", CPU, transfer_s=0.05)
    base = A.remote(p, d, 500, 8, ws)
    mid = A.remote(p, dataclasses.replace(d, transfer_mid_s=0.12), 500, 8, ws)
    assert mid.ttft_s == pytest.approx(base.ttft_s + 0.07)
    assert A.remote(p, dataclasses.replace(d, transfer_mid_s=0.01), 500, 8, ws).ttft_s \
        == pytest.approx(base.ttft_s)                   # never under the fit


def test_the_handoff_is_learned_by_how_many_streams_the_decode_engine_ran():
    """Handoffs placed beside more streams wait longer (the step in progress is longer):
    each doubling bucket of streams has its own, once it has TAIL_MIN of them; until then,
    and for a bucket never seen, all of the worker's."""
    assert [load_bucket(s) for s in (0, 1, 2, 3, 4, 7, 8, 200)] == [0, 1, 2, 2, 3, 3, 4, 8]
    b = LatencyBook()
    for i in range(40):
        b.observe_transfer("d", 10**6, 0.02)
        b.observe_handoff("d", 10**6, 0.07 if i % 2 else 0.17, streams=0 if i % 2 else 3)
    idle, busy = b.handoff_over_s("d", 50, streams=0), b.handoff_over_s("d", 50, streams=2)
    assert idle == pytest.approx(0.05, abs=0.005) and busy == pytest.approx(0.15, abs=0.005)
    assert b.handoff_over_s("d", 50, streams=16) == b.handoff_over_s("d", 50)   # unseen
    b.observe_handoff("d", 10**6, 0.5, streams=16)
    assert b.handoff_over_s("d", 50, streams=16) == b.handoff_over_s("d", 50)   # too few
    b.forget("d")
    assert b.handoff_over_s("d", 50, streams=0) is None and not b.overs_at


def test_a_first_tokens_fixed_way_to_the_client_is_learned_per_worker_and_kind():
    """What no engine step holds (HTTP, tokenizing, routing, the RPCs): the median of how
    much later than predicted recent first tokens arrived, per worker, for remote and local
    prefills apart; nothing until TAIL_MIN of them, never below 0; and it is part of each
    option's TTFT."""
    b = LatencyBook()
    for _ in range(TAIL_MIN - 1):
        b.observe_first("p", "remote", 0.02)
    assert b.first_over_s("p", "remote") == 0.0
    for i in range(9):
        b.observe_first("p", "remote", 0.5 if i == 0 else 0.02)    # one outlier
        b.observe_first("d", "local", -0.03)                        # the model ran high
    assert b.first_over_s("p", "remote") == pytest.approx(0.02)
    assert b.first_over_s("p", "local") == 0.0 and b.first_over_s("d", "local") == 0.0
    b.forget("p")
    assert b.first_over_s("p", "remote") == 0.0
    p, d = A.Node("p", CPU), A.Node("d", CPU)
    early = dataclasses.replace(SLO, first_token="early")
    base, here = A.remote(p, d, 50, 8, early), A.remote(
        dataclasses.replace(p, first_over_s=0.03), d, 50, 8, early)
    assert here.ttft_s == pytest.approx(base.ttft_s + 0.03) and here.first_over_s == 0.03
    assert A.local(dataclasses.replace(d, local_first_over_s=0.04), 50, 8, SLO).ttft_s \
        == pytest.approx(A.local(d, 50, 8, SLO).ttft_s + 0.04)


def test_the_deadline_keeps_room_to_deliver():
    assert release_at(10.0, 2.0) == pytest.approx(10.0 + 1.94)     # 3% of a loose SLO
    assert release_at(10.0, 0.75) == pytest.approx(10.0 + 0.70)    # 50 ms of a tight one
    assert release_at(10.0, 0.03) == 10.0                          # tighter: at once


def test_a_kept_first_token_is_predicted_as_the_frontend_releases_it():
    """With its stream's first token, or at the frontend's release (`release_after` the
    SLO) when the handoff ends later, or when computed when that is later still; sent
    before its stream, the rest of the handoff is in TPOT. So a prompt computed in time
    whose handoff ends past the SLO meets the TTFT SLO, as the client sees it."""
    p, d = A.Node("p", HC), A.Node("d", HC, transfer_s=0.15)
    ready = HC.prefill_time(600)
    loose = A.SLO(ttft_s=10.0, tpot_s=0.1)
    kept = A.remote(p, d, 600, 8, loose)
    assert kept.hold and kept.ttft_s > kept.first_s == pytest.approx(ready)
    assert A.released(kept, 8, loose) == kept          # the handoff ends in time
    # an SLO whose release falls between the token computed and its stream's first
    tight = A.SLO(ttft_s=ready + 0.075 + 0.05, tpot_s=0.1)     # released 75 ms after
    assert kept.first_s < release_after(tight.ttft_s) < kept.ttft_s
    raw = A.remote(p, d, 600, 8, tight)
    assert raw.score < A.MARGIN                # handed off past it: a predicted miss
    seen = A.released(raw, 8, tight)
    assert seen.ttft_s == pytest.approx(release_after(tight.ttft_s))
    assert seen.tpot_s == pytest.approx(raw.tpot_s + (raw.ttft_s - seen.ttft_s) / 7)
    assert seen.score == pytest.approx(A.score(seen.ttft_s, seen.tpot_s, tight))
    assert seen.first_s == raw.first_s and seen.hold
    # the options as the chooser ranks them: released
    best = A.options([p], [d], 600, 8, tight, set())[0]
    assert best.ttft_s == pytest.approx(seen.ttft_s) and A.met(best, tight)
    # held until past the release: it goes out when computed
    held = release_after(tight.ttft_s) - ready + 0.01
    late = A.released(raw, 8, tight, held)
    assert late.ttft_s == pytest.approx(ready)
    assert late.tpot_s == pytest.approx(raw.tpot_s + (raw.ttft_s - ready) / 7)
    early = A.remote(p, d, 600, 8, dataclasses.replace(tight, first_token="early"))
    assert A.released(early, 8, tight) == early        # not kept: as computed
