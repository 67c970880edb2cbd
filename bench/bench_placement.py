"""Placement benchmark (issue: KV-aware scheduler). Prints figures measured in one run.

  micro     routing decision latency with N registered workers, M indexed blocks and a
            long prompt (the real Route code path: hashing, index lookup, cost, booking);
            event ingestion rate through (a) the worker's relay (vLLM msgpack decode +
            our hashing) and (b) the scheduler's gRPC KVEvents stream on loopback.
  workload  a shared-prefix workload (common system prompts + multi-turn chats) against
            a real 2-prefill/1-decode cluster, once per placement policy (kv, round_robin,
            least_loaded): prefix hit rate (the prefill engines' own counters) and TTFT.

Reproduce:
  .venv/bin/python bench/bench_placement.py micro
  .venv/bin/python bench/bench_placement.py workload            # bundled SmolLM2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

from bench.stats import percentile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pct(xs, q):
    return percentile(list(xs), q)


# ---------------------------------------------------------------- micro

def build_scheduler(n_workers: int, n_blocks: int, block_size: int, prompt_tokens: int, seed=0):
    """A SchedulerServicer with n_workers (half prefill, half decode) and n_blocks indexed:
    chains of shared system prompts and per-conversation tails, as a fleet would hold."""
    from pdserve import kvhash
    from scheduler.config import SchedulerConfig
    from scheduler.service import SchedulerServicer
    from scheduler.state import Load, Worker

    rng = random.Random(seed)
    svc = SchedulerServicer(SchedulerConfig())
    for i in range(n_workers):
        role = "prefill" if i % 2 == 0 else "decode"
        svc.reg.register(Worker(f"w{i}", role, f"127.0.0.1:{10000 + i}", "", "m", "h", 0.0,
                                Load(running=rng.randint(0, 8), kv_usage=rng.random() * 0.5,
                                     num_blocks=100000, max_num_seqs=64),
                                block_size=block_size))
    n_prefix = prompt_tokens // block_size
    prefixes = []
    held = 0
    while held < n_blocks:
        base = [rng.randrange(50000) for _ in range(prompt_tokens)]
        hashes = kvhash.block_hashes(base, block_size)
        prefixes.append(base)
        # each chain is cached on 1-4 workers, to a random depth
        for w in rng.sample(range(n_workers), rng.randint(1, 4)):
            depth = rng.randint(1, n_prefix)
            svc.index.stored(f"w{w}", hashes[:depth])
            held += depth
    return svc, prefixes


def micro_route(ns) -> dict:
    from scheduler.placement import place

    t0 = time.perf_counter()
    svc, prefixes = build_scheduler(ns.workers, ns.blocks, ns.block_size, ns.prompt_tokens)
    st = svc.index.stats()
    build_s = time.perf_counter() - t0
    rng = random.Random(1)
    lat = []
    cfg = svc.cfg.placement
    for _ in range(ns.decisions):
        base = rng.choice(prefixes)
        cut = rng.randrange(len(base) // 2, len(base))
        ids = base[:cut] + [rng.randrange(50000) for _ in range(len(base) - cut)]
        t = time.perf_counter()
        d = place(svc.reg, cfg, "m", len(ids), svc._overlap(ids))
        b = svc.reg.book(d, 0.0)
        lat.append(time.perf_counter() - t)
        svc.reg.finish(b.booking_id)
    return {"workers": ns.workers, "indexed_blocks": st.entries, "distinct_blocks": st.blocks,
            "block_size": ns.block_size, "prompt_tokens": ns.prompt_tokens,
            "build_s": build_s, "decisions": len(lat),
            "route_p50_ms": pct(lat, 50) * 1e3, "route_p99_ms": pct(lat, 99) * 1e3,
            "route_max_ms": max(lat) * 1e3}


def micro_relay(ns) -> dict:
    """Worker side: vLLM's msgpack KVEventBatch -> EventMirror (our hashes)."""
    import msgspec
    from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch

    from pdserve.kv_events import EventMirror

    rng = random.Random(2)
    bs = ns.block_size
    payloads = []
    n_events = 0
    next_hash = 1
    enc = msgspec.msgpack.Encoder()
    live = []
    for _ in range(ns.batches):
        evs = []
        # a request stores a 16-block chain; old chains are evicted
        chain = list(range(next_hash, next_hash + 16))
        next_hash += 16
        evs.append(BlockStored(block_hashes=chain, parent_block_hash=None,
                               token_ids=[rng.randrange(50000) for _ in range(16 * bs)],
                               block_size=bs, lora_id=None, medium="GPU", lora_name=None))
        live.append(chain)
        n_events += 16
        if len(live) > 64:
            old = live.pop(0)
            evs.append(BlockRemoved(block_hashes=old, medium="GPU"))
            n_events += 16
        payloads.append(enc.encode(KVEventBatch(ts=time.time(), events=evs)))
    dec = msgspec.msgpack.Decoder(type=KVEventBatch)
    m = EventMirror()
    t = time.perf_counter()
    for p in payloads:
        m.apply(dec.decode(p).events)
    dt = time.perf_counter() - t
    return {"relay_block_events": n_events, "relay_s": dt, "relay_events_per_s": n_events / dt}


async def micro_grpc_ingest(ns) -> dict:
    """Scheduler side: KVEvents gRPC stream on loopback into the real servicer."""
    import grpc

    from scheduler.config import SchedulerConfig
    from pdserve.rpc import pd_pb2, pd_pb2_grpc
    from scheduler.server import create_server

    server, port, svc = await create_server(SchedulerConfig(port=0))
    await server.start()
    rng = random.Random(3)
    per_batch = ns.events_per_batch
    msgs = []
    live = []
    n = 0
    for i in range(ns.batches):
        stored = [rng.getrandbits(64) for _ in range(per_batch)]
        removed = live.pop(0) if len(live) > 64 else []
        live.append(stored)
        msgs.append(pd_pb2.KVEventBatch(worker_id=f"w{i % 8}", stored=stored, removed=removed))
        n += len(stored) + len(removed)

    async def gen():
        for m in msgs:
            yield m
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    t = time.perf_counter()
    await pd_pb2_grpc.SchedulerStub(ch).KVEvents(gen())
    dt = time.perf_counter() - t
    await ch.close()
    await server.stop(0)
    return {"grpc_block_events": n, "grpc_s": dt, "grpc_events_per_s": n / dt,
            "events_per_batch": per_batch}


def cmd_micro(ns) -> dict:
    out = micro_route(ns)
    out.update(micro_relay(ns))
    out.update(asyncio.run(micro_grpc_ingest(ns)))
    print(f"routing: {out['workers']} workers, {out['indexed_blocks']:,} indexed blocks "
          f"({out['distinct_blocks']:,} distinct), block {out['block_size']}, "
          f"prompt {out['prompt_tokens']} tokens")
    print(f"  decision latency p50 {out['route_p50_ms']:.3f} ms  p99 {out['route_p99_ms']:.3f} ms"
          f"  max {out['route_max_ms']:.3f} ms   (target p99 <= 1 ms)")
    print("event ingestion (target >= 100k block events/s):")
    print(f"  worker relay (msgpack decode + hashing): {out['relay_events_per_s']:,.0f}/s")
    print(f"  scheduler gRPC stream on loopback:       {out['grpc_events_per_s']:,.0f}/s "
          f"({out['events_per_batch']} blocks per message)")
    return out


# ---------------------------------------------------------------- workload

def shared_prefix_workload(tok_vocab: int, n_system: int, system_tokens: int,
                           n_convs: int, turns: int, user_tokens: int, answer_tokens: int,
                           seed: int):
    """Requests in rounds: round t holds turn t of every conversation (shuffled). Turn t's
    prompt = system prompt + all earlier turns (user + a fixed stand-in answer) + new user
    message, so a conversation's history is a prefix cached where its last turn ran."""
    rng = random.Random(seed)
    systems = [[rng.randrange(100, tok_vocab) for _ in range(system_tokens)]
               for _ in range(n_system)]
    convs = []
    for c in range(n_convs):
        sysp = systems[c % n_system]
        hist = list(sysp)
        prompts = []
        for _ in range(turns):
            hist = hist + [rng.randrange(100, tok_vocab) for _ in range(user_tokens)]
            prompts.append(list(hist))
            hist = hist + [rng.randrange(100, tok_vocab) for _ in range(answer_tokens)]
        convs.append(prompts)
    rounds = []
    for t in range(turns):
        r = [convs[c][t] for c in range(n_convs)]
        rng.shuffle(r)
        rounds.append(r)
    return rounds


async def run_workload(url: str, model: str, rounds, concurrency: int, out_tokens: int):
    import httpx
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_cluster import one

    res = []
    async with httpx.AsyncClient(timeout=600) as client:
        sem = asyncio.Semaphore(concurrency)

        async def bounded(ids):
            async with sem:
                return await one(client, url, model, ids, out_tokens)
        for i, r in enumerate(rounds):
            out = await asyncio.gather(*[bounded(ids) for ids in r])
            for o in out:
                o["round"] = i
            res += out
    return res


def engine_hits(c) -> tuple[float, float]:
    from pdserve.rpc import pd_pb2
    from bench.local_cluster import metric_value

    hits = queries = 0.0
    for w in c.workers():
        if w.role == pd_pb2.ROLE_PREFILL:
            m = c.metrics(w)
            hits += metric_value(m, "vllm:prefix_cache_hits_total")
            queries += metric_value(m, "vllm:prefix_cache_queries_total")
    return hits, queries


def cmd_workload(ns) -> dict:
    from pdserve.models import ensure_bundled_model
    from bench.local_cluster import start_cluster, stop_cluster_proc

    model = ns.model or str(ensure_bundled_model())
    rounds = shared_prefix_workload(ns.vocab, ns.system_prompts, ns.system_tokens,
                                    ns.conversations, ns.turns, ns.user_tokens,
                                    ns.answer_tokens, ns.seed)
    n_req = sum(len(r) for r in rounds)
    results = {}
    for policy in ns.policies:
        c = start_cluster(model, Path(f"/tmp/pdserve-bench-placement-{policy}.log"),
                          extra=["--prefill-workers", "2", "--decode-workers", "1",
                                 "--kv-cache-gib", str(ns.kv_cache_gib), "--policy", policy])
        try:
            h0, q0 = engine_hits(c)
            t = time.perf_counter()
            res = asyncio.run(run_workload(c.url, c.model_name, rounds, ns.concurrency,
                                           ns.output_tokens))
            wall = time.perf_counter() - t
            h1, q1 = engine_hits(c)
        finally:
            stop_cluster_proc(c.proc)
        ttft = [r["ttft"] for r in res]
        results[policy] = {
            "requests": len(res), "wall_s": wall,
            "hit_rate": (h1 - h0) / (q1 - q0) if q1 > q0 else 0.0,
            "ttft_p50_ms": pct(ttft, 50) * 1e3, "ttft_p99_ms": pct(ttft, 99) * 1e3,
            "ttft_mean_ms": statistics.mean(ttft) * 1e3,
            "per_request": [{"round": r["round"], "prompt_tokens": r["prompt_tokens"],
                             "ttft_ms": r["ttft"] * 1e3,
                             "kv_s": (r["kv"] or {}).get("seconds")} for r in res]}
        print(f"{policy:>13}: hit rate {results[policy]['hit_rate']:.3f}  TTFT p50 "
              f"{results[policy]['ttft_p50_ms']:.0f} ms  p99 {results[policy]['ttft_p99_ms']:.0f}"
              f" ms  ({len(res)} requests in {wall:.0f} s)", flush=True)
    print(f"\nworkload: {ns.system_prompts} system prompts x {ns.system_tokens} tokens, "
          f"{ns.conversations} conversations x {ns.turns} turns (+{ns.user_tokens} user, "
          f"+{ns.answer_tokens} answer tokens per turn), {n_req} requests, concurrency "
          f"{ns.concurrency}, {ns.output_tokens} output tokens")
    print(f"{'policy':>13} | prefix hit rate | TTFT p50 ms | TTFT p99 ms")
    for p, r in results.items():
        print(f"{p:>13} | {r['hit_rate']:15.3f} | {r['ttft_p50_ms']:11.0f} | "
              f"{r['ttft_p99_ms']:11.0f}")
    if "kv" in results:
        for p, r in results.items():
            if p != "kv":
                k = results["kv"]
                print(f"kv vs {p}: hit rate {k['hit_rate']:.3f} vs {r['hit_rate']:.3f}; TTFT "
                      f"p50 x{r['ttft_p50_ms'] / k['ttft_p50_ms']:.2f} faster, p99 "
                      f"x{r['ttft_p99_ms'] / k['ttft_p99_ms']:.2f} faster")
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("micro")
    m.add_argument("--workers", type=int, default=64)
    m.add_argument("--blocks", type=int, default=1_000_000)
    m.add_argument("--block-size", type=int, default=16)
    m.add_argument("--prompt-tokens", type=int, default=8192)
    m.add_argument("--decisions", type=int, default=2000)
    m.add_argument("--batches", type=int, default=2000)
    m.add_argument("--events-per-batch", type=int, default=64)
    w = sub.add_parser("workload")
    w.add_argument("--model", default=None, help="model dir (default: bundled SmolLM2)")
    w.add_argument("--policies", nargs="+", default=["kv", "round_robin", "least_loaded"])
    w.add_argument("--system-prompts", type=int, default=4)
    w.add_argument("--system-tokens", type=int, default=256)
    w.add_argument("--conversations", type=int, default=16)
    w.add_argument("--turns", type=int, default=4)
    w.add_argument("--user-tokens", type=int, default=224)
    w.add_argument("--answer-tokens", type=int, default=32)
    w.add_argument("--output-tokens", type=int, default=8)
    w.add_argument("--concurrency", type=int, default=2)
    w.add_argument("--kv-cache-gib", type=float, default=1.0)
    w.add_argument("--vocab", type=int, default=40000)
    w.add_argument("--seed", type=int, default=0)
    for p in (m, w):
        p.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    ns = ap.parse_args(argv)
    out = cmd_micro(ns) if ns.cmd == "micro" else cmd_workload(ns)
    if ns.out:
        ns.out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
