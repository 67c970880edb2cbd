"""Autoscaling with real processes: the planner in the scheduler and the local actuator.

One cluster (tiny model, 1 prefill + 1 decode, max_num_seqs 2), tight SLOs (TTFT p90 600 ms,
TPOT p90 20 ms), a 1 s planner tick and short cooldowns, and each first token sent as soon
as it is prefilled (`--first-token early`). A burst of 1,800-token prompts at concurrency 16
gives TTFT p90 over 1 s and no TPOT sample (max_tokens 1); a burst of 100-token
generations at concurrency 28 queues for the decode engine's two slots between each
stream's first and second tokens: TPOT p90 35 ms (23-27 ms at concurrency 20) and TTFT p90
under 200 ms (2026-12-04, a 2-core AVX512 host; a slower host's longer steps press TPOT
harder). With the first token kept for the stream, as the defaults do, that wait fell in
TTFT, TPOT p90 stayed at 5-12 ms, and the decode phase waited 25-80 s for a chance breach.

1. Long prompts: the planner starts a second *prefill* worker (never a decode worker), it
   registers and serves requests; after the burst it is drained and stopped.
2. Decode-heavy: the same for the *decode* pool, and no prefill worker is started.
No request fails in either phase.

Each burst runs at full concurrency until the planner decides, then trickles (one request
every 2 s) until the new replica has registered, then runs at a light load until the
replica has served requests. On 2 cores a new replica shares its pool's core with a busy
engine, and vLLM pins the new worker process to that core before it even imports torch:
measured, it got about 7% of the core and had not started after 4 minutes under steady
load. The point here is that the new replica registers, gets traffic and is drained.
"""

import asyncio
import json
import random
import re
import time

import httpx
import pytest

from pdserve.rpc import pd_pb2
from tests.e2e.cluster import wait_until
from tests.e2e.conftest import serving

PHASE_LIMIT_S = 240


@pytest.fixture(scope="module")
def scaled(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("autoscale")
    record = d / "planner.jsonl"
    for c in serving(tiny_model, tmp_path_factory, "autoscale", extra=[
        "--max-num-seqs", "2", "--autoscale", "local",
        "--ttft-slo-ms", "600", "--tpot-slo-ms", "20",
        "--prefill-max", "2", "--decode-max", "2",
        "--planner-interval-s", "1", "--planner-window-s", "6",
        "--scale-up-cooldown-s", "60", "--scale-down-cooldown-s", "5",
        "--scale-down-ticks", "3", "--warmup-grace-s", "5",
        "--planner-record", str(record),
        # pools scale here, roles stay put (the role planner has its own tests)
        "--role-planner", "off",
        # the bursts must breach the SLO and be served late, not refused (429): the
        # autoscaler reacts to the latency admission control would cut off
        "--admit-ttft-factor", "0",
        # a stream's first token leaves as soon as it is prefilled: its wait for a decode
        # slot falls between its first and second tokens, in TPOT (decode phase)
        "--first-token", "early"]):
        c.record = record
        # serving() then checks that no process is left, the workers the autoscaler
        # started included
        yield c


def workers(c, role):
    return {w.worker_id: w for w in c.workers() if w.role == role}


async def burst(c, kind: str, concurrency: int, light: int, decided, started, until,
                limit_s: float):
    """Closed-loop load at `concurrency` until `decided()`, one request every 2 s until
    `started()`, then `light` concurrent until `until()` (checked every 0.25 s), or
    limit_s."""
    rng = random.Random(kind)
    results: list[tuple[int, str]] = []
    done = asyncio.Event()
    active = {"n": concurrency, "pause": 0.0}

    async def loop(client, i):
        while not done.is_set():
            if i >= active["n"]:
                await asyncio.sleep(0.2)
                continue
            await asyncio.sleep(active["pause"])
            if kind == "long":
                body = {"model": c.model_name, "max_tokens": 1,
                        "prompt": [rng.randrange(10, 900) for _ in range(1800)]}
            else:
                body = {"model": c.model_name, "max_tokens": 100, "ignore_eos": True,
                        "prompt": [rng.randrange(10, 900) for _ in range(20)]}
            r = await client.post(f"{c.url}/v1/completions", json=body)
            results.append((r.status_code, r.headers.get("x-pdserve-route", "")))

    async def watch():
        t0 = time.monotonic()
        phase = "burst"
        while time.monotonic() - t0 < limit_s:
            await asyncio.sleep(0.25)
            if phase == "burst" and await asyncio.to_thread(decided):
                phase, active["n"], active["pause"] = "trickle", 1, 2.0
            if phase == "trickle" and await asyncio.to_thread(started):
                phase, active["n"], active["pause"] = "light", light, 0.0
            if await asyncio.to_thread(until, results):
                break
        done.set()

    async with httpx.AsyncClient(timeout=300) as client:
        await asyncio.gather(watch(), *[loop(client, i) for i in range(concurrency)])
    return results


def served_by(results, role: str, worker: str) -> int:
    return sum(1 for _, route in results if f"{role}={worker}" in route)


def records(c):
    return [json.loads(x) for x in c.record.read_text().splitlines() if x.strip()]


def scale_up_phase(c, pool: str, kind: str, concurrency: int, light: int) -> list[dict]:
    """Burst until the planner starts `<pool>-auto1`, until it registered and served 3
    requests. Checks that nothing failed and that the new replica got traffic; returns the
    planner records of this phase."""
    before = len(records(c))
    new = f"{pool}-auto1"

    def log():
        return c.log_path.read_text()

    results = asyncio.run(burst(
        c, kind, concurrency, light, lambda: f"local: started {new}" in log(),
        lambda: f"local: {new} registered" in log(),
        lambda res: served_by(res, pool, new) >= 3, PHASE_LIMIT_S))
    assert results and all(code == 200 for code, _ in results), \
        {code for code, _ in results}
    assert served_by(results, pool, new) >= 3, "new replica got no traffic"
    return records(c)[before:]


def drained_and_stopped(c, pool: str, role) -> None:
    new = f"{pool}-auto1"
    wait_until(lambda: f"local: {new} stopped" in c.log_path.read_text(), 120,
               what=f"the scale-down of {new}")
    assert set(workers(c, role)) == {f"{pool}-0"}
    log = c.log_path.read_text()
    assert re.search(rf"local: draining {new}: .*scale down by 1", log)
    assert "drain timeout" not in log and "exited unexpectedly" not in log


def test_long_prompts_scale_prefill_then_drain(scaled):
    c = scaled
    assert set(workers(c, pd_pb2.ROLE_PREFILL)) == {"prefill-0"}
    phase = scale_up_phase(c, "prefill", "long", 16, 2)
    log = c.log_path.read_text()
    assert "local: started prefill-auto1 on core 0" in log
    assert "started decode-auto" not in log           # only the pool that breached
    ups = [r for r in phase if r["actions"]["prefill"] == "up"]
    assert ups and ups[0]["codes"]["prefill"] == "slo_breach"
    assert ups[0]["metrics"]["prefill"]["latency_p90_ms"] > 600
    assert all(r["actions"]["decode"] != "up" for r in phase)
    drained_and_stopped(c, "prefill", pd_pb2.ROLE_PREFILL)      # the lull
    r = httpx.post(f"{c.url}/v1/completions", timeout=60, json={
        "model": c.model_name, "prompt": "the fox", "max_tokens": 4})
    assert r.status_code == 200


def test_decode_heavy_burst_scales_decode_not_prefill(scaled):
    c = scaled
    assert set(workers(c, pd_pb2.ROLE_DECODE)) == {"decode-0"}
    # 28 streams on 2 slots: a stream waits for others to finish before its first decode
    # step, and with the first token sent early that wait falls between its first token
    # and its second (the module's docstring)
    phase = scale_up_phase(c, "decode", "decode", 28, 4)
    log = c.log_path.read_text()
    assert "local: started decode-auto1 on core 1" in log
    assert "started prefill-auto2" not in log
    ups = [r for r in phase if r["actions"]["decode"] == "up"]
    assert ups and ups[0]["metrics"]["decode"]["latency_p90_ms"] > 20
    assert all(r["actions"]["prefill"] != "up" for r in phase)
    drained_and_stopped(c, "decode", pd_pb2.ROLE_DECODE)
    # the planner's metrics say where it ended. Its gauge is set on each tick, and the tick
    # that follows the stop may still be to come: wait for it (bounded), and say what the
    # planner decided if it never comes
    url = f"http://{metrics_address(c)}/metrics"
    try:
        sched = wait_until(lambda: scrape_if(url, 'pdserve_planner_desired_replicas'
                                                  '{pool="decode"} 1.0'),
                           30, what="the planner's desired decode replicas back at 1")
    except AssertionError as e:
        decisions = [x for x in c.log_path.read_text().splitlines()
                     if "planner:" in x or "local:" in x]
        raise AssertionError(f"{e}; last decisions: {decisions[-12:]}") from None
    assert 'pdserve_planner_actual_replicas{pool="prefill"} 1.0' in sched
    assert re.search(r'pdserve_planner_decisions_total\{action="up",pool="decode"\} 1\.0',
                     sched)


def scrape_if(url: str, line: str) -> str | None:
    """The metrics page at `url` if it holds `line`, else None."""
    text = httpx.get(url, timeout=10).text
    return text if line in text else None


def metrics_address(c) -> str:
    m = re.search(r"\[scheduler\].*metrics on :(\d+)", c.log_path.read_text())
    assert m, "scheduler metrics port not logged"
    return f"127.0.0.1:{m.group(1)}"
