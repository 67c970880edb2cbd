"""Several bench.matrix runs taken together.

One run's cell holds 24 requests or so, and on a shared 2-core host a cell moves by two or
three of them from run to run: "at least the best peer's in every cell" is then a coin
flip in the closest cells, whichever setup is better. Pooled, the runs say more: per mix,
how many cells of all the runs ours met, each setup's requests within both SLOs over
every run, and request by request against each peer over every run (each run's setups
serve the same requests at the same times, so each request of each run is a pair; pairs
never cross runs, so runs under different SLOs or at different rates pool as they are),
with the sign test's p.

    .venv/bin/python -m bench.pool results/m196.json results/m197.json

Pure but for `main`, which reads the files and prints.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

from bench.stats import sign_test_p, within_by_request

OURS = "pdserve"


@dataclass
class Pooled:
    runs: int = 0
    cells: int = 0              # cells where ours and a peer both ran
    cells_met: int = 0          # ... where ours served at least the best peer's count
    good: dict[str, int] = field(default_factory=dict)      # setup -> within both SLOs
    served: dict[str, int] = field(default_factory=dict)    # setup -> requests sent
    pairs: dict[str, list[int]] = field(default_factory=dict)   # peer -> [only ours, only peer]
    slos: set[tuple[float, float]] = field(default_factory=set)

    def sign(self, peer: str) -> tuple[int, int, float]:
        w, lo = self.pairs.get(peer, [0, 0])
        return w, lo, sign_test_p(w, lo)


def pool(docs: list[dict], ours: str = OURS) -> dict[str, Pooled]:
    """Per mix, the runs in `docs` (bench.matrix `--out` JSONs) that ran `ours` on it."""
    out: dict[str, Pooled] = {}
    for doc in docs:
        for mix, setups in doc.get("results", {}).items():
            cal = doc.get("calibration", {}).get(mix)
            if ours not in setups or not cal:
                continue
            ttft_s, tpot_s = cal["ttft_ms"] / 1e3, cal["tpot_ms"] / 1e3
            p = out.setdefault(mix, Pooled())
            p.runs += 1
            p.slos.add((cal["ttft_ms"], cal["tpot_ms"]))
            made = {s: within_by_request(runs, ttft_s, tpot_s) for s, runs in setups.items()}
            for s, m in made.items():
                p.good[s] = p.good.get(s, 0) + sum(m.values())
                p.served[s] = p.served.get(s, 0) + len(m)
            mine = made[ours]
            peers = [s for s in setups if s != ours and not s.startswith(ours)]
            for peer in peers:
                both = mine.keys() & made[peer].keys()
                tally = p.pairs.setdefault(peer, [0, 0])
                tally[0] += sum(1 for k in both if mine[k] and not made[peer][k])
                tally[1] += sum(1 for k in both if made[peer][k] and not mine[k])
            for rate in sorted({k[0] for k in mine}):
                counts = [sum(v for k, v in made[s].items() if k[0] == rate) for s in peers
                          if any(k[0] == rate for k in made[s])]
                if counts:
                    p.cells += 1
                    p.cells_met += sum(v for k, v in mine.items() if k[0] == rate) >= max(counts)
    return out


def render(pooled: dict[str, Pooled], ours: str = OURS) -> list[str]:
    lines = []
    for mix, p in pooled.items():
        slos = ", ".join(f"{t:.0f}/{s:.1f}" for t, s in sorted(p.slos))
        lines.append(f"=== {mix}: {p.runs} run(s), SLOs TTFT/TPOT ms {slos}")
        lines.append(f"  cells where {ours} served at least the best peer's count: "
                     f"{p.cells_met} of {p.cells}")
        lines.append("  within both SLOs: " + ", ".join(
            f"{s} {p.good[s]}/{p.served[s]}" for s in sorted(p.good, key=lambda s: -p.good[s])))
        for peer in sorted(p.pairs):
            w, lo, pv = p.sign(peer)
            lines.append(f"  request by request against {peer}: {w} only with {ours}, "
                         f"{lo} only with {peer} (sign test p = {pv:.3f})")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="bench.matrix --out JSONs")
    ap.add_argument("--ours", default=OURS, help="the setup compared with the peers")
    ns = ap.parse_args(argv)
    docs = []
    for f in ns.files:
        with open(f) as fh:
            docs.append(json.load(fh))
    print("\n".join(render(pool(docs, ns.ours), ns.ours)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
