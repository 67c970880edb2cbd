"""bench/step_trace.py: steps by kind from a step trace, and the step model's error per
kind (a synthetic engine whose mixed steps pay a fixed part of their own)."""

import json

from bench.step_trace import client_gaps, gap_cause, main, read, report, step_spans


def test_a_fixed_part_of_mixed_steps_shows_as_the_models_error(tmp_path):
    lines = []
    for i in range(60):
        seqs = 1 + i % 3
        lines.append(f"{0.070 + 0.010 * seqs:.6f} 0 0 {seqs} {300 * seqs} 0.09 0 {i}.0 0")
        lines.append(f"{0.050 + 0.004 * (256 + i):.6f} {256 + i} {(256 + i) ** 2 / 2:.0f} 0 0 "
                     f"inf 0 {i}.5 0")
        # a mixed step: decode + 3 prompt tokens + 25 ms the linear model cannot place
        lines.append(f"{0.070 + 0.010 * seqs + 0.012 + 0.025:.6f} 3 5 {seqs} {300 * seqs} "
                     f"-0.1 3 {i}.7 0")
    path = tmp_path / "trace-1.txt"
    path.write_text("\n".join(lines) + "\n")
    steps = read(str(path))
    assert len(steps) == 180
    r = report(steps)
    assert {k: v["n"] for k, v in r.items()} == {"decode": 60, "mixed": 60, "prefill": 60}
    assert r["mixed"]["by_seqs"][1] - r["decode"]["by_seqs"][1] > 30     # ms
    # the step model has a term for a mixed step's own part: every kind is predicted
    assert all(abs(v["err_p50"]) < 0.02 for v in r.values()), r


def test_client_gaps_are_put_down_to_what_took_them(tmp_path, capsys):
    """A gap held by a step with a prompt beside the streams, one by a plain decode step
    that ran long, one by the client's own stalled loop, one with the engine stepping as
    usual (the tokens held on the way), and gaps shorter than the bound left out; the
    command reads a bench JSON's token times and client stalls."""
    import json

    trace = tmp_path / "trace-1.txt"
    # seconds, prompt tokens, attention, decode seqs, context, allow, tokens, end, held, late
    rows = [(0.05, 0, 2, 10.00), (0.30, 454, 2, 10.30),       # a prompt beside 2 streams
            (0.05, 0, 2, 10.35), (0.20, 0, 2, 10.55),         # a slow decode step
            (0.05, 0, 2, 10.60), (0.05, 0, 2, 10.65), (0.05, 0, 2, 10.70),
            (0.05, 0, 2, 10.75), (0.05, 0, 2, 10.80), (0.05, 0, 2, 10.85),
            (0.40, 512, 0, 10.80)]                            # a prefill engine's: no streams
    trace.write_text("".join(f"{sec} {p} 0 {d} 500 0.01 0 {end} 0 0\n"
                             for sec, p, d, end in rows))
    steps = step_spans(str(trace))
    assert steps[1] == (10.0, 10.3, 454, 2)
    times = [[10.0, 10.3, 10.35, 10.55, 10.6],       # 300 ms (prompt), 200 ms (decode)
             [10.6, 10.75, 10.8],                    # 150 ms: the client stalled 120 of it
             [10.6, 10.62, 10.85]]                   # 230 ms: the engine stepped as usual
    gaps = client_gaps(times, 0.1)
    assert gaps == [(10.0, 10.3), (10.35, 10.55), (10.6, 10.75), (10.62, 10.85)]
    stalls = [(10.61, 0.12)]
    assert [gap_cause(g, steps, stalls) for g in gaps] == [
        ("prompt step", 454), ("decode step", 0), ("client", 0), ("between", 0)]
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"results": {"pdserve": [{"requests": [
        {"token_times": t} for t in times], "client_stalls": stalls}]}}))
    main([str(trace), "--gaps", str(out)])
    assert ("4 client gaps over 100 ms, by what took most of each: prompt step 1 "
            "(prompt tokens p50 454), decode step 1, client 1, between 1"
            in capsys.readouterr().out)


def test_token_times_are_read_from_compare_and_matrix_results(tmp_path):
    from bench.step_trace import results_token_times
    run = {"requests": [{"token_times": [1.0, 1.2]}, {"token_times": None}],
           "client_stalls": [[1.1, 0.06]]}
    compare = tmp_path / "c.json"
    compare.write_text(json.dumps({"results": {"pdserve": [run], "vllm-2x": [run]}}))
    matrix = tmp_path / "m.json"
    matrix.write_text(json.dumps({"results": {"prefill": {"pdserve": [run]},
                                              "shift": {"pdserve": [run, run]}}}))
    times, stalls = results_token_times(str(compare))
    assert times == [[1.0, 1.2], [], [1.0, 1.2], []] and stalls == [(1.1, 0.06)] * 2
    times, stalls = results_token_times(str(matrix))
    assert len(times) == 6 and times[4] == [1.0, 1.2] and len(stalls) == 3
