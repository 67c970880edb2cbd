"""bench/gpu_step_fit.py's rules on given coefficients (the timing itself needs torch and a
model, and runs as the benchmark)."""

from bench.gpu_step_fit import decode_term_error, fitted, packs
from pdserve.latency import Coef, StepSample


def test_short_prompts_share_a_step_where_its_fixed_part_dominates():
    cpu = Coef(step=0.057, prefill_ktok=0.52)       # a 2-core CPU engine
    assert [packs(cpu, n, 2048) for n in (16, 64, 256)] == [7, 2, 1]
    gpu = Coef(step=0.015, prefill_ktok=0.02)       # a step mostly its fixed part
    assert packs(gpu, 64, 8192) == 12 and packs(gpu, 1024, 8192) == 1


def test_a_decode_steps_own_fixed_part_is_found_by_the_seventh_term():
    # prefill steps cost 20 ms + 10 ms/ktok, decode steps 60 ms + 0.5 ms a sequence: one
    # fixed part cannot fit both, the extra term can
    samples = [StepSample(0.020 + 0.010 * n / 1e3, n) for n in (16, 256, 1024, 4096)]
    samples += [StepSample(0.060 + 0.0005 * b, decode_seqs=b, decode_ctx=100 * b)
                for b in (1, 8, 32, 128)]
    text = decode_term_error(samples)
    assert text.startswith("median |error| 0.0%"), text
    assert abs(float(text.split("that term ")[1].split()[0]) - 40.0) < 0.5, text
    assert max(abs(fitted(samples).step_time(s.prefill_tokens, s.prefill_attn,
                                             s.decode_seqs, s.decode_ctx) - s.seconds)
               / s.seconds for s in samples) > 0.2
