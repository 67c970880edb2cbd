"""dtype `auto`: bf16 only where the CPU computes it natively."""

from pdserve.config import cpu_has_native_bf16, resolve_dtype


def test_native_bf16_from_cpu_flags():
    assert cpu_has_native_bf16("flags\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert cpu_has_native_bf16("flags\t: fpu avx2 amx_bf16 amx_tile\n")
    assert cpu_has_native_bf16("Features\t: fp asimd bf16\n")            # Arm
    assert not cpu_has_native_bf16("flags\t: fpu sse avx2 avx512f\n")    # AVX-512 w/o BF16
    assert not cpu_has_native_bf16("flags\t: fpu sse avx2\n")


def test_explicit_dtype_is_kept_and_auto_resolves():
    assert resolve_dtype("bfloat16") == "bfloat16"
    assert resolve_dtype("float16") == "float16"
    assert resolve_dtype("auto") in ("bfloat16", "float32")
