"""bench/gpu_kv_layout.py on host memory: the connector's spans, copied byte by byte,
give the destination what torch indexing says (the same check runs on a CUDA device)."""

import pytest

from bench import gpu_kv_layout as G


def test_descriptor_spans_move_the_right_bytes_on_host_memory(capsys):
    assert G.run("cpu")
    out = capsys.readouterr().out
    assert out.count("equal") == 4 and "MISMATCH" not in out, out


def test_a_wrong_span_is_caught(monkeypatch):
    """The check can fail: a copier that drops the last byte of every span."""
    real = G.copier("cpu")
    monkeypatch.setattr(G, "copier", lambda device: lambda d, s, n: real(d, s, n - 1))
    assert not G.run("cpu")


@pytest.mark.parametrize("layout", ["flash_attn", "flashinfer"])
def test_vllm_gpu_layouts_give_their_regions(layout):
    import torch
    t = torch.zeros(G.shape_of(layout, 16, G.HEADS), dtype=torch.bfloat16)
    regs = G.regions([t])
    assert len(regs) == (2 if layout == "flash_attn" else 1)
    assert all(r.block_bytes == r.block_stride for r in regs)
