"""bench/step_trace.py: steps by kind from a step trace, and the step model's error per
kind (a synthetic engine whose mixed steps pay a fixed part of their own)."""

from bench.step_trace import client_gaps, main, read, report, step_ends, steps_in_gaps


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


def test_client_gaps_are_set_against_the_steps_ended_inside_them(tmp_path, capsys):
    """A stream's gap with two steps ended inside it (the engine computed, the tokens did
    not arrive), one with a single step at its very edge (not inside), none shorter than
    the bound; the command reads a bench JSON's token times."""
    import json

    trace = tmp_path / "trace-1.txt"
    trace.write_text("".join(f"0.050 0 0 1 500 0.01 0 {end} 0 0\n"
                             for end in (10.00, 10.05, 10.10, 10.15, 10.60, 11.00)))
    ends = step_ends(str(trace))
    assert ends == [10.0, 10.05, 10.1, 10.15, 10.6, 11.0]
    times = [[9.98, 10.02, 10.17, 10.2], [10.3, 10.6, 10.61]]
    gaps = client_gaps(times, 0.1)
    assert gaps == [(10.02, 10.17), (10.3, 10.6)]         # 60 ms and 10 ms gaps left out
    assert steps_in_gaps(gaps, ends) == [3, 0]            # 10.05, 10.10, 10.15; 10.6 is the edge
    out = tmp_path / "r.json"
    out.write_text(json.dumps({"results": {"pdserve": [{"requests": [
        {"token_times": t} for t in times]}]}}))
    main([str(trace), "--gaps", str(out)])
    assert "2 client gaps over 100 ms; steps this engine ended inside one: none 1, one 0, " \
           "two or more 1" in capsys.readouterr().out
