"""What the host a benchmark ran on was: facts a reader needs to compare two results.

The kernel's autogroup scheduling decides the long inter-token gaps on a CPU host whose
cores run the engines (docs/operations.md, "Engine settings that matter on CPU": a
frontend or client passed over for 50-365 ms while engine threads hold the cores), so
two runs are comparable only with the same setting; the CPU model and core count set
the SLOs' scale. A virtual machine may name every AMD host "AMD EPYC": its family, model
and vector extensions tell them apart (bench.matrix's calibration, from requests served one
at a time, set TPOT SLOs of 126.6 and 130.8 ms on a family 23 model 1 host, AVX2 only, against
47-54 ms on the "AMD EPYC" hosts of the runs before).

`facts` reads /proc and the platform; `describe` is pure."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from pdserve.config import cpu_flags


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _first(cpuinfo: str, name: str) -> str:
    """The first value of field `name` in /proc/cpuinfo's text, or ''."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def cpu_model(cpuinfo: str) -> str:
    """The first `model name` in /proc/cpuinfo's text, or ''."""
    return _first(cpuinfo, "model name")


ISA = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")   # what vLLM's CPU kernels use


def cpu_kind(cpuinfo: str) -> str:
    """"family F model M; EXT EXT" from /proc/cpuinfo's text (the first processor's family
    and model; the vector extensions of ISA the CPU has), or '' where it names no family."""
    family = _first(cpuinfo, "cpu family")
    if not family:
        return ""
    flags = cpu_flags(cpuinfo)
    ext = " ".join(f for f in ISA if f in flags) or "no AVX2"
    return f"family {family} model {_first(cpuinfo, 'model') or '?'}; {ext}"


def facts() -> dict:
    """{"cpu", "cpu_kind" (cpu_kind), "cores" (this process may run on), "kernel",
    "autogroup" (True, False, or None where the kernel has no such setting)}."""
    ag = _read("/proc/sys/kernel/sched_autogroup_enabled")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = _read("/proc/cpuinfo")
    return {"cpu": cpu_model(info) or platform.processor(), "cpu_kind": cpu_kind(info),
            "cores": cores, "kernel": platform.release(),
            "autogroup": None if ag == "" else ag != "0"}


def describe(f: dict) -> str:
    ag = {True: "on", False: "off", None: "n/a"}[f.get("autogroup")]
    kind = f" ({f['cpu_kind']})" if f.get("cpu_kind") else ""
    return (f"host: {f.get('cpu') or '?'}{kind}, {f.get('cores')} cores, "
            f"Linux {f.get('kernel')}, autogroup scheduling {ag}")


# A fixed piece of work timed on one core: what the host gives a CPU engine now. A shared
# host's speed drifts (a 1,040-token prefill step took 515-604 ms on an idle pdserve
# cluster and, two hours later, 717-790), and a matrix serves its setups one after
# another, so a drift falls on the later setups; timed before each, it shows.
PROBE = ("import time, torch\n"
         "torch.set_num_threads(1)\n"
         "a = torch.randn(512, 512)\n"
         "a @ a\n"
         "t, n = time.perf_counter(), 0\n"
         "while time.perf_counter() - t < {secs}:\n"
         "    a @ a\n"
         "    n += 1\n"
         "print((time.perf_counter() - t) / n)\n")


def probe(secs: float = 1.0, core: str = "0") -> float:
    """Seconds per 512 x 512 float32 matmul on `core` over `secs` (nan if it cannot run)."""
    import shutil
    import subprocess
    import sys
    argv = [sys.executable, "-c", PROBE.format(secs=secs)]
    if shutil.which("taskset"):
        argv = ["taskset", "-c", core, *argv]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60 + 2 * secs)
        return float(out.stdout.split()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return float("nan")


def drift(probes: dict[str, float]) -> str:
    """One line: each start's probe time (ms; keyed by setup, or by setup and mix where
    the matrix interleaves), and how much slower than the first's the host was then.
    Pure."""
    items = list(probes.items())
    if not items:
        return ""
    first = items[0][1]
    parts = []
    for name, s in items:
        rel = s / first if first > 0 and s == s else float("nan")
        parts.append(f"{name} {s * 1e3:.2f} ms ({rel:.2f}x)")
    return "host probe before each start (a 512 x 512 matmul on one core; x the first's): " \
        + ", ".join(parts)
