"""bench/gpu_step_fit.py's rules on given coefficients (the timing itself needs torch and a
model, and runs as the benchmark)."""

from bench.gpu_step_fit import packs
from pdserve.latency import Coef


def test_short_prompts_share_a_step_where_its_fixed_part_dominates():
    cpu = Coef(step=0.057, prefill_ktok=0.52)       # a 2-core CPU engine
    assert [packs(cpu, n, 2048) for n in (16, 64, 256)] == [7, 2, 1]
    gpu = Coef(step=0.015, prefill_ktok=0.02)       # a step mostly its fixed part
    assert packs(gpu, 64, 8192) == 12 and packs(gpu, 1024, 8192) == 1
