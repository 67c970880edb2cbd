"""Benchmark harness arithmetic against hand-computed cases, and workload generation."""

import json
import math
from pathlib import Path

import pytest

from bench.stats import Result, percentile, summarize, within_slo
from bench.workload import WorkloadSpec, build, parse_dist


def test_percentiles_by_hand():
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert percentile(xs, 50) == 3.0
    assert percentile(xs, 90) == pytest.approx(4.6)     # pos 3.6: 4 + 0.6 * (5 - 4)
    assert percentile(xs, 99) == pytest.approx(4.96)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50)) and percentile([math.nan, 2.0], 50) == 2.0
    assert percentile([10.0, 0.0], 25) == pytest.approx(2.5)   # unsorted input


def R(i, ttft, e2e, n, ok=True):
    return Result(i, ok, prompt_tokens=100, output_tokens=n, ttft=ttft, e2e=e2e)


def test_tpot_and_goodput_by_hand():
    rs = [
        R(0, ttft=1.0, e2e=1.0 + 9 * 0.05, n=10),   # TPOT 50 ms: good
        R(1, ttft=1.0, e2e=1.0 + 9 * 0.20, n=10),   # TPOT 200 ms: misses the TPOT SLO
        R(2, ttft=4.0, e2e=4.0 + 9 * 0.05, n=10),   # TTFT 4 s: misses the TTFT SLO
        R(3, ttft=0.5, e2e=0.5, n=1),               # one token: no TPOT, TTFT only: good
        R(4, ttft=math.nan, e2e=math.nan, n=0, ok=False),   # failed: never good
    ]
    assert rs[0].tpot == pytest.approx(0.05) and math.isnan(rs[3].tpot)
    assert [within_slo(r, 3.0, 0.1) for r in rs] == [True, False, False, True, False]
    s = summarize(rs, duration_s=10.0, ttft_slo_s=3.0, tpot_slo_s=0.1)
    assert (s["requests"], s["completed"], s["failed"], s["good"]) == (5, 4, 1, 2)
    assert s["goodput"] == pytest.approx(0.2) and s["request_throughput"] == pytest.approx(0.4)
    assert s["output_throughput"] == pytest.approx(3.1)          # 31 tokens / 10 s
    assert s["total_token_throughput"] == pytest.approx(43.1)    # + 4 x 100 prompt tokens
    # TTFT over completed requests: 0.5, 1, 1, 4 -> p50 = 1 s, p90 = 1 + 0.7 * 3 = 3.1 s
    assert s["ttft_ms"]["p50"] == pytest.approx(1000) and s["ttft_ms"]["p90"] == \
        pytest.approx(3100)
    # TPOT over requests that have one: 50, 200, 50 ms -> p50 50 ms
    assert s["tpot_ms"]["p50"] == pytest.approx(50) and s["tpot_ms"]["mean"] == \
        pytest.approx(100)


def test_workloads_are_seeded_and_shaped():
    a = build(WorkloadSpec(num_requests=50, rate=2.0, input="uniform:10:20", seed=3))
    b = build(WorkloadSpec(num_requests=50, rate=2.0, input="uniform:10:20", seed=3))
    assert a == b and a != build(WorkloadSpec(num_requests=50, rate=2.0,
                                              input="uniform:10:20", seed=4))
    assert all(10 <= len(r.prompt) <= 20 for r in a)
    assert [r.at for r in a] == sorted(r.at for r in a) and a[0].at == 0
    # the long-prompt mix: about a quarter long
    m = build(WorkloadSpec(num_requests=400, input="mix:0.25:2048:128", output="fixed:8"))
    long = sum(len(r.prompt) == 2048 for r in m)
    assert 70 <= long <= 130 and all(len(r.prompt) in (2048, 128) for r in m)
    assert all(r.max_tokens == 8 for r in m)


def test_arrival_rates_match_on_average():
    for arrival in ("poisson", "bursty"):
        rs = build(WorkloadSpec(num_requests=4000, rate=4.0, arrival=arrival, input="fixed:1",
                                burstiness=1 / 9))
        mean_gap = rs[-1].at / (len(rs) - 1)
        assert mean_gap == pytest.approx(0.25, rel=0.15), arrival
    gaps = [b.at - a.at for a, b in zip(rs, rs[1:])]
    m = sum(gaps) / len(gaps)
    cv = (sum((g - m) ** 2 for g in gaps) / len(gaps)) ** 0.5 / m
    # bursty: vLLM's --burstiness is the gaps' gamma shape, their variation 1/sqrt(shape)
    assert cv == pytest.approx(3.0, rel=0.25)


def test_shared_prefix_and_multi_turn():
    rs = build(WorkloadSpec(num_requests=6, input="fixed:10", shared_prefix=50,
                            prefix_groups=2))
    assert rs[0].prompt[:50] == rs[2].prompt[:50] != rs[1].prompt[:50]
    conv = build(WorkloadSpec(num_requests=6, input="fixed:10", output="fixed:5", turns=3))
    first, second = conv[0], conv[2]           # 2 conversations: turns interleave
    assert (first.conversation, first.turn, second.conversation, second.turn) == (0, 0, 0, 1)
    assert second.prompt[:len(first.prompt)] == first.prompt
    assert len(second.prompt) == len(first.prompt) + 5 + 10   # answer + new user turn


@pytest.mark.parametrize("bad", ["fixed", "fixed:0", "uniform:5:2", "mix:2:10:10", "zipf:3"])
def test_bad_distributions_are_refused(bad):
    with pytest.raises(ValueError):
        parse_dist(bad)


ROOT = Path(__file__).resolve().parents[2]
SHAREGPT = str(ROOT / "tests/data/sharegpt_tiny.json")


def test_vllm_bench_serve_flags_mean_what_they_mean_there():
    from bench.serve import rates_of
    from bench.serve_args import build_parser, resolve

    ns = resolve(build_parser().parse_args([
        "--base-url", "http://h:1/", "--backend", "openai-chat", "--num-prompts", "5",
        "--request-rate", "inf", "--max-concurrency", "2", "--goodput", "ttft:500",
        "tpot:50", "--burstiness", "0.5", "--dataset-name", "sharegpt",
        "--dataset-path", SHAREGPT]))
    assert (ns.url, ns.endpoint, ns.num_requests, ns.concurrency) == (
        "http://h:1", "/v1/chat/completions", 5, 2)
    assert (ns.slo_ttft_ms, ns.slo_tpot_ms, ns.arrival) == (500.0, 50.0, "bursty")
    assert rates_of(ns) == [float("inf")]
    # the harness's own flags keep working, and --concurrency alone sends all at once
    own = resolve(build_parser().parse_args(["--rates", "1,2", "--num-requests", "3"]))
    assert rates_of(own) == [1.0, 2.0] and own.dataset_name is None
    own = resolve(build_parser().parse_args(["--concurrency", "4"]))
    assert rates_of(own) == [float("inf")]
    with pytest.raises(SystemExit):
        resolve(build_parser().parse_args(["--goodput", "e2el:5"]))


def test_a_sharegpt_file_is_sampled_by_vllms_own_code(tmp_path):
    from transformers import AutoTokenizer

    from bench.serve import requests_for, spec_for
    from bench.serve_args import build_parser, resolve
    from pdserve.models import build_tiny_model

    tok = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "tiny"))
    ns = resolve(build_parser().parse_args([
        "--dataset-name", "sharegpt", "--dataset-path", SHAREGPT, "--num-prompts", "6",
        "--request-rate", "4", "--seed", "3"]))
    reqs = requests_for(ns, spec_for(ns, 4.0, seed=3), tok)
    data = json.loads(open(SHAREGPT).read())
    firsts = {c["conversations"][0]["value"]: c["conversations"][1]["value"] for c in data}
    assert len(reqs) == 6 and all(r.text in firsts for r in reqs)
    for r in reqs:   # lengths as vLLM counts them: its tokenizer, the reply's length
        assert r.prompt_len == len(tok(r.text).input_ids)
        assert r.max_tokens == len(tok(firsts[r.text]).input_ids)
        assert r.prompt == []
    assert "w1 w2" not in {r.text for r in reqs}          # too short: vLLM skips it
    assert reqs[0].at == 0 < reqs[-1].at                   # 4 req/s: spread out


def test_the_result_file_has_vllms_fields():
    import argparse

    from bench.serve_args import vllm_result
    from bench.stats import Result, result_dict, summarize

    rs = [Result(0, True, 10, 4, 0.1, 0.4, [0.1, 0.1, 0.1], text="a b c d"),
          Result(1, True, 20, 4, 0.3, 0.9, [0.2, 0.2, 0.2]), Result(2, False, 5, error="x")]
    s = summarize(rs, 2.0, 1.0, 0.15)
    s.update(rate=2.0, model="m")
    ns = argparse.Namespace(backend="openai", label="t", tokenizer=None, burstiness=1.0,
                            concurrency=0, goodput=["ttft:1000"], metric_percentiles="50,99",
                            percentile_metrics="ttft,tpot,itl,e2el")
    out = vllm_result({"summary": s, "requests": [result_dict(r) for r in rs]}, ns)
    assert out["completed"] == 2 and out["failed"] == 1 and out["num_prompts"] == 3
    assert out["total_input_tokens"] == 30 and out["total_output_tokens"] == 8
    assert out["median_ttft_ms"] == pytest.approx(200.0) and out["p99_ttft_ms"] > 290
    assert out["mean_tpot_ms"] == pytest.approx(150.0)      # (0.3/3 + 0.6/3) / 2
    assert out["median_itl_ms"] == pytest.approx(150.0) and "p50_e2el_ms" in out
    assert out["request_goodput"] == pytest.approx(0.5)     # one within both SLOs in 2 s
    assert out["generated_texts"][0] == "a b c d" and out["errors"][2] == "x"
