"""bench.misses: one cell's requests, the misses picked against hand-computed SLOs."""

import pytest

from bench import misses as M


def req(i, sent, ttft, tpot, prompt=128, out=16, ok=True, pred=None, route="", error=""):
    t0 = sent + ttft
    return {"index": i, "ok": ok, "prompt_tokens": prompt, "output_tokens": out,
            "ttft": ttft, "tpot": tpot, "error": error, "route_text": route,
            "pred_ttft": pred[0] if pred else None, "pred_tpot": pred[1] if pred else None,
            "token_times": [t0 + k * tpot for k in range(out)] if ok else []}


def run(rate, requests):
    return {"summary": {"rate": rate}, "requests": requests}


CELL = [
    req(0, 10.0, 0.30, 0.040),                              # within both
    req(1, 10.5, 2.50, 0.040, prompt=1024, pred=(1.8, 0.041), route="disagg:slo"),  # T
    req(2, 11.0, 0.25, 0.060, pred=(0.2, 0.045), route="local:slo"),                # P
    req(3, 11.2, 1.90, 0.045, prompt=1024),                 # long, within both
    req(4, 11.4, 0.0, 0.0, ok=False, error="HTTP 429: overloaded"),
    req(5, 11.6, 0.40, 0.500, out=1),                       # one token: TPOT does not count
]


def test_only_the_misses_by_default_in_send_order_from_the_first_send():
    got = M.rows([run(0.5, CELL), run(1.0, [])], "0.5", 2.0, 0.050)
    assert [r["index"] for r in got] == [1, 2, 4]
    t, p, f = got
    assert t["missed"] == "T-" and p["missed"] == "-P" and f["missed"] == "failed"
    assert t["sent_s"] == pytest.approx(0.5) and p["sent_s"] == pytest.approx(1.0)
    assert t["ttft_ms"] == pytest.approx(2500) and t["pred_ttft_ms"] == pytest.approx(1800)
    assert p["tpot_ms"] == pytest.approx(60) and p["pred_tpot_ms"] == pytest.approx(45)
    assert f["error"].startswith("HTTP 429")
    assert "T- sent" in M.line(t) and "(  1800)" in M.line(t) and "failed HTTP 429" in M.line(f)


def test_long_prompts_and_every_request_on_demand():
    assert [r["index"] for r in M.rows([run(0.5, CELL)], "0.5", 2.0, 0.05, long_tokens=1000)
            ] == [1, 2, 3, 4]
    every = M.rows([run(0.5, CELL)], "0.5", 2.0, 0.05, every=True)
    assert [r["index"] for r in every] == [0, 1, 2, 3, 4, 5]
    assert every[5]["missed"] == "--"                      # a 500 ms "TPOT" over one token
    assert every[0]["pred_ttft_ms"] != every[0]["pred_ttft_ms"]   # no prediction: NaN


def test_rates_match_as_the_summaries_name_them():
    runs = [run(0.8275, CELL[:2]), run("inf", CELL[2:3])]
    assert [r["index"] for r in M.rows(runs, "0.8275", 2.0, 0.05)] == [1]
    assert [r["index"] for r in M.rows(runs, "inf", 2.0, 0.05)] == [2]
    with pytest.raises(KeyError, match="no run at rate 2.4 .*0.8275, inf"):
        M.rows(runs, "2.4", 2.0, 0.05)


def test_a_matrix_file_gives_its_mix_and_slos_a_compare_file_neither():
    runs = [run(0.5, CELL)]
    matrix = {"results": {"long-mix": {"pdserve": runs}},
              "calibration": {"long-mix": {"ttft_ms": 2085.0, "tpot_ms": 53.4}}}
    got, slos = M.runs_of(matrix, "pdserve", "long-mix")
    assert got == runs and slos == pytest.approx((2.085, 0.0534))
    with pytest.raises(KeyError, match="name one of its mixes with --mix"):
        M.runs_of(matrix, "pdserve", None)
    with pytest.raises(KeyError, match="no mix 'shift'"):
        M.runs_of(matrix, "pdserve", "shift")
    compare = {"results": {"pdserve": runs, "vllm-2x": []}}
    assert M.runs_of(compare, "pdserve", None) == (runs, None)
    with pytest.raises(KeyError, match="no setup 'x' here"):
        M.runs_of(compare, "x", None)


def test_main_prints_the_cell_and_refuses_a_file_without_slos(tmp_path, capsys):
    import json
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"results": {"pdserve": [run(0.5, CELL)]}}))
    with pytest.raises(SystemExit, match="no SLOs"):
        M.main([str(f), "--rate", "0.5"])
    M.main([str(f), "--rate", "0.5", "--slo-ttft-ms", "2000", "--slo-tpot-ms", "50"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("SLOs: TTFT 2000 ms, TPOT 50.0 ms")
    assert [ln.split()[0] for ln in out[1:]] == ["1", "2", "4"]


def test_a_matrix_cell_by_its_multiplier_and_a_rate_that_is_no_number():
    """--rate 1.2x in a bench.matrix file: the mix's calibrated rate that many times its
    serial capacity (1 / its unloaded e2e); anything else is refused with what the run
    has, never a traceback."""
    data = {"argv": ["--setups", "vllm-2x,pdserve", "--rate-mult", "1.2,1.8,2.4"],
            "calibration": {"long-mix": {"rates": [1.4383, 2.1574, 2.8766],
                                         "unloaded_e2e_s": 0.83432}}}
    assert M.rate_of(data, "long-mix", "1.8x") == "2.1574"
    assert M.rate_of(data, "long-mix", "2.1574") == "2.1574"       # a rate as it is
    with pytest.raises(KeyError, match="no run at 3.0x .*1.2x, 1.8x, 2.4x"):
        M.rate_of(data, "long-mix", "3.0x")
    with pytest.raises(KeyError, match="needs a bench.matrix file and its --mix"):
        M.rate_of(data, None, "1.2x")
    # the calibration says it, whatever the command line (the default, argparse's forms)
    default = {"argv": [], "calibration": {"m": {"rates": [0.5, 1.0, 1.5],
                                                 "unloaded_e2e_s": 1.2}}}
    assert M.rate_of(default, "m", "1.2x") == "1.0"
    joined = {**data, "argv": ["--rate-mult=1.2,1.8,2.4"]}
    assert M.rate_of(joined, "long-mix", "2.4x") == "2.8766"
    with pytest.raises(KeyError, match="no run at fastx"):
        M.rate_of(data, "long-mix", "fastx")
    runs = [run(1.4383, CELL[:2])]
    assert [r["index"] for r in M.rows(runs, M.rate_of(data, "long-mix", "1.2x"), 2.0,
                                       0.05)] == [1]
    with pytest.raises(KeyError, match="no run at rate fast"):
        M.rows(runs, "fast", 2.0, 0.05)


def test_main_takes_a_multiplier_for_a_matrix_file(tmp_path, capsys):
    import json
    f = tmp_path / "m.json"
    f.write_text(json.dumps({
        "argv": ["--rate-mult", "1.2,1.8"],
        "calibration": {"long-mix": {"ttft_ms": 2000.0, "tpot_ms": 50.0, "rates": [0.5, 0.75],
                                     "unloaded_e2e_s": 2.4}},
        "results": {"long-mix": {"pdserve": [run(0.5, CELL), run(0.75, [])]}}}))
    M.main([str(f), "--mix", "long-mix", "--rate", "1.2x"])
    out = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in out[1:]] == ["1", "2", "4"]
    with pytest.raises(SystemExit, match="no run at 2.4x"):
        M.main([str(f), "--mix", "long-mix", "--rate", "2.4x"])
