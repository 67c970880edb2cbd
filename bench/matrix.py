"""The adaptive-disaggregation matrix: every setup on the same 2 cores against several
traffic mixes, three rates each, in one run.

    .venv/bin/python -m bench.matrix                              # everything, bundled SmolLM2
    .venv/bin/python -m bench.matrix --mixes prefill,shift --num-requests 12 \\
        --out results/matrix.json --plot results/matrix

Setups (bench/compare.py): vllm-1 (one colocated server on both cores), vllm-2x (two
replicas, one core each, least-outstanding proxy), vllm-2x-chunked (the same with
--max-num-batched-tokens 256) and pdserve with its defaults. Each starts once per mix,
mix by mix, their order reversed from one mix to the next (`schedule`), so a drift of the
host's speed falls on every setup alike; `--no-interleave` starts each once for every
mix. `--variant 'pdserve-mixed=--mixed'` adds a setup of ours with extra `pdserve serve`
flags, reported against the peers like the defaults (never as a peer itself), so two
settings meet the same host in one run; each variant's report ends with its count within
both SLOs against the defaults' and the requests only one of the two served within them.

Mixes (`MIXES`): prefill-dominated (uniform long prompts, short outputs), decode-dominated
(short prompts, long outputs), the long-prompt mix (a quarter long prompts) and a
shifting mix (prefill-dominated for the first half of each run, decode-dominated after).
`--mix NAME=INPUT,OUTPUT` (repeatable) adds a mix of one's own, in bench/workload.py's
length forms, e.g. `--mix chat=uniform:32:1536,uniform:8:96 --mixes chat`: a check on a
mix nobody tuned for.

The matrix means the same on a fast or a slow host: before it, each mix's requests are
sent one at a time to the calibration setup (the first in --setups; by default vllm-2x, one
engine per core, the per-engine hardware pdserve's workers get). One pair of SLOs holds for
every mix, as a user states them once: multiples of that unloaded latency (TTFT:
--ttft-scale x the slowest unloaded TTFT of any mix; TPOT: --tpot-scale x the median
unloaded TPOT), given to pdserve as its --ttft-slo-ms/--tpot-slo-ms (the matrix's own
--ttft-slo-ms/--tpot-slo-ms fix them instead: the slowest unloaded TTFT swings with the
prompts the calibration draws, 706 or 1,547 ms on one host, so A/B runs that must meet the
same SLO name it). The rates are
multiples (--rate-mult) of one engine's serial capacity for each mix (1 / its mean
unloaded end-to-end latency).

Prints per mix the table of goodput and latencies, per cell pdserve's goodput over the
best peer's, the targets (at least as many requests within SLOs as the best peer in every
cell: the same requests at the same times; 1.5x the best peer's peak
where a peer's TPOT p99 breaks the SLO; TPOT p99 of pdserve's locally prefilled requests
within the SLO) and the latency model's median absolute error of TTFT and TPOT per mix.
After its sweeps each setup serves --ceiling-requests of each mix all at once: the
requests per second its engines complete saturated, an upper bound on its goodput at any
rate, printed against the 1.5x-peak target; and per rate the most goodput any setup could
reach with those arrival times (`arrival_bounds`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from pathlib import Path

from bench import compare as C, host
from bench.stats import Result, percentile, sent_at, sign_test_p, within_by_request
from bench.workload import parse_dist

MIXES = {   # name -> (input lengths, output lengths), bench/workload.py forms
    "prefill": ("uniform:384:640", "fixed:8"),
    "decode": ("uniform:16:64", "fixed:48"),
    "long-mix": ("mix:0.25:1024:128", "fixed:16"),
    "shift": ("shift:uniform:384:640~uniform:16:64", "shift:fixed:8~fixed:48"),
}
SETUP_ORDER = ("vllm-2x", "vllm-1", "vllm-2x-chunked", "pdserve")


def calibrate(by_mix: dict[str, list[Result]], ttft_scale: float, tpot_scale: float,
              mults: list[float], ttft_ms: float = 0.0, tpot_ms: float = 0.0
              ) -> dict[str, dict]:
    """One pair of SLOs for every mix, and each mix's rates, from requests served one at
    a time; `ttft_ms`/`tpot_ms` (> 0) fix an SLO instead. Pure."""
    out, ttfts, tpots = {}, [], []
    for mix, results in by_mix.items():
        ok = [r for r in results if r.ok]
        if not ok:
            raise RuntimeError(f"calibration of {mix}: no request completed")
        ttfts += [r.ttft for r in ok]
        tpots += [r.tpot for r in ok if not math.isnan(r.tpot)]
        e2e = sum(r.e2e for r in ok) / len(ok)
        out[mix] = {"unloaded_e2e_s": e2e, "min_e2e_s": min(r.e2e for r in ok),
                    "rates": [round(m / e2e, 4) for m in mults]}
    slo = {"ttft_ms": ttft_ms or ttft_scale * max(ttfts) * 1e3,
           "tpot_ms": tpot_ms or tpot_scale * (percentile(tpots, 50) if tpots else 0.0) * 1e3}
    for c in out.values():
        c.update(slo)
    return out


def parse_mix(spec: str) -> tuple[str, tuple[str, str]]:
    """`NAME=INPUT,OUTPUT` -> (NAME, (INPUT, OUTPUT)), the lengths checked
    (bench/workload.py's forms). Pure."""
    name, eq, rest = spec.partition("=")
    inp, comma, out = rest.partition(",")
    if not (name.strip() and eq and comma and inp and out) or "," in out:
        raise ValueError(f"bad mix {spec!r}: NAME=INPUT,OUTPUT")
    parse_dist(inp)
    parse_dist(out)
    return name.strip(), (inp, out)


def mix_ns(ns, mix: str, cal: dict | None = None) -> argparse.Namespace:
    """`ns` for one mix. Its seed follows the mix's place among the known mixes (the
    built-in ones, then --mix's), not its place in --mixes: a run of some mixes gets the
    same requests, and the same calibration, as the whole matrix (before, the long-prompt
    mix run alone or second had other prompts, and its 4 calibration requests could hold
    no 1,024-token prompt: a TTFT SLO of 755-826 ms against the whole matrix's 1,698)."""
    inp, out = ns.mix_defs[mix]
    idx = list(ns.mix_defs).index(mix)
    d = {**vars(ns), "input": inp, "output": out, "seed": ns.seed + 100_000 * idx}
    if cal is not None:
        d.update(slo_ttft_ms=cal["ttft_ms"], slo_tpot_ms=cal["tpot_ms"],
                 rates=",".join(f"{r:g}" for r in cal["rates"]),
                 rate_seed_offsets=[rate_seed_offset(float(m))
                                    for m in ns.rate_mult.split(",")])
    return argparse.Namespace(**d)


def rate_seed_offset(mult: float) -> int:
    """A cell's seed offset from its rate multiplier, not its place in --rate-mult: the
    0.6x ladder (0.6, 1.2, 1.8, 2.4, 3.0) keeps the offsets its places gave it (0, 1000,
    2000, ...), and a run of some of its rates gets the same requests in the same cells
    (before, `--rate-mult 1.2,1.8,2.4` served the whole matrix's 0.6-1.8x requests at
    1.2-2.4x). Pure."""
    return round(1000 * (mult / 0.6 - 1))


async def _calibrate(url: str, ns, mixes: list[str]) -> dict[str, dict]:
    from bench.serve import run_once, served_model, spec_for
    from bench.workload import build

    by_mix = {}
    for mix in mixes:
        m = mix_ns(ns, mix)
        m.num_requests = ns.calibration_requests
        m.concurrency = 1          # one at a time, back to back
        reqs = build(spec_for(m, 1.0, seed=m.seed + 99_999))
        by_mix[mix], _ = await run_once(url, await served_model(url), reqs, 1,
                                        f"calibrate {mix}", ns.timeout_s)
    cals = calibrate(by_mix, ns.ttft_scale, ns.tpot_scale,
                     [float(x) for x in ns.rate_mult.split(",")], ns.ttft_slo_ms,
                     ns.tpot_slo_ms)
    for mix, cal in cals.items():
        print(f"calibration {mix}: SLO TTFT {cal['ttft_ms']:.0f} ms, TPOT "
              f"{cal['tpot_ms']:.1f} ms, rates {cal['rates']} req/s (unloaded e2e "
              f"{cal['unloaded_e2e_s']:.2f} s)", flush=True)
    return cals


def schedule(setups: list[str], mixes: list[str], interleave: bool
             ) -> list[tuple[str, list[str]]]:
    """The order the matrix starts its setups in: (setup, the mixes it serves while up).
    One start per setup serving every mix, or (`interleave`) one start per setup and mix,
    mix by mix, the setups' order reversed from one mix to the next (A B C, C B A, ...):
    a host whose speed drifts during the run then falls on every setup about alike, where
    in one-start order it falls on the later setups (m202: the host about a third slower by
    pdserve's turn, the last). The first start is always the first setup, which calibrates
    the SLOs. Pure."""
    if not interleave:
        return [(s, list(mixes)) for s in setups]
    return [(s, [m]) for i, m in enumerate(mixes)
            for s in (setups if i % 2 == 0 else setups[::-1])]


def run_matrix(ns) -> tuple[dict, dict, dict, dict]:
    """{mix: {setup: runs}}, {mix: calibration}, {mix: {setup: summary of the ceiling
    run}}, {"setup" or "setup mix" (interleaved): the host probe before it
    (`host.probe`)}."""
    from bench.serve import sweep

    mixes = [m.strip() for m in ns.mixes.split(",") if m.strip()]
    setups = ns.setup_list
    results: dict[str, dict[str, list]] = {m: {} for m in mixes}
    ceilings: dict[str, dict[str, dict]] = {m: {} for m in mixes}
    cals: dict[str, dict] = {}
    probes: dict[str, float] = {}

    def body_for(setup: str, served: list[str]):
        def body(url: str):
            if not cals:
                if ns.pdserve_url:
                    print(f"note: the pdserve at {ns.pdserve_url} keeps its own SLOs; the "
                          "calibrated ones below reach only a pdserve the matrix starts",
                          file=sys.stderr, flush=True)
                cals.update(asyncio.run(_calibrate(url, ns, mixes)))
                slo = next(iter(cals.values()))
                # pdserve is told the SLOs, as a user states them once
                ns.pdserve_arg += ["--ttft-slo-ms", f"{slo['ttft_ms']:.0f}",
                                   "--tpot-slo-ms", f"{slo['tpot_ms']:.1f}"]
            for mix in served:
                results[mix][setup] = asyncio.run(sweep(url, mix_ns(ns, mix, cals[mix]),
                                                        f"{setup} {mix}"))
            for mix in served if ns.ceiling_requests > 0 else []:
                # the setup's throughput with its engines saturated: every request at once,
                # prompts of their own
                m = mix_ns(ns, mix, cals[mix])
                m.rates, m.num_requests, m.seed = "inf", ns.ceiling_requests, m.seed + 50_000
                runs = asyncio.run(sweep(url, m, f"{setup} {mix} ceiling"))
                ceilings[mix][setup] = runs[0]["summary"]
        return body

    if setups and setups[0].startswith(C.OURS):
        raise SystemExit("the first setup calibrates the SLOs pdserve is given: put a "
                         "vLLM setup first")
    for s, served in schedule(setups, mixes, ns.interleave):
        key = f"{s} {served[0]}" if ns.interleave else s
        probes[key] = host.probe()   # nothing of ours runs now: the host's own speed
        print(host.drift(probes), flush=True)
        C.run_setup(s, ns, body_for(s, served))
        if ns.out:      # what is measured so far survives a later failure
            Path(f"{ns.out}.partial").parent.mkdir(parents=True, exist_ok=True)
            Path(f"{ns.out}.partial").write_text(json.dumps(
                {"calibration": cals, "results": results, "ceilings": ceilings}))
    # the setups in --setups order whatever order they ran in
    results = {m: {s: res[s] for s in setups if s in res} for m, res in results.items()}
    ceilings = {m: {s: c[s] for s in setups if s in c} for m, c in ceilings.items()}
    return results, cals, ceilings, probes


# ---------------------------------------------------------------------- report (pure)

def _local_tpot_p99(runs: list[dict], ttft_slo_s: float = math.inf,
                    on_time: bool | None = None) -> tuple[float, int]:
    """TPOT p99 (ms) of pdserve's locally prefilled requests, and how many there were;
    `on_time`: only those whose TTFT met `ttft_slo_s` (True) or missed it (False). A late
    request's stream keeps no slack on its engine, by design (docs/design.md, "Late
    streams keep no slack"), so its TPOT is not held to the SLO."""
    xs = [r["tpot"] for run in runs for r in run["requests"]
          if r["ok"] and r.get("route") == "local" and not math.isnan(r["tpot"])
          and (on_time is None or (r.get("ttft", 0.0) <= ttft_slo_s) == on_time)]
    return (percentile(xs, 99) * 1e3 if xs else math.nan), len(xs)


def paired(ours: list[dict], peer: list[dict], ttft_slo_s: float,
           tpot_slo_s: float) -> tuple[int, int, float]:
    """Request by request over a mix's rates (every setup serves the same requests at the
    same times): how many only `ours` served within both SLOs, how many only `peer` did,
    and the sign test's p (`stats.sign_test_p`): under about 0.05, a difference this run's
    noise is unlikely to make; above, one it could."""
    a = within_by_request(ours, ttft_slo_s, tpot_slo_s)
    b = within_by_request(peer, ttft_slo_s, tpot_slo_s)
    both = a.keys() & b.keys()
    wins = sum(1 for k in both if a[k] and not b[k])
    losses = sum(1 for k in both if b[k] and not a[k])
    return wins, losses, sign_test_p(wins, losses)


def against_defaults(variant: list[dict], defaults: list[dict], cal: dict) -> dict:
    """A variant's runs against the defaults' in one mix (an A/B in one run: the same
    requests at the same times): each one's requests within both SLOs over every rate,
    per cell as "variant/defaults", and request by request (`paired`). Pure."""
    mine, theirs = C.by_rate(variant), C.by_rate(defaults)
    rates = sorted(mine.keys() & theirs.keys())
    wins, losses, pval = paired(variant, defaults, cal["ttft_ms"] / 1e3, cal["tpot_ms"] / 1e3)
    return {"good": sum(mine[r].get("good", 0) for r in rates),
            "defaults_good": sum(theirs[r].get("good", 0) for r in rates),
            "cells": " / ".join(f"{mine[r].get('good', 0)}/{theirs[r].get('good', 0)}"
                                for r in rates),
            "only_ours": wins, "only_defaults": losses, "p": pval}


def ceiling_lines(ceil: dict[str, dict], best_peak: float) -> tuple[list[str], dict]:
    """What the engines can complete at all: each setup's requests per second with every
    request sent at once (no SLO), against the 1.5x-peak target. Goodput at any rate is
    at most that, so a target above every setup's ceiling is out of reach on this hardware,
    whatever the placement. Pure."""
    if not ceil:
        return [], {}
    caps = {s: c["request_throughput"] for s, c in ceil.items()}
    need = 1.5 * best_peak
    top = max(caps, key=lambda s: caps[s])
    reachable = not need > caps[top]
    return ["  ceiling, every request at once (completed req/s): "
            + ", ".join(f"{s} {v:.3f}" for s, v in caps.items())
            + f"; 1.5x the best peer's peak is {need:.3f} req/s, "
            + (f"within {top}'s ceiling" if reachable else
               f"{need / caps[top]:.2f}x the highest ceiling ({top}): out of reach on these "
               "engines")], {"ceiling": caps, "ceiling_needed": need,
                             "peak_target_reachable": reachable}


def arrival_bounds(runs: list[dict], min_e2e_s: float) -> dict[float, float]:
    """The most goodput any setup could reach in each cell (req/s): every request within
    its SLOs, the last one sent served as fast as the fastest request of the mix
    unloaded, so n / (the sends' span + `min_e2e_s`). Goodput's clock starts with the run
    (at or before the first send), so the true most is lower still: a target above every
    cell's bound is out of reach at these rates and arrival times whatever the setup (a
    peer that already serves close to its offered rate leaves no room for 1.5x). Pure."""
    out = {}
    for x in runs:
        sends = [t for t in map(sent_at, x["requests"]) if t is not None]
        if len(sends) >= 2 and min_e2e_s > 0:
            n = x["summary"].get("requests", len(x["requests"]))
            out[x["summary"]["rate"]] = n / (max(sends) - min(sends) + min_e2e_s)
    return out


def mix_report(mix: str, res: dict[str, list], cal: dict, ours: str = C.OURS,
               ceil: dict[str, dict] | None = None,
               lengths: tuple[str, str] | None = None) -> tuple[str, dict]:
    inp, outp = lengths or MIXES[mix]
    lines = [f"=== mix {mix}: input {inp}, output {outp}; SLO TTFT "
             f"{cal['ttft_ms']:.0f} ms, TPOT {cal['tpot_ms']:.1f} ms", C.table(res)]
    peers = [s for s in res if not s.startswith(C.OURS)]
    out: dict = {"cells": [], "mix": mix, "setup": ours}
    if ours not in res or not peers:
        return "\n".join(lines), out
    mine = C.by_rate(res[ours])
    lines.append(f"\n{'rate':>8} {ours:>8} {'best peer':>16} {'ratio':>6} {'within SLO':>11}")
    all_ok = True
    for rate, s in sorted(mine.items()):
        # a cell compares the requests within SLOs: every setup gets the same requests at
        # the same arrival times, and with as many within SLOs goodput in req/s differs
        # only by when the last one ended (the best peer: the most within, then goodput)
        best = max(peers, key=lambda p: (C.by_rate(res[p]).get(rate, {}).get("good", -1),
                                         C.by_rate(res[p]).get(rate, {}).get("goodput", -1)))
        ps = C.by_rate(res[best]).get(rate, {})
        b = ps.get("goodput", math.nan)
        r = C.ratio(s["goodput"], b)
        ok = s.get("good", 0) >= ps.get("good", 0)
        all_ok &= ok
        out["cells"].append({"rate": rate, "ours": s["goodput"], "best": best, "peer": b,
                             "ratio": r, "good": s.get("good"), "peer_good": ps.get("good"),
                             "met": ok})
        lines.append(f"{rate:>8g} {s['goodput']:>8.3f} {best:>9} {b:>6.3f} "
                     f"{C._cell(r, '6.2f')} {s.get('good', 0):>5}/{ps.get('good', 0):<5}"
                     f"{'' if ok else '  MISSED'}")

    def peak(runs):
        return max((x["summary"]["goodput"] for x in runs), default=math.nan)

    best_peak = max(peak(res[p]) for p in peers)
    tpot_breaks = any(x["summary"]["tpot_ms"]["p99"] > cal["tpot_ms"]
                      for p in peers for x in res[p])
    pr = C.ratio(peak(res[ours]), best_peak)
    local_p99, _ = _local_tpot_p99(res[ours])
    split = [_local_tpot_p99(res[ours], cal["ttft_ms"] / 1e3, t) for t in (True, False)]
    errs = [x["summary"].get("model_error", {}) for x in res[ours]]
    med = {k: percentile([e[k] for e in errs if not math.isnan(e.get(k, math.nan))], 50)
           for k in ("ttft", "tpot")}
    out.update(every_cell=all_ok, peak_ratio=pr, peer_tpot_breaks=tpot_breaks,
               local_tpot_p99_ms=local_p99, local_tpot_p99_on_time_ms=split[0][0],
               local_tpot_p99_late_ms=split[1][0], model_error=med,
               routes=[x["summary"].get("routes", {}) for x in res[ours]])
    lines.append(f"  [{'MET ' if all_ok else 'MISSED'}] requests within SLOs >= the best peer's "
                 "in every cell")
    out["paired"] = {}
    for p in peers:
        wins, losses, pval = paired(res[ours], res[p], cal["ttft_ms"] / 1e3, cal["tpot_ms"] / 1e3)
        out["paired"][p] = {"only_ours": wins, "only_peer": losses, "p": pval}
        lines.append(f"         request by request against {p}: {wins} within SLOs only with "
                     f"{ours}, {losses} only with {p} (sign test p = {pval:.2f})")
    if ours != C.OURS and C.OURS in res:    # a variant: what it changed, against the defaults
        out["against_defaults"] = against_defaults(res[ours], res[C.OURS], cal)
        a = out["against_defaults"]
        lines.append(f"  against the defaults ({C.OURS}): {a['good']} within SLOs against "
                     f"{a['defaults_good']} ({a['cells']}); request by request {a['only_ours']} "
                     f"only with {ours}, {a['only_defaults']} only with {C.OURS} "
                     f"(sign test p = {a['p']:.2f})")
    if tpot_breaks:
        lines.append(f"  [{'MET ' if pr >= 1.5 else 'MISSED'}] peak goodput >= 1.5x the best "
                     f"peer's peak (a peer's TPOT p99 breaks the SLO): {pr:.2f}x")
    else:
        lines.append(f"  [n/a ] no peer's TPOT p99 breaks the SLO; peak ratio {pr:.2f}x")
    bounds = arrival_bounds(res[ours], cal.get("min_e2e_s", 0.0))
    if bounds:
        need = 1.5 * best_peak
        top = max(bounds.values())
        out.update(arrival_bound=bounds, peak_target_within_arrival_bound=not need > top)
        lines.append("  most any setup could reach per rate (all within SLOs, the last request "
                     "as fast as the fastest unloaded): "
                     + ", ".join(f"{r:g}: {b:.3f}" for r, b in sorted(bounds.items()))
                     + (f"; 1.5x the best peer's peak ({need:.3f}) is above every one: out of "
                        "reach at these rates, whatever the setup" if need > top else ""))
    more, cap = ceiling_lines(ceil or {}, best_peak)
    lines += more
    out.update(cap)
    lines.append(f"  [{'MET ' if not local_p99 > cal['tpot_ms'] else 'MISSED'}] TPOT p99 of "
                 f"locally prefilled requests within the SLO: {C._cell(local_p99, '.1f')} ms")
    (on, n_on), (late, n_late) = split
    lines.append(f"         of them with TTFT within its SLO: {C._cell(on, '.1f')} ms ({n_on}); "
                 f"late, whose streams keep no slack: {C._cell(late, '.1f')} ms ({n_late})")
    ok_err = all(not v > 0.2 for v in med.values())
    lines.append(f"  [{'MET ' if ok_err else 'MISSED'}] latency model median |error| <= 20%: "
                 f"TTFT {C._cell(med['ttft'] * 100, '.0f')}%, TPOT "
                 f"{C._cell(med['tpot'] * 100, '.0f')}%")
    lines.append(f"  pdserve routes per rate: {out['routes']}")
    return "\n".join(lines), out


def main(argv=None) -> int:
    from bench.serve import add_workload_args, plot_goodput

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_setup_args(ap, ",".join(SETUP_ORDER), "/tmp/pdserve-matrix")
    ap.add_argument("--mixes", default=",".join(MIXES))
    ap.add_argument("--mix", action="append", default=[], metavar="NAME=INPUT,OUTPUT",
                    help="a mix of one's own (bench/workload.py's length forms); name it "
                         "in --mixes to run it")
    ap.add_argument("--ttft-scale", type=float, default=2.0)
    ap.add_argument("--tpot-scale", type=float, default=1.5)
    ap.add_argument("--ttft-slo-ms", type=float, default=0.0,
                    help="a TTFT SLO of one's own instead of --ttft-scale's (the slowest "
                         "unloaded TTFT swings with the prompts the calibration draws: "
                         "A/B runs that must meet the same SLO fix it)")
    ap.add_argument("--tpot-slo-ms", type=float, default=0.0,
                    help="likewise for TPOT")
    ap.add_argument("--rate-mult", default="0.6,1.2,1.8")
    ap.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                    help="start each setup once per mix, the setups' order reversed from "
                         "one mix to the next, so a drift of the host's speed falls on "
                         "every setup alike (--no-interleave: one start per setup, serving "
                         "every mix, as before 2026-12-08)")
    ap.add_argument("--calibration-requests", type=int, default=4)
    ap.add_argument("--ceiling-requests", type=int, default=24,
                    help="after its sweeps, each setup serves this many requests of each "
                         "mix all at once: the throughput its engines reach saturated (0: "
                         "skip)")
    add_workload_args(ap)
    ap.set_defaults(num_requests=8, input="fixed:128", output="fixed:8")
    ns = C.finish_args(ap.parse_args(argv))
    ns.setup_list = C.setup_list(ap, ns)
    ns.mix_defs = dict(MIXES)
    for spec in ns.mix:
        try:
            name, lengths = parse_mix(spec)
        except ValueError as e:
            ap.error(str(e))
        ns.mix_defs[name] = lengths
    for m in ns.mixes.split(","):
        if m.strip() and m.strip() not in ns.mix_defs:
            ap.error(f"unknown mix {m!r}; known: {', '.join(ns.mix_defs)}")
    hf = host.facts()
    print(host.describe(hf), flush=True)
    results, cals, ceilings, probes = run_matrix(ns)
    texts, summary = [], []
    for mix, res in results.items():
        for ours in [s for s in res if s.startswith(C.OURS)]:
            text, out = mix_report(mix, res, cals[mix], ours, ceilings.get(mix),
                                   ns.mix_defs[mix])
            texts.append(text)
            summary.append(out)
    texts.insert(0, host.describe(hf) + "\n" + host.drift(probes))
    print("\n\n".join(texts), flush=True)
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).write_text(json.dumps({"argv": sys.argv[1:] if argv is None else argv,
                                            "host": hf, "host_probes": probes,
                                            "calibration": cals, "summary": summary,
                                            "ceilings": ceilings,
                                            "report": "\n\n".join(texts),
                                            "results": results}, indent=1))
    if ns.plot:
        Path(ns.plot).parent.mkdir(parents=True, exist_ok=True)
        for mix, res in results.items():
            path = f"{ns.plot}-{mix}-goodput.png"
            plot_goodput({s: [(r["summary"]["rate"], r["summary"]["goodput"]) for r in runs]
                          for s, runs in res.items()}, path)
            print(f"wrote {path}", flush=True)
    failed = sum(r["summary"]["failed"] for res in results.values() for runs in res.values()
                 for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
