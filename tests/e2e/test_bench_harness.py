"""The benchmark harness on a small real run against the cluster: it completes every request,
and its measurements agree with what the server itself recorded."""

import asyncio
import json

from bench.local_cluster import run_module
from bench.serve import sweep
from tests.e2e.cluster import ROOT, metric_value


class NS:
    num_requests = 6
    arrival = "poisson"
    burstiness = 1.0
    rates = "2"
    concurrency = 0
    input = "uniform:50:200"
    output = "fixed:12"
    shared_prefix = 0
    prefix_groups = 1
    turns = 1
    vocab = 900
    seed = 0
    slo_ttft_ms = 5000.0
    slo_tpot_ms = 500.0
    timeout_s = 120.0


def test_harness_small_run_matches_the_servers_own_counts(cluster):
    before = httpx_metrics(cluster)
    (run,) = asyncio.run(sweep(cluster.url, NS, "pdserve"))
    after = httpx_metrics(cluster)
    s = run["summary"]
    assert s["completed"] == 6 and s["failed"] == 0
    reqs = run["requests"]
    assert all(r["output_tokens"] == 12 and r["ttft"] > 0 and r["e2e"] >= r["ttft"]
               for r in reqs)
    assert all(len(r["itl"]) >= 1 for r in reqs)
    # the frontend counted the same tokens
    gen = "pdserve_generation_tokens_total"
    assert metric_value(after, gen) - metric_value(before, gen) == 6 * 12
    assert s["good"] == 6 and s["goodput"] > 0          # generous SLOs on a tiny model
    assert s["ttft_ms"]["p50"] <= s["ttft_ms"]["p90"] <= s["ttft_ms"]["p99"]
    # the client's own event-loop stalls, on its token times' clock (pdserve/loop_lag.py)
    start, end = min(r["token_times"][0] for r in reqs), max(r["token_times"][-1] for r in reqs)
    assert s["client_stalls"] == len(run["client_stalls"])
    assert all(start - 60 < due < end + 60 and lag >= 0.05 for due, lag in run["client_stalls"])
    assert s["client_stall_max_ms"] == max((lag * 1e3 for _, lag in run["client_stalls"]),
                                           default=0.0)


def test_harness_command_writes_json_and_plots(cluster, tmp_path):
    out = run_module(
        "bench.serve", ["--url", cluster.url, "--num-requests", "4",
                        "--rates", "4,8", "--input", "fixed:64", "--output", "fixed:6",
                        "--vocab", "900", "--out", str(tmp_path / "r.json"),
                        "--plot", str(tmp_path / "r")], timeout=300)
    assert out.returncode == 0, out.stdout[-2000:]
    runs = json.loads((tmp_path / "r.json").read_text())
    assert [r["summary"]["rate"] for r in runs] == [4.0, 8.0]
    assert "goodput" in out.stdout and "4/4" in out.stdout     # tqdm's bar
    for png in ("r-cdf.png", "r-goodput.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_vllm_flags_a_sharegpt_file_and_chat_write_vllms_result_file(cluster, tiny_model,
                                                                     tmp_path):
    """`vllm bench serve`'s command line works as is: a ShareGPT file sampled by vLLM's
    own code, sent to the chat endpoint, and a result file in vLLM's shape."""
    out = run_module("bench.serve", [
         "--base-url", cluster.url, "--backend", "openai-chat", "--model", cluster.model_name,
         "--tokenizer", tiny_model,
         "--dataset-name", "sharegpt",
         "--dataset-path", str(ROOT / "tests/data/sharegpt_tiny.json"),
         "--num-prompts", "5", "--request-rate", "inf", "--max-concurrency", "2",
         "--ignore-eos", "--goodput", "ttft:5000", "tpot:500", "--save-result",
         "--result-dir", str(tmp_path), "--result-filename", "v.json",
         "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99"],
        timeout=300)
    assert out.returncode == 0, out.stdout[-2000:]
    r = json.loads((tmp_path / "v.json").read_text())
    assert r["completed"] == 5 and r["backend"] == "openai-chat" and r["max_concurrency"] == 2
    # --ignore-eos: every answer as long as the dataset's reply
    assert r["total_output_tokens"] == sum(r["output_lens"]) and all(
        n >= 4 for n in r["output_lens"])
    assert all(t for t in r["generated_texts"]) and r["request_goodput"] > 0
    for k in ("median_ttft_ms", "p99_tpot_ms", "p50_itl_ms", "mean_e2el_ms"):
        assert r[k] > 0, k


def httpx_metrics(cluster) -> str:
    import httpx
    return httpx.get(f"{cluster.url}/metrics", timeout=10).text
