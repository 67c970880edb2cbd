"""The e2e tests' cluster harness (bench/local_cluster.py, shared with the benchmarks) and
their ground truth: colocated vLLM engines (`reference`)."""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import subprocess
from pathlib import Path

from bench.local_cluster import (  # noqa: F401 - the tests' harness, re-exported
    ROOT,
    SECRET as TEST_SECRET,
    Cluster,
    PortTaken,
    busy,
    channel,
    creds,
    metric_value,
    start_cluster,
    start_module,
    start_zygote,
    stop_cluster_proc,
    wait_until,
)
from bench.compare import Procs, vllm_server
from pdserve.rpc import pd_pb2_grpc


def sched(c: Cluster):
    """A blocking stub of the cluster's scheduler (as admin)."""
    return pd_pb2_grpc.SchedulerStub(channel(c.scheduler))


def pid_of(c: Cluster, name: str) -> int:
    """The pid the launcher logged for its child `name` (the latest start)."""
    return int(re.findall(rf"started {name} \(pid (\d+)\)", c.log_path.read_text())[-1])


def engine_core(worker_pid: int):
    """The vLLM engine-core process (a `psutil.Process`) the worker `worker_pid` started."""
    import psutil
    (core,) = [p for p in psutil.Process(worker_pid).children()
               if p.name().startswith("VLLM::EngineCor")]
    # at one rank on CPU, vLLM's worker runs inside the engine core (pdserve/engine.py)
    assert [p.name() for p in core.children()] == []
    return core


def by_role(c: Cluster, role) -> list:
    return [w for w in c.workers() if w.role == role]


def assert_idle(c: Cluster, workers, timeout: float = 30.0) -> None:
    """Every worker in `workers` holds nothing: no running or waiting request, no KV in
    use, no lease (polled until `timeout`, `Cluster.wait_idle`)."""
    left = busy(c.wait_idle(timeout, workers))
    assert not left, f"KV still in use: {left}"


def assert_prompt_loaded_not_recomputed(before: str, after: str, n: int) -> None:
    """Between two scrapes of a decode worker's metrics: its engine took all `n` prompt
    tokens of one request from a KV transfer, and fell back to recomputing none."""
    name = "vllm:prompt_tokens_by_source_total"
    assert (metric_value(after, name, source="external_kv_transfer")
            - metric_value(before, name, source="external_kv_transfer")) == n
    assert (metric_value(after, "pdserve_kv_recompute_fallbacks_total")
            == metric_value(before, "pdserve_kv_recompute_fallbacks_total"))


def start_vllm_api(procs: Procs, model_dir: str, served_name: str, name: str,
                   extra: list[str] = ()) -> str:
    """vLLM's own OpenAI server on core 1 (`vllm serve`: the ground truth of the API tests),
    float32 as the tests' clusters; its URL (`bench.compare.wait_ready` it). Its engine runs
    in one process (the uniprocess executor, as pdserve's engines at one rank): the same
    outputs, and 8 s less to start than vLLM's CPU default, which spawns a third interpreter
    for the model (`bench.compare --vllm-one-process`; measured: ready in 17.5 s instead of
    25.6 s on a 2-core AVX512 host)."""
    ns = argparse.Namespace(model=model_dir, served_name=served_name, max_model_len=2048,
                            max_num_seqs=32, max_num_batched_tokens=4096, kv_cache_gib=1,
                            baseline_quiet_wait=True, dtype="float32", vllm_one_process=True)
    return vllm_server(procs, ns, name, "1", list(extra))


class ReferenceEngine:
    """A colocated vLLM engine kept for the session (`reference_gen.py`), one per
    configuration: starting one costs three generations of vLLM imports, or none where
    PDSERVE_ZYGOTE names a running zygote (the e2e session's), which forks it with vLLM
    imported and its sampler kernel compiled."""

    MODULE = "tests.e2e.reference_gen"

    def __init__(self, args: list[str], log: Path, timeout: float = 600) -> None:
        self.log = log
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        try:
            self.proc = start_module(self.MODULE, [*args, "--log", str(log)], out_w,
                                     stdin=in_r, stderr=2)
        except BaseException:
            os.close(in_w)
            os.close(out_r)
            raise
        finally:
            os.close(in_r)
            os.close(out_w)
        self.stdin, self.stdout = os.fdopen(in_w, "w"), os.fdopen(out_r, "r")
        if "ready" not in self._answer(timeout):
            raise RuntimeError(f"reference engine did not start; see {log}")

    def _answer(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.stdout], [], [], timeout)
        line = self.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise RuntimeError(f"reference engine gave no answer in {timeout:.0f}s or "
                               f"exited; see {self.log}:\n" + self.log.read_text()[-3000:])
        return json.loads(line)

    def run(self, req: dict, timeout: float = 600) -> list[dict]:
        self.stdin.write(json.dumps(req) + "\n")
        self.stdin.flush()
        ans = self._answer(timeout)
        if "error" in ans:
            raise RuntimeError(f"reference engine: {ans['error']}")
        return ans["outputs"]

    def close(self) -> None:
        """EOF on stdin stops it; its process group is killed if it lingers."""
        if self.proc.poll() is None:
            try:
                self.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)    # engine-core grandchildren
        except ProcessLookupError:
            pass


_REFERENCES: dict[tuple, ReferenceEngine] = {}


def close_references() -> None:
    while _REFERENCES:
        _REFERENCES.popitem()[1].close()


def reference(model_dir: str, prompts: list[list[int]], max_tokens: int, tmp: Path,
              cores: str = "1", max_num_batched_tokens: int = 0,
              block_size: int = 128, sampling: list[dict] | None = None,
              keep: bool = True) -> list[dict]:
    """Greedy outputs of a colocated vLLM engine; `sampling`: more SamplingParams per
    prompt. The engine for this configuration is started on first use (its log in `tmp`)
    and kept until `close_references()`, or stopped at once if not `keep` (an idle
    engine still polls: a few % of a core)."""
    key = (model_dir, cores, max_num_batched_tokens, block_size)
    if key not in _REFERENCES or _REFERENCES[key].proc.poll() is not None:
        _REFERENCES[key] = ReferenceEngine(
            ["--model", model_dir, "--cores", cores,
             "--max-num-batched-tokens", str(max_num_batched_tokens),
             "--block-size", str(block_size)], tmp / "reference.log")
    try:
        return _REFERENCES[key].run({"max_tokens": max_tokens, "prompts": prompts,
                                     "sampling": sampling})
    finally:
        if not keep:
            _REFERENCES.pop(key).close()
