"""The matrix benchmark's arithmetic (bench/matrix.py), the route header parser, the model
error and the shifting mix (bench/stats.py, bench/workload.py). Pure."""

import math

import pytest

from bench import matrix as MX
from bench.stats import Result, model_error, parse_route, sign_test_p, summarize
from bench.workload import WorkloadSpec, build, parse_dist


def test_parse_route():
    h = ("disagg:slo prefill=p decode=d predicted_cached=0 predicted_ttft_ms=2500 "
         "predicted_tpot_ms=45.5 chunk=0; runner_up: local decode=d ttft_ms=3000 tpot_ms=40")
    assert parse_route(h) == ("disagg", 2.5, 0.0455)
    mode, t, p = parse_route("local:kv decode=d predicted_cached=0")
    assert mode == "local" and math.isnan(t) and math.isnan(p)
    assert parse_route("")[0] == ""


def R(i, ttft, e2e, n, pred_ttft=math.nan, pred_tpot=math.nan, route="disagg"):
    return Result(i, True, 100, n, ttft, e2e, route=route, pred_ttft=pred_ttft,
                  pred_tpot=pred_tpot)


def test_model_error_is_the_median_absolute_relative_error():
    rs = [R(0, 1.0, 2.0, 11, pred_ttft=1.1, pred_tpot=0.1),      # 10%, 0%
          R(1, 2.0, 3.0, 11, pred_ttft=1.0, pred_tpot=0.05),     # 50%, 50%
          R(2, 1.0, 2.0, 11, pred_ttft=0.8, pred_tpot=0.12),     # 20%, 20%
          R(3, 1.0, 2.0, 11)]                                    # no prediction
    e = model_error(rs)
    assert e["ttft"] == pytest.approx(0.2) and e["ttft_n"] == 3
    assert e["tpot"] == pytest.approx(0.2)
    s = summarize(rs, 10.0, 5.0, 1.0)
    assert s["routes"] == {"disagg": 4} and s["model_error"]["tpot_n"] == 3


def test_shifting_mix_changes_balance_mid_run():
    parse_dist("shift:fixed:500~fixed:20")
    with pytest.raises(ValueError):
        parse_dist("shift:fixed:500")
    reqs = build(WorkloadSpec(num_requests=10, input="shift:fixed:500~fixed:20",
                              output="shift:fixed:4~fixed:64", rate=1.0))
    assert [len(r.prompt) for r in reqs] == [500] * 5 + [20] * 5
    assert [r.max_tokens for r in reqs] == [4] * 5 + [64] * 5


def test_calibration_scales_slos_and_rates_from_unloaded_latency():
    a = [R(0, 0.5, 1.5, 11), R(1, 1.0, 3.0, 11)]          # TPOT 0.1 and 0.2
    b = [R(2, 0.2, 0.7, 6), R(3, 0.1, 1.1, 11)]           # TPOT 0.1 and 0.1
    cal = MX.calibrate({"a": a, "b": b}, ttft_scale=4, tpot_scale=1.5, mults=[0.5, 1.0])
    for c in cal.values():                                # one pair of SLOs for all mixes
        assert c["ttft_ms"] == pytest.approx(4000)        # 4 x the slowest TTFT of any
        assert c["tpot_ms"] == pytest.approx(1.5 * 100)   # 1.5 x the median TPOT
    e2e = (1.5 + 3.0) / 2                                 # rates per mix
    assert cal["a"]["rates"] == [round(0.5 / e2e, 4), round(1.0 / e2e, 4)]
    assert cal["b"]["rates"][1] == round(1.0 / 0.9, 4)
    assert cal["a"]["min_e2e_s"] == 1.5 and cal["b"]["min_e2e_s"] == 0.7
    # SLOs of one's own (A/B runs that must meet the same ones); the rates stay measured
    fixed = MX.calibrate({"a": a, "b": b}, ttft_scale=4, tpot_scale=1.5, mults=[0.5, 1.0],
                         ttft_ms=706, tpot_ms=66)
    assert all(c["ttft_ms"] == 706 and c["tpot_ms"] == 66 for c in fixed.values())
    assert fixed["a"]["rates"] == cal["a"]["rates"]
    only = MX.calibrate({"a": a}, ttft_scale=4, tpot_scale=1.5, mults=[1.0], ttft_ms=900)
    assert only["a"]["ttft_ms"] == 900 and only["a"]["tpot_ms"] == pytest.approx(1.5 * 150)


def run(rate, goodput, tpot_p99, local_tpots=(), good=None, local_ttfts=None):
    ttfts = local_ttfts or [0.5] * len(local_tpots)
    reqs = [{"index": i, "ok": True, "route": "local", "tpot": t, "ttft": f, "output_tokens": 8}
            for i, (t, f) in enumerate(zip(local_tpots, ttfts))]
    good = round(goodput * 100) if good is None else good
    return {"summary": {"rate": rate, "goodput": goodput, "good": good, "completed": 10,
                        "requests": 10,
                        "ttft_ms": {"p50": 1, "p99": 1}, "tpot_ms": {"p50": 1, "p99": tpot_p99},
                        "itl_ms": {"p99": 1}, "model_error": {"ttft": 0.1, "tpot": 0.3}},
            "requests": reqs}


def test_mix_report_compares_each_cell_with_the_best_peer():
    res = {"vllm-2x": [run(0.1, 0.10, 90), run(0.2, 0.15, 200)],
           "vllm-1": [run(0.1, 0.08, 300), run(0.2, 0.05, 400)],
           "pdserve": [run(0.1, 0.10, 50, [0.04, 0.05]), run(0.2, 0.18, 60)]}
    cal = {"ttft_ms": 3000, "tpot_ms": 100}
    text, out = MX.mix_report("prefill", res, cal)
    assert [c["best"] for c in out["cells"]] == ["vllm-2x", "vllm-2x"]
    assert [c["met"] for c in out["cells"]] == [True, True] and out["every_cell"]
    assert out["peer_tpot_breaks"] and out["peak_ratio"] == pytest.approx(0.18 / 0.15)
    assert "MISSED] peak goodput >= 1.5x" in text
    assert out["local_tpot_p99_ms"] == pytest.approx(49.9, rel=0.01)
    assert out["model_error"] == {"ttft": pytest.approx(0.1), "tpot": pytest.approx(0.3)}
    assert "MISSED] latency model" in text
    res["pdserve"][1] = run(0.2, 0.1, 60)
    text, out = MX.mix_report("prefill", res, cal)
    assert not out["every_cell"] and "[MISSED] requests within SLOs" in text
    # as many within SLOs, a little less per second (the last one ended later): met; one
    # fewer: missed, whatever the goodput per second
    res["pdserve"][1] = run(0.2, 0.149, 60, good=15)
    assert MX.mix_report("prefill", res, cal)[1]["every_cell"]
    res["pdserve"][1] = run(0.2, 0.16, 60, good=14)
    _, out = MX.mix_report("prefill", res, cal)
    assert not out["every_cell"] and out["cells"][1]["peer_good"] == 15


def test_locally_prefilled_tpot_is_split_by_whether_their_ttft_met_the_slo():
    """The target counts every locally prefilled request; the report says how much of a
    miss is late requests', whose streams keep no slack by design."""
    res = {"vllm-2x": [run(0.1, 0.10, 90)],
           "pdserve": [run(0.1, 0.10, 50, [0.05, 0.06, 0.2], local_ttfts=[1.0, 2.9, 3.5])]}
    text, out = MX.mix_report("prefill", res, {"ttft_ms": 3000, "tpot_ms": 100})
    assert out["local_tpot_p99_ms"] == pytest.approx(197.2, rel=0.01)
    assert out["local_tpot_p99_on_time_ms"] == pytest.approx(59.8, rel=0.01)
    assert out["local_tpot_p99_late_ms"] == pytest.approx(200.0)
    assert "MISSED] TPOT p99 of locally prefilled requests" in text
    assert "with TTFT within its SLO: 59.9 ms (2); late, whose streams keep no slack: " \
           "200.0 ms (1)" in text


def test_a_variant_of_ours_is_reported_against_the_peers_and_is_never_a_peer():
    res = {"vllm-2x": [run(0.1, 0.10, 90)],
           "pdserve": [run(0.1, 0.09, 50)],
           "pdserve-mixed": [run(0.1, 0.20, 50)]}
    cal = {"ttft_ms": 3000, "tpot_ms": 100}
    _, out = MX.mix_report("prefill", res, cal)
    assert out["cells"][0]["best"] == "vllm-2x" and not out["every_cell"]
    text, out = MX.mix_report("prefill", res, cal, "pdserve-mixed")
    assert out["setup"] == "pdserve-mixed" and out["cells"][0]["best"] == "vllm-2x"
    assert out["cells"][0]["ratio"] == pytest.approx(2.0) and out["every_cell"]
    assert "pdserve-mixed" in text


def test_a_variant_is_compared_with_the_defaults_request_by_request():
    """An A/B in one run: the variant's requests within both SLOs against the defaults',
    per cell and in total, and which requests only one of them served within them."""
    res = {"vllm-2x": [run(0.1, 0.10, 90), run(0.2, 0.15, 200)],
           "pdserve": [run(0.1, 0.10, 50, [0.05, 0.2, 0.05], good=2),
                       run(0.2, 0.15, 60, [0.05, 0.05], good=2)],
           "pdserve-x": [run(0.1, 0.10, 50, [0.05, 0.05, 0.2], good=2),
                         run(0.2, 0.15, 60, [0.2, 0.2], good=0)]}
    cal = {"ttft_ms": 3000, "tpot_ms": 100}
    text, out = MX.mix_report("prefill", res, cal, "pdserve-x")
    a = out["against_defaults"]
    assert (a["good"], a["defaults_good"], a["cells"]) == (2, 4, "2/2 / 0/2")
    # rate 0.1: index 1 only with the variant, index 2 only with the defaults; rate 0.2:
    # both requests only with the defaults
    assert (a["only_ours"], a["only_defaults"]) == (1, 3)
    assert a["p"] == pytest.approx(sign_test_p(1, 3))
    assert "against the defaults (pdserve): 2 within SLOs against 4 (2/2 / 0/2); request " \
           "by request 1 only with pdserve-x, 3 only with pdserve" in text
    assert "against_defaults" not in MX.mix_report("prefill", res, cal)[1]


def test_the_ceiling_says_whether_the_peak_target_is_within_reach():
    res = {"vllm-2x": [run(0.1, 0.10, 90), run(0.2, 0.15, 200)],
           "pdserve": [run(0.1, 0.10, 50), run(0.2, 0.18, 60)]}
    cal = {"ttft_ms": 3000, "tpot_ms": 100}
    ceil = {"vllm-2x": {"request_throughput": 0.19}, "pdserve": {"request_throughput": 0.20}}
    text, out = MX.mix_report("prefill", res, cal, ceil=ceil)
    assert out["ceiling_needed"] == pytest.approx(0.225)       # 1.5 x the peer's 0.15
    assert not out["peak_target_reachable"] and "out of reach" in text
    assert out["ceiling"] == {"vllm-2x": 0.19, "pdserve": 0.20}
    ceil["pdserve"]["request_throughput"] = 0.3
    text, out = MX.mix_report("prefill", res, cal, ceil=ceil)
    assert out["peak_target_reachable"] and "within pdserve's ceiling" in text
    assert "ceiling" not in MX.mix_report("prefill", res, cal)[1]    # none measured


def test_the_arrival_times_bound_what_any_setup_could_reach():
    """Four requests sent over 1.5 s, the fastest unloaded in 0.5 s: no setup serves more
    than 4 / 2.0 = 2 req/s within SLOs there, so 1.5x a peer's peak of 1.5 req/s (its
    offered rate, nearly) is out of reach at that rate whatever the placement."""
    res = {"vllm-2x": [run(1.0, 1.0, 90), run(2.0, 1.5, 200)],
           "pdserve": [run(1.0, 1.0, 50), run(2.0, 1.8, 60)]}
    for x, at in zip(res["pdserve"], ([0.0, 1.0, 2.0, 3.0], [10.0, 10.5, 11.0, 11.5])):
        x["summary"]["requests"] = 4
        x["requests"] = [{"index": i, "ok": True, "route": "disagg", "ttft": 0.1,
                          "tpot": 0.01, "output_tokens": 8,
                          "token_times": [t + 0.1]} for i, t in enumerate(at)]
    cal = {"ttft_ms": 3000, "tpot_ms": 100, "min_e2e_s": 0.5}
    text, out = MX.mix_report("prefill", res, cal)
    assert out["arrival_bound"] == {1.0: pytest.approx(4 / 3.5), 2.0: pytest.approx(2.0)}
    assert not out["peak_target_within_arrival_bound"]
    assert "out of reach at these rates, whatever the setup" in text
    res["vllm-2x"][1]["summary"]["goodput"] = 1.2         # 1.5x is 1.8: within 2.0
    text, out = MX.mix_report("prefill", res, cal)
    assert out["peak_target_within_arrival_bound"] and "out of reach at these" not in text
    assert "arrival_bound" not in MX.mix_report("prefill", res, {**cal, "min_e2e_s": 0})[1]


def test_the_sign_test_of_paired_requests():
    """Exact two-sided sign test: 0 against 5 discordant pairs is p = 2/32; a tie or no
    discordant pair says nothing (p = 1)."""
    assert sign_test_p(0, 5) == pytest.approx(2 / 32)
    assert sign_test_p(9, 1) == pytest.approx(2 * 11 / 1024)
    assert sign_test_p(3, 3) == 1.0 and sign_test_p(0, 0) == 1.0
    assert sign_test_p(4, 3) == sign_test_p(3, 4) == 1.0


def req(i, ttft, tpot, ok=True):
    return {"index": i, "ok": ok, "ttft": ttft, "tpot": tpot, "output_tokens": 8,
            "route": "disagg"}


def test_setups_are_compared_request_by_request():
    """The same requests in both setups: only the pairs where one made both SLOs and the
    other did not count, per (rate, request); a failed request made none."""
    def runs(*cells):
        return [{"summary": {"rate": rate}, "requests": rs} for rate, rs in cells]
    ours = runs((1.0, [req(0, 0.1, 0.05), req(1, 0.1, 0.05), req(2, 0.9, 0.05)]),
                (2.0, [req(0, 0.1, 0.05), req(1, 0.1, 0.05, ok=False)]))
    peer = runs((1.0, [req(0, 0.1, 0.2), req(1, 0.1, 0.05), req(2, 0.1, 0.05)]),
                (2.0, [req(0, 0.1, 0.2), req(1, 0.1, 0.05)]))
    wins, losses, p = MX.paired(ours, peer, 0.5, 0.1)
    assert (wins, losses) == (2, 2) and p == 1.0        # (1,0),(2,0) against (1,2),(2,1)
    peer[1]["requests"][1] = req(1, 0.1, 0.05, ok=False)
    assert MX.paired(ours, peer, 0.5, 0.1)[:2] == (2, 1)
    cal = {"ttft_ms": 500, "tpot_ms": 100}
    res = {"vllm-2x": [dict(r, summary=dict(run(r["summary"]["rate"], 1, 50)["summary"]))
                       for r in peer],
           "pdserve": [dict(r, summary=dict(run(r["summary"]["rate"], 1, 50)["summary"]))
                       for r in ours]}
    text, out = MX.mix_report("prefill", res, cal)
    assert out["paired"]["vllm-2x"] == {"only_ours": 2, "only_peer": 1, "p": 1.0}
    assert "2 within SLOs only with pdserve, 1 only with vllm-2x (sign test p = 1.00)" in text


def test_parse_mix_reads_a_mix_of_ones_own_and_refuses_bad_ones():
    assert MX.parse_mix("chat=uniform:32:1536,uniform:8:96") == (
        "chat", ("uniform:32:1536", "uniform:8:96"))
    assert MX.parse_mix(" rag =mix:0.5:2048:256,fixed:32")[0] == "rag"
    for bad in ("chat", "chat=uniform:32:1536", "=fixed:8,fixed:8", "c=fixed:8,fixed:8,x",
                "c=uniform:9:1,fixed:8", "c=fixed:8,lognormal:3"):
        with pytest.raises(ValueError):
            MX.parse_mix(bad)


def test_a_mix_gets_the_same_requests_whichever_mixes_run_beside_it():
    """A run of some mixes is the whole matrix's cells: each mix's seed follows its place
    among the known mixes, not in --mixes (the long-prompt mix run second had other
    prompts, and another calibration, than in the whole matrix)."""
    import argparse
    ns = argparse.Namespace(seed=7, mix_defs=dict(MX.MIXES), mixes="long-mix")
    alone = MX.mix_ns(ns, "long-mix")
    whole = MX.mix_ns(argparse.Namespace(**{**vars(ns), "mixes": ",".join(MX.MIXES)}),
                      "long-mix")
    assert alone.seed == whole.seed == 200_007
    assert MX.mix_ns(ns, "prefill").seed == 7
    # ...and a cell gets the same requests whichever rates run beside it: its seed offset
    # follows its rate multiplier (the 0.6x ladder keeps the offsets its places gave it)
    cal = {"ttft_ms": 900.0, "tpot_ms": 30.0, "rates": [1.0, 2.0, 3.0]}
    full = MX.mix_ns(argparse.Namespace(**{**vars(ns), "rate_mult": "0.6,1.2,1.8,2.4"}),
                     "long-mix", cal)
    some = MX.mix_ns(argparse.Namespace(**{**vars(ns), "rate_mult": "1.2,1.8,3.0"}),
                     "long-mix", cal)
    assert full.rate_seed_offsets == [0, 1000, 2000, 3000]
    assert some.rate_seed_offsets == [1000, 2000, 4000]


def test_a_mix_of_ones_own_runs_with_its_own_lengths():
    import argparse
    ns = argparse.Namespace(seed=7, mix_defs={**MX.MIXES, "chat": ("uniform:32:64", "fixed:4")},
                            rate_mult="0.6,1.2")
    m = MX.mix_ns(ns, "chat", {"ttft_ms": 900.0, "tpot_ms": 30.0, "rates": [1.0, 2.0]})
    assert (m.input, m.output, m.seed, m.rates) == ("uniform:32:64", "fixed:4", 400_007, "1,2")
    res = {"vllm-2x": [run(1.0, 0.5, 20)], "pdserve": [run(1.0, 0.6, 20)]}
    text, out = MX.mix_report("chat", res, {"ttft_ms": 900, "tpot_ms": 30},
                              lengths=("uniform:32:64", "fixed:4"))
    assert "=== mix chat: input uniform:32:64, output fixed:4;" in text
    assert out["mix"] == "chat" and out["every_cell"]


def test_host_facts_name_the_cpu_and_the_autogroup_setting():
    from bench import host
    info = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\n"
    assert host.cpu_model(info) == "AMD EPYC 9B14"
    assert host.cpu_model("processor : 0\n") == ""
    f = {"cpu": "AMD EPYC 9B14", "cores": 2, "kernel": "6.18", "autogroup": False}
    assert host.describe(f) == ("host: AMD EPYC 9B14, 2 cores, Linux 6.18, "
                                "autogroup scheduling off")
    assert host.describe({**f, "autogroup": None}).endswith("autogroup scheduling n/a")
    info = ("processor\t: 0\ncpu family\t: 23\nmodel\t\t: 1\nmodel name\t: AMD EPYC\n"
            "flags\t\t: fpu sse avx avx2 fma\n\nprocessor\t: 1\ncpu family\t: 25\n")
    assert host.cpu_kind(info) == "family 23 model 1; avx2"
    assert host.cpu_kind(info.replace("avx2", "avx512f avx512_bf16 avx2")) == (
        "family 23 model 1; avx2 avx512f avx512_bf16")
    assert host.cpu_kind(info.replace(" avx2", "")) == "family 23 model 1; no AVX2"
    assert host.cpu_kind("processor : 0\n") == ""
    assert host.describe({**f, "cpu": "AMD EPYC", "cpu_kind": "family 23 model 1; avx2"}) == (
        "host: AMD EPYC (family 23 model 1; avx2), 2 cores, Linux 6.18, "
        "autogroup scheduling off")
    live = host.facts()
    assert live["cores"] >= 1 and live["autogroup"] in (True, False, None)


def test_the_host_probe_times_a_matmul_and_the_drift_line_compares_with_the_first():
    from bench import host
    s = host.probe(0.1)
    assert 0 < s < 1.0                     # a real subprocess on one core, seconds per matmul
    line = host.drift({"vllm-2x": 0.002, "vllm-1": 0.002, "pdserve": 0.003})
    assert line.endswith("vllm-2x 2.00 ms (1.00x), vllm-1 2.00 ms (1.00x), "
                         "pdserve 3.00 ms (1.50x)")
    assert "(nanx)" in host.drift({"a": 0.002, "b": float("nan")})
    assert host.drift({}) == ""


def test_the_interleaved_schedule_reverses_the_setups_from_one_mix_to_the_next():
    from bench.matrix import schedule
    setups, mixes = ["vllm-2x", "vllm-1", "pdserve"], ["prefill", "decode", "long-mix"]
    assert schedule(setups, mixes, False) == [(s, mixes) for s in setups]
    order = schedule(setups, mixes, True)
    assert order == [("vllm-2x", ["prefill"]), ("vllm-1", ["prefill"]),
                     ("pdserve", ["prefill"]), ("pdserve", ["decode"]),
                     ("vllm-1", ["decode"]), ("vllm-2x", ["decode"]),
                     ("vllm-2x", ["long-mix"]), ("vllm-1", ["long-mix"]),
                     ("pdserve", ["long-mix"])]
    # every setup serves every mix exactly once, and the calibrating setup starts first
    assert sorted((s, m[0]) for s, m in order) == sorted((s, m) for s in setups for m in mixes)
    assert order[0][0] == setups[0]
    # over an even number of mixes every setup's mean place in its mix is the same
    four = schedule(setups, mixes + ["shift"], True)
    place = {s: [i % 3 for i, (x, _) in enumerate(four) if x == s] for s in setups}
    assert len({sum(v) for v in place.values()}) == 1
