"""Matrix runs taken together (bench/pool.py). Pure."""

import pytest

from bench import pool as P


def req(i, ttft, tpot=0.05, n=8, ok=True):
    return {"index": i, "ok": ok, "ttft": ttft, "tpot": tpot, "output_tokens": n}


def run(rate, reqs):
    return {"summary": {"rate": rate}, "requests": reqs}


def doc(ttft_ms, setups, mix="prefill"):
    return {"calibration": {mix: {"ttft_ms": ttft_ms, "tpot_ms": 60.0}},
            "results": {mix: setups}}


def test_pairs_stay_within_a_run_and_each_run_keeps_its_slo():
    # run 1 (TTFT SLO 1 s): ours makes request 0, the peer request 1
    a = doc(1000, {"pdserve": [run(1.0, [req(0, 0.5), req(1, 1.5)])],
                   "vllm-2x": [run(1.0, [req(0, 1.5), req(1, 0.5)])]})
    # run 2 (TTFT SLO 2 s): the same TTFTs; under its SLO both make everything but
    # request 0 of the peer's, which is slow there; the same rate and index as run 1's
    b = doc(2000, {"pdserve": [run(1.0, [req(0, 0.5), req(1, 1.5)])],
                   "vllm-2x": [run(1.0, [req(0, 2.5), req(1, 1.5)])]})
    p = P.pool([a, b])["prefill"]
    assert p.runs == 2 and p.slos == {(1000, 60.0), (2000, 60.0)}
    assert p.good == {"pdserve": 3, "vllm-2x": 2} and p.served["pdserve"] == 4
    assert p.sign("vllm-2x")[:2] == (2, 1)
    assert (p.cells, p.cells_met) == (2, 2)      # 1 against 1, then 2 against 1


def test_a_cell_counts_against_the_best_peer_and_tpot_counts_too():
    d = doc(1000, {"pdserve": [run(1.0, [req(0, 0.5), req(1, 0.5, tpot=0.09)]),
                               run(2.0, [req(0, 0.5)])],
                   "vllm-2x": [run(1.0, [req(0, 0.5), req(1, 0.5)]),
                               run(2.0, [req(0, 1.5)])],
                   "vllm-1": [run(1.0, [req(0, 0.5), req(1, 2.0)])]})
    p = P.pool([d])["prefill"]
    # rate 1: ours 1 (request 1 missed TPOT), vllm-2x 2: missed; rate 2: 1 against 0
    assert (p.cells, p.cells_met) == (2, 1)
    assert p.sign("vllm-2x")[:2] == (1, 1) and p.sign("vllm-1")[:2] == (0, 0)
    assert p.sign("vllm-1")[2] == pytest.approx(1.0)


def test_variants_are_not_peers_and_runs_without_ours_are_skipped():
    d = doc(1000, {"pdserve": [run(1.0, [req(0, 0.5)])],
                   "pdserve-x": [run(1.0, [req(0, 1.5)])]})
    p = P.pool([d, doc(1000, {"vllm-2x": [run(1.0, [req(0, 0.5)])]})])["prefill"]
    assert p.runs == 1 and p.pairs == {} and p.cells == 0
    assert p.good == {"pdserve": 1, "pdserve-x": 0}
    assert any("0 of 0" in line for line in P.render({"prefill": p}))


def test_render_names_every_peer_with_its_p():
    d = doc(1000, {"pdserve": [run(1.0, [req(i, 0.5) for i in range(8)])],
                   "vllm-2x": [run(1.0, [req(i, 1.5) for i in range(8)])]})
    lines = P.render(P.pool([d]))
    assert lines[0].startswith("=== prefill: 1 run(s)")
    assert "8 only with pdserve, 0 only with vllm-2x (sign test p = 0.008)" in lines[-1]
