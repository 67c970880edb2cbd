"""What the host a benchmark ran on was: facts a reader needs to compare two results.

The kernel's autogroup scheduling decides the long inter-token gaps on a CPU host whose
cores run the engines (docs/operations.md, "Engine settings that matter on CPU": a
frontend or client passed over for 50-365 ms while engine threads hold the cores), so
two runs are comparable only with the same setting; the CPU model and core count set
the SLOs' scale.

`facts` reads /proc and the platform; `describe` is pure."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def cpu_model(cpuinfo: str) -> str:
    """The first `model name` in /proc/cpuinfo's text, or ''."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return ""


def facts() -> dict:
    """{"cpu", "cores" (this process may run on), "kernel", "autogroup" (True, False, or
    None where the kernel has no such setting)}."""
    ag = _read("/proc/sys/kernel/sched_autogroup_enabled")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu_model(_read("/proc/cpuinfo")) or platform.processor(),
            "cores": cores, "kernel": platform.release(),
            "autogroup": None if ag == "" else ag != "0"}


def describe(f: dict) -> str:
    ag = {True: "on", False: "off", None: "n/a"}[f.get("autogroup")]
    return (f"host: {f.get('cpu') or '?'}, {f.get('cores')} cores, Linux {f.get('kernel')}, "
            f"autogroup scheduling {ag}")
