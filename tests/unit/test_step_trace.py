"""bench/step_trace.py: steps by kind from a step trace, and the step model's error per
kind (a synthetic engine whose mixed steps pay a fixed part of their own)."""

from bench.step_trace import read, report


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
