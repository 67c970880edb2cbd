"""Where a setup's CPU goes while it serves: CPU seconds per process and per role (the
engines, the serving processes around them, the client) over one sweep.

    .venv/bin/python -m bench.cpu_use --setups pdserve,vllm-2x --input mix:0.25:1024:128 \\
        --output fixed:16 --rates 2.2 --num-requests 36 --slo-ttft-ms 3600 --slo-tpot-ms 48

On a 2-core host every CPU second a frontend, scheduler, worker or proxy spends is one an
engine does not get, so this is what pdserve's control plane costs against vLLM's API
servers and a proxy. Each setup starts as `bench.compare` starts it (`--pdserve-arg`,
`--variant` as there), is warmed up, then serves the sweep between two readings of
/proc for every process under this one (each thread's utime + stime).

`--idle-s N` first reads them over N seconds with no request in flight: what the setup
costs, and how often its threads wake (context switches), while it only waits.

    .venv/bin/python -m bench.cpu_use --setups pdserve --idle-s 20 --num-requests 0

`snapshot` reads /proc; `usage`, `role`, `report` and `idle_report` are pure."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

# (role, a cmdline prefix or fragment): the first that matches names the process
ROLES = (
    ("engine", "VLLM::"),                 # vLLM's engine core and model workers (setproctitle)
    ("frontend", "pdserve.cli frontend"),
    ("scheduler", "pdserve.cli scheduler"),
    ("worker", "pdserve.cli prefill"), ("worker", "pdserve.cli decode"),
    ("worker", "pdserve.cli worker"),
    ("launcher", "pdserve.cli serve"),
    ("api-server", "vllm.entrypoints.openai.api_server"), ("api-server", "vllm serve"),
    ("proxy", "bench.proxy"),
)


def role(cmdline: str, client: bool = False) -> str:
    """The role of a process from its command line; `client` for the benchmark itself."""
    if client:
        return "client"
    for name, frag in ROLES:
        if cmdline.startswith(frag) or f" {frag}" in cmdline or f"-m {frag}" in cmdline:
            return name
    return "other"


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = defaultdict(list)
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                st = Path(f"/proc/{p}/stat").read_text()
            except OSError:
                continue
            kids[int(st[st.rindex(")") + 2:].split()[1])].append(int(p))
    return kids


def _run_delay(pid: int, tid: str) -> float:
    """Seconds the thread was ready to run but waited for a CPU (schedstat's second
    field; 0 where the kernel keeps no schedstats)."""
    try:
        return int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def _switches(pid: int, tid: str) -> int:
    """The thread's context switches so far, voluntary and not: how often it stopped
    running, so about how often it woke."""
    try:
        return sum(int(line.split()[1]) for line in Path(
            f"/proc/{pid}/task/{tid}/status").read_text().splitlines()
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")))
    except (OSError, IndexError, ValueError):
        return 0


def _worker_id(cmd: str) -> str:
    m = re.search(r"--worker-id (\S+)", cmd)
    return m.group(1) if m else ""


def snapshot(root: int) -> dict[tuple[int, int], tuple[str, str, float, float, int]]:
    """{(pid, tid): (cmdline, thread name, CPU seconds so far, seconds it waited for a
    CPU so far, context switches so far)} for `root` and every process under it. An
    engine's command line gets its worker's id (`VLLM::EngineCore [decode-0]`), from the
    process that started it."""
    kids, todo, out = _children(), [(root, "")], {}
    while todo:
        pid, parent = todo.pop()
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace").strip()
            wid = _worker_id(cmd) or (parent if cmd.startswith("VLLM::") else "")
            todo += [(k, wid) for k in kids.get(pid, [])]
            if cmd.startswith("VLLM::") and wid:
                cmd = f"{cmd} [{wid}]"
            for tid in os.listdir(f"/proc/{pid}/task"):
                st = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                fields = st[st.rindex(")") + 2:].split()
                out[(pid, int(tid))] = (cmd, st[st.index("(") + 1:st.rindex(")")],
                                        (int(fields[11]) + int(fields[12])) / TICK,
                                        _run_delay(pid, tid), _switches(pid, tid))
        except OSError:        # ended between the listing and the read
            continue
    return out


def usage(before: dict, after: dict, client: int) -> dict:
    """CPU seconds between two snapshots: {"roles": {role: s}, "waits": {role: s},
    "procs": [[s, pid, role, cmdline, waited s], ...] (most CPU first), "threads": [[s,
    pid, name, waited s, switches], ...] (most CPU first), "switches": {role: n}}. "waits"
    and the waited seconds: how long
    threads were ready to run and waited for a CPU (for a pinned engine's busiest thread,
    what the other threads on its core took from its steps; a process's sum also counts
    its threads waiting on each other). A thread that began between them counts
    from 0; one that ended is not seen (its time is lost, so the figures are a lower
    bound)."""
    procs: dict[int, list] = {}
    threads: dict[tuple[int, str], list] = defaultdict(lambda: [0.0, 0.0, 0])
    switches: dict[str, int] = defaultdict(int)
    for key, (cmd, name, cpu, wait, sw) in after.items():
        _c, _n, cpu0, wait0, sw0 = before.get(key, (cmd, name, 0.0, 0.0, 0))
        d = max(0.0, cpu - cpu0)
        n_sw = max(0, sw - sw0)
        pid = key[0]
        p = procs.setdefault(pid, [0.0, pid, role(cmd, pid == client), cmd[:100], 0.0])
        p[0] += d
        p[4] += max(0.0, wait - wait0)
        t = threads[(pid, name)]
        t[0] += d
        t[1] += max(0.0, wait - wait0)
        t[2] += n_sw
        switches[p[2]] += n_sw
    roles: dict[str, float] = defaultdict(float)
    waits: dict[str, float] = defaultdict(float)
    for s, _pid, r, _cmd, w in procs.values():
        roles[r] += s
        waits[r] += w
    return {"roles": dict(sorted(roles.items(), key=lambda x: -x[1])),
            "waits": dict(waits), "switches": dict(switches),
            "procs": sorted(procs.values(), key=lambda x: -x[0]),
            "threads": sorted(([s, pid, n, w, k] for (pid, n), (s, w, k) in threads.items()),
                              key=lambda x: -x[0])}


def report(setup: str, wall_s: float, cores: int, u: dict, top: int = 8) -> str:
    total = sum(u["roles"].values())
    lines = [f"== {setup}: {total:.1f} CPU s over {wall_s:.1f} s on {cores} cores "
             f"({100 * total / max(wall_s * cores, 1e-9):.0f}% of them)"]
    waits = u.get("waits", {})
    for r, s in u["roles"].items():
        lines.append(f"   {r:11s} {s:7.2f} s  {100 * s / max(total, 1e-9):5.1f}%"
                     f"   waited for a CPU {waits.get(r, 0.0):6.2f} s")
    lines.append("   engines:")
    for s, pid, r, cmd, w in u["procs"]:
        if r == "engine" and s >= 0.01:
            lines.append(f"   {s:7.2f} s, waited {w:6.2f} s  {pid:7d} {cmd}")
    lines.append("   busiest threads:")
    for s, pid, name, w, _k in u["threads"][:top]:
        if s >= 0.01:
            lines.append(f"   {s:7.2f} s, waited {w:6.2f} s  {pid:7d} {name}")
    return "\n".join(lines)


def idle_report(setup: str, wall_s: float, u: dict, top: int = 8) -> str:
    """What a setup costs while it only waits: CPU (% of one core) and wake-ups a second
    per role, and the threads that wake most (a name's threads in one process summed)."""
    lines = [f"== {setup}, idle for {wall_s:.1f} s:"]
    wall = max(wall_s, 1e-9)
    for r, s in u["roles"].items():
        lines.append(f"   {r:11s} {100 * s / wall:5.2f}% of a core"
                     f"   {u['switches'].get(r, 0) / wall:7.0f} wake-ups/s")
    lines.append("   threads that wake most:")
    for s, pid, name, _w, k in sorted(u["threads"], key=lambda t: -t[4])[:top]:
        lines.append(f"   {k / wall:7.0f}/s {100 * s / wall:5.2f}%  {pid:7d} {name}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from bench import compare as C
    from bench.serve import sweep
    from bench.serve_args import add_workload_args

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_setup_args(ap, "pdserve,vllm-2x", "/tmp/pdserve-cpu-use")
    ap.add_argument("--idle-s", type=float, default=0.0,
                    help="first read the setup idle for this long (CPU and wake-ups)")
    add_workload_args(ap)
    ns = C.finish_args(ap.parse_args(argv))
    cores = len(os.sched_getaffinity(0))
    me, out = os.getpid(), {}
    for setup in C.setup_list(ap, ns):
        def body(url, setup=setup):
            idle = None
            if ns.idle_s > 0:
                a, t0 = snapshot(me), time.monotonic()
                time.sleep(ns.idle_s)
                idle = {"wall_s": time.monotonic() - t0, "cpu": usage(a, snapshot(me), me)}
                print(idle_report(setup, idle["wall_s"], idle["cpu"]), flush=True)
            if not ns.num_requests:
                return {"wall_s": 0.0, "cpu": usage({}, {}, me), "runs": [], "idle": idle}
            a, t0 = snapshot(me), time.monotonic()
            runs = asyncio.run(sweep(url, ns, setup))
            wall, b = time.monotonic() - t0, snapshot(me)
            return {"wall_s": wall, "cpu": usage(a, b, me), "runs": runs, "idle": idle}
        r = C.run_setup(setup, ns, body)
        out[setup] = r
        if not r["runs"]:
            continue
        print(report(setup, r["wall_s"], cores, r["cpu"]), flush=True)
        for run in r["runs"]:
            s = run["summary"]
            print(f"   rate {s.get('rate')}: {s.get('completed')} completed, goodput "
                  f"{s.get('goodput', 0):.3f} req/s", flush=True)
    if ns.out:
        Path(ns.out).write_text(json.dumps({"argv": sys.argv[1:] if argv is None else argv,
                                            "results": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
