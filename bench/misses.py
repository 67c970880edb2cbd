"""Request by request, what one cell of a benchmark missed and what pdserve predicted.

    .venv/bin/python -m bench.misses results/m148.json --setup pdserve --mix long-mix --rate 0.8275
    .venv/bin/python -m bench.misses results/m179.json --mix long-mix --rate 1.2x
    .venv/bin/python -m bench.misses results/compare.json --setup pdserve --rate 2.4 \\
        --slo-ttft-ms 3400 --slo-tpot-ms 50 --all

One line per request of the cell (by default only those that missed an SLO, and every
prompt of `--long` tokens or more): its index, which SLO it missed (T: TTFT, P: TPOT), when
it was sent (seconds from the cell's first send), its prompt tokens, its TTFT and TPOT with
pdserve's predictions beside them (the `x-pdserve-route` figures, with
`--expose-routing`), and the route. This is how the docs' "prompt by prompt" readings of a
lost cell are made (docs/benchmarks.md). A bench.matrix JSON carries each mix's SLOs (its
calibration); a bench.compare JSON needs `--slo-ttft-ms`/`--slo-tpot-ms`.

`runs_of` and `rows` are pure; `main` reads the file and prints."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from bench.stats import sent_at, within_slo_dict


def runs_of(data: dict, setup: str, mix: str | None
            ) -> tuple[list[dict], tuple[float, float] | None]:
    """The runs of `setup` (of `mix`, in a bench.matrix JSON) and the mix's SLOs in seconds
    when the file has them (bench.matrix's calibration), else None."""
    res = data["results"]
    if mix is not None:
        if mix not in res:
            raise KeyError(f"no mix {mix!r} in this file (it has {', '.join(res)})")
        res = res[mix]
    elif res and all(isinstance(v, dict) for v in res.values()):
        raise KeyError(f"a bench.matrix file: name one of its mixes with --mix ({', '.join(res)})")
    if setup not in res:
        raise KeyError(f"no setup {setup!r} here (there are {', '.join(res)})")
    cal = (data.get("calibration") or {}).get(mix) if mix is not None else None
    slos = (cal["ttft_ms"] / 1e3, cal["tpot_ms"] / 1e3) if cal else None
    return res[setup], slos


def rate_of(data: dict, mix: str | None, rate: str) -> str:
    """`rate` as the summaries name it. In a bench.matrix file it may be a multiplier as
    the matrix's tables show it ("1.2x"): the mix's calibrated rate that is that many times
    its serial capacity (bench.matrix `calibrate`: rate = multiplier / unloaded e2e), so
    the run's own calibration says which, whatever its command line or the default was."""
    if not rate.endswith("x"):
        return rate
    cal = (data.get("calibration") or {}).get(mix) if mix is not None else None
    if not cal:
        raise KeyError(f"{rate}: a multiplier needs a bench.matrix file and its --mix")
    mults = [r * cal["unloaded_e2e_s"] for r in cal["rates"]]
    try:
        want = float(rate[:-1])
    except ValueError:
        want = math.nan
    for r, m in zip(cal["rates"], mults):
        if math.isclose(m, want, rel_tol=1e-3):      # the rates are rounded to 4 places
            return str(r)
    raise KeyError(f"no run at {rate} (the run's multipliers: "
                   f"{', '.join(f'{m:.3g}x' for m in mults)})")


def _rate_matches(run: dict, rate: str) -> bool:
    got = run["summary"]["rate"]
    if isinstance(got, str) or rate == "inf":
        return str(got) == rate
    try:
        return math.isclose(float(got), float(rate), rel_tol=1e-3)
    except ValueError:
        return False


def rows(runs: list[dict], rate: str, ttft_slo_s: float, tpot_slo_s: float,
         every: bool = False, long_tokens: int = 0) -> list[dict]:
    """The requests of the run at `rate` (as the summary names it: "2.4", "inf"), in the
    order they were sent: those that missed an SLO or failed, those of `long_tokens`
    prompt tokens or more, or all of them (`every`)."""
    picked = [r for r in runs if _rate_matches(r, rate)]
    if not picked:
        have = ", ".join(str(r["summary"]["rate"]) for r in runs)
        raise KeyError(f"no run at rate {rate} (there are {have})")
    reqs = picked[0]["requests"]
    sent = [t for t in map(sent_at, reqs) if t is not None]
    t0 = min(sent) if sent else 0.0
    out = []
    for q in sorted(reqs, key=lambda q: q["index"]):
        if not q["ok"]:
            out.append({"index": q["index"], "missed": "failed", "error": q.get("error", "")})
            continue
        # each SLO alone, by the one rule every benchmark counts goodput with
        missed = ("-" if within_slo_dict(q, ttft_slo_s, math.inf) else "T") + (
            "-" if within_slo_dict(q, math.inf, tpot_slo_s) else "P")
        long = long_tokens and q.get("prompt_tokens", 0) >= long_tokens
        if not (every or long or missed != "--"):
            continue
        at = sent_at(q)
        out.append({"index": q["index"], "missed": missed,
                    "sent_s": at - t0 if at is not None else math.nan,
                    "prompt_tokens": q.get("prompt_tokens", 0), "ttft_ms": q["ttft"] * 1e3,
                    "pred_ttft_ms": (q.get("pred_ttft") or math.nan) * 1e3,
                    "tpot_ms": q["tpot"] * 1e3,
                    "pred_tpot_ms": (q.get("pred_tpot") or math.nan) * 1e3,
                    "route": q.get("route_text", "")})
    return out


def line(r: dict, width: int = 60) -> str:
    if r["missed"] == "failed":
        return f"{r['index']:3d} failed {r['error'][:width]}"
    return (f"{r['index']:3d} {r['missed']} sent {r['sent_s']:7.2f} s"
            f"  prompt {r['prompt_tokens']:5d}"
            f"  TTFT {r['ttft_ms']:6.0f} ({r['pred_ttft_ms']:6.0f})"
            f"  TPOT {r['tpot_ms']:6.1f} ({r['pred_tpot_ms']:5.1f})  {r['route'][:width]}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", help="a bench.matrix or bench.compare --out JSON")
    ap.add_argument("--setup", default="pdserve")
    ap.add_argument("--mix", help="the mix (a bench.matrix file)")
    ap.add_argument("--rate", required=True,
                    help="the run's rate as its summary names it, or (a bench.matrix file) "
                         "its multiplier: 1.2x")
    ap.add_argument("--slo-ttft-ms", type=float, help="(a bench.compare file)")
    ap.add_argument("--slo-tpot-ms", type=float, help="(a bench.compare file)")
    ap.add_argument("--all", action="store_true", help="every request, not only the misses")
    ap.add_argument("--long", type=int, default=0,
                    help="also every prompt of this many tokens or more")
    ap.add_argument("--width", type=int, default=60, help="characters of the route shown")
    ns = ap.parse_args(argv)
    try:
        data = json.loads(Path(ns.file).read_text())
        runs, slos = runs_of(data, ns.setup, ns.mix)
        if ns.slo_ttft_ms and ns.slo_tpot_ms:
            slos = (ns.slo_ttft_ms / 1e3, ns.slo_tpot_ms / 1e3)
        if slos is None:
            raise KeyError("this file has no SLOs: give --slo-ttft-ms and --slo-tpot-ms")
        found = rows(runs, rate_of(data, ns.mix, ns.rate), *slos, every=ns.all,
                     long_tokens=ns.long)
    except KeyError as e:
        raise SystemExit(f"bench.misses: {e.args[0]}") from None
    print(f"SLOs: TTFT {slos[0] * 1e3:.0f} ms, TPOT {slos[1] * 1e3:.1f} ms; "
          "T: TTFT missed, P: TPOT missed; (predicted)")
    for r in found:
        print(line(r, ns.width))


if __name__ == "__main__":
    main()
