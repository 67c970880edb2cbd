"""The comparison report's arithmetic (bench/compare.py) and the proxy's pick, on
hand-made summaries."""

import math
import signal
import subprocess
import sys
import time

from bench.compare import Procs, goals, ratio, ratios, report, table
from bench.proxy import LeastOutstanding


def run(rate, goodput, ttft99, tpot99, completed=10):
    return {"summary": {"rate": rate, "goodput": goodput, "requests": 10,
                        "completed": completed,
                        "ttft_ms": {"p50": ttft99 / 2, "p99": ttft99},
                        "tpot_ms": {"p50": tpot99 / 2, "p99": tpot99},
                        "itl_ms": {"p99": tpot99 * 3}}}


RESULTS = {
    "vllm-1": [run(0.2, 0.10, 9000, 400), run(0.4, 0.0, 20000, 800)],
    "vllm-2x": [run(0.2, 0.15, 3000, 150), run(0.4, 0.10, 6000, 300)],
    "vllm-nixl-pd": [run(0.2, 0.18, 2500, 70), run(0.4, 0.05, 15000, 80)],
    "pdserve": [run(0.2, 0.20, 2000, 60), run(0.4, 0.24, 3500, 70)],
}


def test_ratio_edges():
    assert ratio(1.0, 2.0) == 0.5
    assert ratio(1.0, 0.0) == math.inf
    assert math.isnan(ratio(0.0, 0.0))
    assert math.isnan(ratio(float("nan"), 1.0))


def test_ratios_per_peer_and_rate():
    rs = {(r["peer"], r["rate"]): r for r in ratios(RESULTS)}
    assert set(rs) == {(p, x) for p in ("vllm-1", "vllm-2x", "vllm-nixl-pd") for x in (0.2, 0.4)}
    assert rs[("vllm-2x", 0.4)]["goodput"] == 0.24 / 0.10
    assert rs[("vllm-1", 0.2)]["tpot_p99"] == 60 / 400
    assert rs[("vllm-nixl-pd", 0.2)]["ttft_p99"] == 2000 / 2500
    assert rs[("vllm-1", 0.4)]["goodput"] == math.inf


def test_goals_met_and_missed():
    g = {text.split(" (")[0]: (ok, fig) for text, ok, fig in goals(RESULTS)}
    # peak 0.24 vs 0.15 = 1.6x
    ok, fig = next(v for k, v in g.items() if k.startswith("peak goodput"))
    assert ok and "1.60x" in fig
    ok, fig = next(v for k, v in g.items() if k.startswith("TPOT p99"))
    assert ok and "0.2: 0.15x" in fig and "0.4: 0.09x" in fig
    ok, fig = next(v for k, v in g.items() if k.startswith("goodput >= vLLM"))
    assert ok

    worse = dict(RESULTS, pdserve=[run(0.2, 0.17, 2000, 250), run(0.4, 0.24, 3500, 70)])
    g = {text[:12]: ok for text, ok, _ in goals(worse)}
    assert g["TPOT p99 <= "] is False          # 250/400 > 0.5 at 0.2 req/s
    assert g["goodput >= v"] is False          # 0.17 < 0.18 at 0.2 req/s
    assert g["peak goodput"] is True           # still 0.24 / 0.15


def test_goals_need_both_sides():
    assert goals({"pdserve": RESULTS["pdserve"]}) == []
    assert goals({"vllm-1": RESULTS["vllm-1"]}) == []


def test_table_and_report_text():
    t = table(RESULTS)
    assert len(t.splitlines()) == 2 + 8
    assert "pdserve" in t and "0.240" in t
    nan_run = run(0.2, 0.0, float("nan"), float("nan"), completed=0)
    assert "   -" in table({"x": [nan_run]})       # no figure: a dash, columns kept
    rep = report(RESULTS)
    assert "pdserve / peer" in rep and rep.count("[MET ]") == 3


def test_least_outstanding_picks_the_idlest_and_rotates_ties():
    lo = LeastOutstanding(["a", "b", "c"])
    assert {lo.pick(), lo.pick(), lo.pick()} == {"a", "b", "c"}   # ties rotate
    lo.outstanding.update(a=2, b=0, c=1)
    assert lo.pick() == "b"
    lo.outstanding.update(b=3)
    assert lo.pick() == "c"


def test_kv_transfer_report_ratios():
    from bench.bench_kv_transfer import report
    pull = {2048: [{"bytes": 10**8, "read_seconds": 0.01, "seconds": 0.012, "descriptors": 30,
                    "read_cpu_seconds": 0.009, "copy_s": c, "ttft": 0.5, "t2": 0.6}
                   for c in (0.007, 0.008, 0.012)]}
    push = {2048: [{"bytes": 10**8, "seconds": 0.4, "exposed_seconds": 0.1, "writes": 30,
                    "descriptors": 30, "ttft": 0.55, "t2": 0.58} for _ in range(3)]}
    whole = {2048: [{"bytes": 10**8, "seconds": 0.02, "exposed_seconds": 0.02, "writes": 1,
                     "descriptors": 30, "ttft": 0.6, "t2": 0.62} for _ in range(3)]}
    theirs = {2048: [{"transfers": 1, "seconds": 0.02, "bytes": 10**8, "descriptors": 480}]}
    text, rows = report({"pull": pull, "push": push, "push-whole": whole}, theirs)
    row = rows[0]
    assert row["read_gbps"] == 10.0                    # 1e8 B in 10 ms
    assert row["b"] == 0.5 and abs(row["b_load"] - 0.6) < 1e-12
    # (a): per request, the copy timed right after it over the READ; the median
    assert abs(row["a"] - 0.8) < 1e-12 and abs(row["copy_gbps"] - 12.5) < 1e-9
    assert abs(row["read_cpu_share"] - 0.9) < 1e-12
    assert 0 < row["a_best"] and row["copy_best_gbps"] > 0   # measured here, in this process
    assert row["vllm_descriptors"] == 480 and "2048" in text
    by_mode = {r["mode"]: r for r in rows[1:]}
    assert by_mode["pull"]["c"] == 0.0
    assert abs(by_mode["push"]["c"] - 0.75) < 1e-12    # 0.1 of 0.4 s exposed
    assert abs(by_mode["push"]["c_net"] - (1 - 0.1 / 0.02)) < 1e-12   # 5x the whole WRITE
    assert by_mode["push"]["gbps"] != by_mode["push"]["gbps"]   # NaN: spans the forward
    assert by_mode["push-whole"]["c"] == 0.0 and by_mode["push-whole"]["gbps"] == 5.0
    assert by_mode["push"]["ttft_s"] == 0.55 and by_mode["pull"]["t2_s"] == 0.6


def test_a_closed_loop_run_reports():
    """`--rates 0` (as fast as the concurrency allows) labels its runs "inf", a string:
    the report and its goals print it like any rate."""
    res = {s: [dict(runs[0], summary=dict(runs[0]["summary"], rate="inf"))]
           for s, runs in RESULTS.items()}
    text = report(res)
    assert "inf: 0.15x" in text and "inf: 0.200 vs 0.180" in text


def test_sigterm_runs_the_cleanup_that_stops_the_servers(tmp_path):
    """A benchmark ended with SIGTERM stops what it started (`run_setup`'s `finally`), as
    one ended with Ctrl-C does; by default SIGTERM left the servers running."""
    marker = tmp_path / "stopped"
    code = ("import sys, time\nfrom bench.compare import stop_on_sigterm\nstop_on_sigterm()\n"
            "print('ready', flush=True)\ntry:\n    time.sleep(60)\nfinally:\n"
            f"    open({str(marker)!r}, 'w').write('stopped')\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        p.kill()
        p.wait()
    assert marker.read_text() == "stopped"


def test_stopping_servers_that_ignore_sigint_takes_one_grace_period_for_all(tmp_path):
    """Servers still starting ignore SIGINT: each is killed once the one grace period
    for all of them is over (waiting a full period for each took minutes)."""
    procs = Procs(tmp_path)
    code = ("import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)")
    for name in ("a", "b", "c"):
        procs.procs.append((name, subprocess.Popen([sys.executable, "-c", code], text=True,
                                                   stdout=subprocess.PIPE,
                                                   start_new_session=True)))
    ps = [p for _, p in procs.procs]
    assert [p.stdout.readline().strip() for p in ps] == ["ready"] * 3   # SIGINT ignored
    t0 = time.monotonic()
    procs.stop(grace_s=1.0)
    took = time.monotonic() - t0
    assert all(p.poll() is not None for p in ps) and not procs.procs
    assert 0.9 < took < 2.5      # one period (1 s), not three
    for p in ps:
        p.stdout.close()
