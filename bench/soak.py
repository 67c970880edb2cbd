"""Soak: N concurrent clients for M minutes against a real cluster, with hang-ups, client
timeouts and bad requests mixed in; the memory of every process over time, and what the
engines hold at the end.

    .venv/bin/python -m bench.soak --minutes 10 --concurrency 8 --out results/soak.json \
        --plot docs/img/soak-rss.png

Each client loops: a streamed or unary completion (most), a stream it hangs up on after a
few chunks, a request it gives up on (a client timeout of 50-500 ms), or a bad request
(which must get a 4xx). A request is *lost* when it gets a 5xx, a broken stream or no
answer, or when a bad request is not a 4xx. Every `--sample-s` the resident memory (RSS)
of every process under the launcher is sampled (frontend, scheduler, workers and their
vLLM engine cores). At the end, once the load stops: every worker's running and waiting
requests, KV usage and KV leases (all must be 0).

Memory is judged after warm-up (the first `--warmup` fraction of the run): the mean RSS
of the last 10% of samples against the mean of the 10% right after warm-up, per process.
Target: within 10%, zero leaked blocks, zero lost requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROLES = ("frontend", "scheduler", "prefill", "decode", "worker")


def label(p: psutil.Process, labels: dict[int, str]) -> str:
    """A readable, stable name for a process under the launcher."""
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return f"pid{p.pid}"
    if "pdserve.cli" in " ".join(cmd) or any(c.endswith("/pdserve") for c in cmd):
        role = next((c for c in cmd if c in ROLES), "launcher")
        return f"{role}:{p.pid}"
    role = labels.get(p.ppid(), f"pid{p.ppid()}").split("/")[0].split(":")[0]
    what = cmd[0] if cmd and cmd[0].startswith("VLLM::") else (
        "resource_tracker" if "resource_tracker" in " ".join(cmd) else
        (cmd[0].rsplit("/", 1)[-1] if cmd else "?"))
    return f"{role}/{what}:{p.pid}"


def sample(root: int, labels: dict[int, str]) -> dict[str, float]:
    """RSS in MiB of every process under `root` (and root itself), by label."""
    out = {}
    try:
        procs = [psutil.Process(root)] + psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return out
    for p in sorted(procs, key=lambda p: p.pid):     # parents before their children
        try:
            if p.pid not in labels:
                labels[p.pid] = label(p, labels)
            out[labels[p.pid]] = p.memory_info().rss / 2**20
        except psutil.Error:
            continue
    return out


def words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(900)}" for _ in range(n))


class Tally:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.lost: list[str] = []

    def add(self, kind: str, lost: str = "") -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if lost:
            self.lost.append(lost[:300])


async def client_loop(i: int, url: str, model: str, deadline: float, tally: Tally,
                      seed: int) -> None:
    rng = random.Random(seed * 1000 + i)
    async with httpx.AsyncClient(timeout=120) as c:
        while time.monotonic() < deadline:
            r = rng.random()
            body = {"model": model, "prompt": words(rng, rng.randint(16, 400)),
                    "max_tokens": rng.randint(8, 64), "temperature": 0}
            try:
                if r < 0.1:
                    await bad_request(c, url, model, rng, tally)
                elif r < 0.2:
                    await give_up(c, url, body, rng, tally)
                elif r < 0.4:
                    await hang_up(c, url, body, rng, tally)
                else:
                    await complete(c, url, body, rng.random() < 0.5, tally)
            except Exception as e:  # noqa: BLE001 - a lost request, counted
                tally.add("lost", f"{type(e).__name__}: {e}")


async def complete(c, url, body, stream, tally: Tally) -> None:
    if not stream:
        r = await c.post(f"{url}/v1/completions", json=body)
        if r.status_code == 429:
            return tally.add("refused")
        ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        return tally.add("ok" if ok else "lost", "" if ok else f"{r.status_code} {r.text}")
    async with c.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as s:
        if s.status_code == 429:
            return tally.add("refused")
        if s.status_code != 200:
            return tally.add("lost", f"stream {s.status_code} {(await s.aread())[:200]!r}")
        done = False
        async for line in s.aiter_lines():
            if '"error"' in line:
                return tally.add("lost", f"stream error {line}")
            done |= line == "data: [DONE]"
        tally.add("ok" if done else "lost", "" if done else "stream ended without [DONE]")


async def hang_up(c, url, body, rng, tally: Tally) -> None:
    after = rng.randint(1, 6)
    async with c.stream("POST", f"{url}/v1/completions",
                        json={**body, "stream": True, "max_tokens": 64, "ignore_eos": True}) as s:
        if s.status_code == 429:
            return tally.add("refused")
        n = 0
        async for line in s.aiter_lines():
            if line.startswith("data: "):
                n += 1
                if n >= after:
                    break           # closing the stream here is the client going away
    tally.add("hung_up")


async def give_up(c, url, body, rng, tally: Tally) -> None:
    try:
        await asyncio.wait_for(c.post(f"{url}/v1/completions", json=body),
                               rng.uniform(0.05, 0.5))
        tally.add("ok")
    except asyncio.TimeoutError:
        tally.add("gave_up")


BAD = [
    {"prompt": "", "max_tokens": 2},
    {"prompt": [10, 999999], "max_tokens": 2},
    {"prompt": "a", "top_k": 2**31},
    {"prompt": "a", "stop": ["x"] * 100},
    {"prompt": "a", "max_tokens": -1},
]


async def bad_request(c, url, model, rng, tally: Tally) -> None:
    r = await c.post(f"{url}/v1/completions", json={"model": model, **rng.choice(BAD)})
    ok = 400 <= r.status_code < 500 and "error" in r.json()
    tally.add("bad_4xx" if ok else "lost", "" if ok else f"bad request got {r.status_code}")


def flatness(series: list[dict], warmup: float) -> dict[str, dict]:
    """Per process: mean RSS right after warm-up and at the end, and the growth."""
    n = len(series)
    a, b = int(n * warmup), int(n * (warmup + 0.1)) + 1
    tail = series[-max(1, n // 10):]
    out = {}
    names = set().union(*(s["rss"] for s in series)) if series else set()
    for name in sorted(names):
        early = [s["rss"][name] for s in series[a:b] if name in s["rss"]]
        late = [s["rss"][name] for s in tail if name in s["rss"]]
        if not early or not late:
            continue
        e, lt = statistics.mean(early), statistics.mean(late)
        out[name] = {"after_warmup_mib": round(e, 1), "end_mib": round(lt, 1),
                     "growth": round((lt - e) / e, 4)}
    return out


def plot(series: list[dict], path: str, warmup: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    t0 = series[0]["t"]
    names = sorted(set().union(*(s["rss"] for s in series)))
    for name in names:
        xs = [(s["t"] - t0) / 60 for s in series if name in s["rss"]]
        ys = [s["rss"][name] for s in series if name in s["rss"]]
        ax.plot(xs, ys, label=name.rsplit(":", 1)[0])
    ax.axvline((series[-1]["t"] - t0) / 60 * warmup, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MiB)")
    ax.set_yscale("log")
    ax.set_title("soak: resident memory of every process (dashed: end of warm-up)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


async def run(args) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from pdserve.models import build_tiny_model, ensure_bundled_model
    from bench.local_cluster import start_cluster, stop_cluster_proc

    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    model = args.model or (str(build_tiny_model(tmp / "tiny")) if args.tiny
                           else str(ensure_bundled_model()))
    cl = start_cluster(model, tmp / "cluster.log", extra=args.extra.split())
    print(f"cluster up at {cl.url} (log {tmp / 'cluster.log'})", flush=True)
    series: list[dict] = []
    labels: dict[int, str] = {}
    tally = Tally()
    try:
        deadline = time.monotonic() + args.minutes * 60

        async def sampler():
            while time.monotonic() < deadline:
                series.append({"t": time.time(), "rss": sample(cl.proc.pid, labels)})
                await asyncio.sleep(args.sample_s)

        t0 = time.monotonic()
        await asyncio.gather(sampler(), *[client_loop(i, cl.url, cl.model_name, deadline,
                                                      tally, args.seed)
                                          for i in range(args.concurrency)])
        loads = cl.wait_idle(timeout=60)
        end = {wid: {"running": v.running, "waiting": v.waiting, "kv_usage": v.kv_usage,
                     "kv_leases_held": v.kv_leases_held} for wid, v in loads.items()}
        series.append({"t": time.time(), "rss": sample(cl.proc.pid, labels)})
        after = httpx.post(f"{cl.url}/v1/completions", timeout=60, json={
            "model": cl.model_name, "prompt": "the fox", "max_tokens": 4}).status_code
    finally:
        rc = stop_cluster_proc(cl.proc)
    flat = flatness(series, args.warmup)
    leaked = sum(1 for v in end.values() if any(v.values()))
    res = {"minutes": args.minutes, "concurrency": args.concurrency,
           "wall_s": round(time.monotonic() - t0, 1), "requests": tally.counts,
           "lost": len(tally.lost), "lost_examples": tally.lost[:10], "end": end,
           "workers_holding_anything_at_end": leaked, "next_request_status": after,
           "launcher_rc": rc, "rss": flat, "samples": series,
           "max_growth": max((v["growth"] for v in flat.values()), default=0.0)}
    print(json.dumps({k: v for k, v in res.items() if k != "samples"}, indent=1))
    ok = (not tally.lost and not leaked and after == 200 and res["max_growth"] <= 0.10)
    print(f"soak {'PASSED' if ok else 'MISSED'}: lost {len(tally.lost)}, workers holding KV "
          f"or requests at the end {leaked}, largest RSS growth after warm-up "
          f"{res['max_growth']:+.1%} (target within 10%)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    if args.plot and series:
        plot(series, args.plot, args.warmup)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--sample-s", type=float, default=5)
    ap.add_argument("--warmup", type=float, default=0.25, help="fraction of the run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="", help="a model directory (default: --tiny)")
    ap.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=True,
                    help="the tiny random test model (--no-tiny: the bundled SmolLM2)")
    ap.add_argument("--extra", default="--policy kv",
                    help="extra `pdserve serve` flags (default: every request crosses the "
                         "KV transfer path, the part that holds leases)")
    ap.add_argument("--out", default="")
    ap.add_argument("--plot", default="")
    res = asyncio.run(run(ap.parse_args(argv)))
    return 0 if not res["lost"] and not res["workers_holding_anything_at_end"] else 1


if __name__ == "__main__":
    sys.exit(main())
