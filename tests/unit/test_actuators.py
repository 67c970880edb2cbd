"""Actuators: the local one's bookkeeping (process spawning faked), metrics-only, dry run."""

import asyncio
import subprocess
import sys
from types import SimpleNamespace

import pytest

from scheduler.actuators import LocalActuator, LocalConfig, MetricsOnlyActuator
from scheduler.planner import PlannerConfig, PoolPolicy
from scheduler.state import Load, Registry, Worker


def W(wid, role, **load):
    return Worker(wid, role, f"addr-{wid}", "agent", "m", "h", 0.0, Load(**load))


class FakeProc:
    """Stands in for a worker process: the actuator only signals and polls it."""
    _pids = iter(range(90000, 99999))

    def __init__(self, argv):
        self.argv = argv
        self.pid = next(self._pids)
        self.returncode = None

    def poll(self):
        return self.returncode


def local(reg, spawned):
    def spawn(argv):
        p = FakeProc(argv)
        spawned.append(p)
        return p
    cfg = LocalConfig(worker_args="--model /m --kv-cache-gib 0.25", scheduler_address="s:1",
                      cores={"prefill": ("0",), "decode": ("1", "2")},
                      base_replicas={"prefill": 1, "decode": 1}, drain_timeout_s=50)
    return LocalActuator(cfg, clock=lambda: 0.0, spawn=spawn)


def test_local_actuator_starts_on_pool_cores_drains_newest_and_stops_when_idle(monkeypatch):
    signals = []
    monkeypatch.setattr("scheduler.actuators._signal_group",
                        lambda proc, sig: signals.append((proc.pid, sig)))
    reg = Registry(5.0)
    reg.register(W("prefill-0", "prefill"))
    reg.register(W("decode-0", "decode"))
    spawned = []
    act = local(reg, spawned)

    async def go():
        assert act.current("prefill", reg) == 1 and act.current("decode", reg) == 1
        await act.apply("prefill", 3, "test", reg)
        assert [p.argv[3:9] for p in spawned] == [
            ["prefill", "--worker-id", "prefill-auto1", "--cores", "0", "--scheduler"],
            ["prefill", "--worker-id", "prefill-auto2", "--cores", "0", "--scheduler"]]
        assert spawned[0].argv[-4:] == ["--model", "/m", "--kv-cache-gib", "0.25"]
        assert act.current("prefill", reg) == 3 and act.starting("prefill") == 2
        await act.apply("decode", 2, "test", reg)
        assert spawned[2].argv[7] == "2"          # the decode pool's least used core
        # both prefill replicas register; one is busy
        reg.register(W("prefill-auto1", "prefill"))
        reg.register(W("prefill-auto2", "prefill", running=1))
        reg.workers["prefill-auto2"].booked_requests = 1
        await act.refresh(reg, 10)
        assert act.starting("prefill") == 0 and act.current("prefill", reg) == 3
        # scale down by one: the newest (auto2) drains; it is busy, so it is not stopped
        await act.apply("prefill", 2, "lull", reg)
        assert reg.workers["prefill-auto2"].draining
        assert act.current("prefill", reg) == 2
        await act.refresh(reg, 20)
        assert signals == []
        # its request finishes: SIGTERM
        reg.workers["prefill-auto2"].booked_requests = 0
        reg.workers["prefill-auto2"].load = Load()
        await act.refresh(reg, 21)
        assert signals == [(spawned[1].pid, 15)]
        spawned[1].returncode = 0
        await act.refresh(reg, 22)
        assert "prefill-auto2" not in act.managed
        # a scale-down below what the actuator started cannot touch the launcher's replica
        await act.apply("prefill", 0, "too far", reg)
        assert reg.workers["prefill-auto1"].draining and not reg.workers["prefill-0"].draining
        # a busy draining replica is stopped at the drain timeout
        reg.workers["prefill-auto1"].booked_requests = 5
        await act.refresh(reg, 30)
        assert (spawned[0].pid, 15) not in signals
        await act.refresh(reg, 100)
        assert (spawned[0].pid, 15) in signals
        # a replica still starting is stopped at once on scale-down
        await act.apply("decode", 1, "lull", reg)
        assert (spawned[2].pid, 15) in signals

    asyncio.run(go())


def test_local_actuator_notices_a_replica_that_died(monkeypatch):
    monkeypatch.setattr("scheduler.actuators._signal_group", lambda proc, sig: None)
    reg = Registry(5.0)
    spawned = []
    act = local(reg, spawned)

    async def go():
        await act.apply("decode", 1, "test", reg)
        spawned[0].returncode = 1
        await act.refresh(reg, 5)
        assert act.managed == {} and act.current("decode", reg) == 0

    asyncio.run(go())


def test_metrics_only_keeps_the_target():
    reg = Registry(5.0)
    reg.register(W("p", "prefill"))
    act = MetricsOnlyActuator()

    async def go():
        await act.refresh(reg, 0)
        assert act.current("prefill", reg) == 1 and act.current("decode", reg) == 0
        await act.apply("prefill", 3, "x", reg)
        await act.refresh(reg, 1)
        assert act.current("prefill", reg) == 3    # not reset by what is registered

    asyncio.run(go())


def dry_ns(**kw):
    base = dict(trace=None, synthetic="spike", plot="", duration_s=1800, tick_s=10,
                prefill_tok_s=600.0, decode_step_ms=40.0, decode_step_ms_per_seq=2.0,
                start_prefill=1, start_decode=1, seed=0)
    base.update(kw)
    return SimpleNamespace(**base)


CFG = PlannerConfig(prefill=PoolPolicy(3000, 1, 4), decode=PoolPolicy(100, 1, 4),
                    up_cooldown_s=60, down_cooldown_s=120, warmup_grace_s=120)


def test_dry_run_spike_scales_prefill_up_then_down_and_leaves_decode():
    from scheduler.dryrun import simulate
    steps = simulate(dry_ns(), CFG)
    p = [s.replicas["prefill"] for s in steps]
    d = [s.replicas["decode"] for s in steps]
    assert max(p) >= 3 and p[0] == 1 and p[-1] == 1
    assert set(d) == {1}
    # one step at a time on the way down
    assert all(b >= a - 1 for a, b in zip(p, p[1:]))


def test_dry_run_decode_heavy_scales_decode_only():
    from scheduler.dryrun import simulate
    steps = simulate(dry_ns(synthetic="decode-heavy"), CFG)
    assert max(s.replicas["decode"] for s in steps) >= 2
    assert {s.replicas["prefill"] for s in steps} == {1}


def test_dry_run_flips_a_role_when_decode_cannot_scale():
    from scheduler.dryrun import simulate
    from scheduler.roles import RolePlannerConfig
    capped = PlannerConfig(prefill=PoolPolicy(3000, 1, 1), decode=PoolPolicy(100, 1, 1))
    steps = simulate(dry_ns(synthetic="decode-heavy"), capped, RolePlannerConfig())
    flips = [s for s in steps if s.role_change]
    # mixed in the heavy middle third (after its window), back once it has passed: one
    # decoder fewer then costs the light load's streams next to nothing
    assert [s.role_change for s in flips] == ["prefill-0 -> mixed (decode_pressure)",
                                              "prefill-0 -> prefill (decode_slack)"]
    assert 600 <= flips[0].t <= 1200 + 30
    assert 1200 < flips[1].t <= 1200 + 60 + 30 + 10
    assert steps[-1].mixed == 0
    # and with replicas to add, the autoscaler fixes it first: no flip
    assert not any(s.role_change for s in simulate(dry_ns(synthetic="decode-heavy"), CFG,
                                                   RolePlannerConfig()))


def test_dry_run_command_prints_a_timeline_and_writes_a_png(tmp_path):
    png = tmp_path / "timeline.png"
    out = subprocess.run([sys.executable, "-m", "pdserve.cli", "planner-dryrun",
                          "--synthetic", "spike", "--plot", str(png), "--ttft-slo-ms", "3000"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "prefill 1->" in out.stdout and "scale up" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dry_run_replays_a_recorded_trace(tmp_path):
    import json

    from scheduler.dryrun import replay
    trace = tmp_path / "t.jsonl"
    lines = []
    for i in range(40):
        hot = 10 <= i < 20
        lines.append({"t": i * 10.0, "replicas": {"prefill": 1, "decode": 1},
                      "metrics": {"prefill": {"latency_p90_ms": 9000.0 if hot else 300.0,
                                              "request_rate": 1.0},
                                  "decode": {"latency_p90_ms": 50.0, "request_rate": 1.0}}})
    trace.write_text("\n".join(json.dumps(x) for x in lines))
    steps = replay(str(trace), CFG)
    p = [s.replicas["prefill"] for s in steps]
    assert max(p) > 1 and p[-1] < max(p) and {s.replicas["decode"] for s in steps} == {1}


@pytest.mark.parametrize("bad", [dict(down_ticks=0), dict(max_step_up=0),
                                 dict(up_cooldown_s=-1)])
def test_bad_planner_config(bad):
    with pytest.raises(ValueError):
        PlannerConfig(**bad)


def test_local_actuator_gives_prefill_replicas_their_own_flags():
    """`pdserve serve --prefill-block-size 64`: a prefill replica the autoscaler starts gets
    --block-size 64 after the shared --block-size, like the launcher's own prefill workers;
    a decode replica does not."""
    from pdserve.launcher import pool_argv

    cfg = LocalConfig(worker_args="--model /m --block-size 128", scheduler_address="s:1",
                      cores={"prefill": ("0",), "decode": ("1",)},
                      pool_args={"prefill": " ".join(pool_argv(
                          type("NS", (), {"prefill_block_size": 64})(), "prefill"))})
    act = LocalActuator(cfg, clock=lambda: 0.0, spawn=lambda argv: FakeProc(argv))
    p, d = act.argv("prefill", "prefill-auto1", "0"), act.argv("decode", "decode-auto1", "1")
    assert p[-4:] == ["--block-size", "128", "--block-size", "64"]
    assert d[-2:] == ["--block-size", "128"]
    assert pool_argv(type("NS", (), {"prefill_block_size": 0})(), "prefill") == []


def test_autoscaled_replicas_get_their_pools_flags():
    """`pdserve serve --prefill-args ... --decode-args ...` with `--autoscale local`: the
    replicas the scheduler starts get their pool's flags, as the launcher's own workers do."""
    from pdserve.cli import parse_args
    from pdserve.flags import autoscale_config
    from pdserve.launcher import pool_argv
    from scheduler.autoscale import build_actuator

    serve = parse_args(["serve", "--model", "/m", "--prefill-args", "--max-num-seqs 8",
                        "--decode-args", "--max-num-seqs 4"])
    ns = parse_args(["scheduler", "--autoscale", "local", "--autoscale-worker-args",
                     "--model /m", "--autoscale-prefill-worker-args",
                     " ".join(pool_argv(serve, "prefill")), "--autoscale-decode-worker-args",
                     " ".join(pool_argv(serve, "decode"))])
    act = build_actuator(autoscale_config(ns), "s:1", "127.0.0.1")
    assert act.argv("prefill", "p1", "0")[-2:] == ["--max-num-seqs", "8"]
    assert act.argv("decode", "d1", "1")[-2:] == ["--max-num-seqs", "4"]
