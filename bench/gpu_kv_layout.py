"""The connector's descriptor math on real KV tensors of a device: it moves the right bytes.

    python3 -m bench.gpu_kv_layout                  # on a machine with a CUDA GPU (torch)
    python3 -m bench.gpu_kv_layout --device cpu     # the same on host memory

The connector never touches a KV tensor's data: it derives every address from the
tensors' `data_ptr`, shape, strides and element size (kv_transfer/layout.py) and hands
(address, length) lists to NIXL. NIXL and vLLM's GPU build cannot be installed where
this runs, so the check plays NIXL's part with the device's own copy (`cudaMemcpy`
through torch's CUDA runtime binding, or `ctypes.memmove` on host memory), span by span,
on tensors allocated the way vLLM's GPU attention backends shape them, random bf16
data, and compares the destination with what torch indexing says it must hold:

- whole blocks between two engines, flash-attention layout `[2, blocks, block, heads,
  head]` (two regions per layer) and FlashInfer's `[blocks, 2, block, heads, head]` (one),
  block ids scattered on both sides (`regions_from_strides`, `block_runs`,
  `transfer_descriptors`);
- tokens between block sizes 16 and 32, token-major (`token_descriptors`);
- heads between tensor-parallel degrees 2 and 1 (`head_map`, `head_axis`, `head_spans`,
  `paired_spans`): each source rank's heads land in their slice of the destination's.

Every destination byte outside what was moved must still be zero. Prints one line per
case and exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import ctypes
import sys

from kv_transfer.layout import block_runs, regions_from_strides, transfer_descriptors
from kv_transfer.mapping import head_axis, head_map, head_spans, paired_spans
from kv_transfer.relayout import token_descriptors

NB, HEADS, HEAD = 64, 8, 64


def copier(device: str):
    """copy(dst_addr, src_addr, nbytes) on the device's memory, as a READ would."""
    if device == "cpu":
        return lambda dst, src, n: ctypes.memmove(dst, src, n)
    import torch
    rt = ctypes.CDLL(_cudart(torch))
    rt.cudaMemcpy.restype = ctypes.c_int
    rt.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    def copy(dst: int, src: int, n: int) -> None:
        err = rt.cudaMemcpy(dst, src, n, 3)              # cudaMemcpyDeviceToDevice
        if err:
            raise RuntimeError(f"cudaMemcpy failed: {err}")
    return copy


def _cudart(torch) -> str:
    """The CUDA runtime library the process already loaded with torch."""
    torch.zeros(1, device="cuda")
    with open("/proc/self/maps") as f:
        libs = {line.split()[-1] for line in f if "libcudart" in line}
    if not libs:
        raise RuntimeError("no libcudart mapped in this process")
    return sorted(libs)[0]


def shape_of(layout: str, block: int, heads: int) -> tuple[int, ...]:
    return ((2, NB, block, heads, HEAD) if layout == "flash_attn"
            else (NB, 2, block, heads, HEAD))


def regions(tensors) -> list:
    return [r for t in tensors
            for r in regions_from_strides(t.data_ptr(), tuple(t.shape), tuple(t.stride()),
                                          t.element_size(), NB)]


def blocks_of(t, layout: str, ids):
    """The tensor's blocks `ids`, as a tensor with the block dim first."""
    return t[:, ids].transpose(0, 1) if layout == "flash_attn" else t[ids]


def case_blocks(torch, device, copy, layout: str) -> bool:
    src = [torch.randn(shape_of(layout, 16, HEADS), dtype=torch.bfloat16, device=device)
           for _ in range(2)]
    dst = [torch.zeros_like(t) for t in src]
    src_ids, dst_ids = [5, 6, 7, 20, 63], [40, 41, 3, 9, 10]
    ldescs, rdescs = transfer_descriptors(regions(dst), regions(src),
                                          block_runs(dst_ids, src_ids))
    for (la, n, _), (ra, _, _) in zip(ldescs, rdescs):
        copy(la, ra, n)
    _sync(torch, device)
    ok = all(torch.equal(blocks_of(d, layout, dst_ids), blocks_of(s, layout, src_ids))
             for d, s in zip(dst, src))
    rest = [i for i in range(NB) if i not in dst_ids]
    ok = ok and all(not blocks_of(d, layout, rest).any() for d in dst)
    print(f"  {layout}: {len(ldescs)} spans, {sum(n for _, n, _ in ldescs)} bytes: "
          f"{'equal' if ok else 'MISMATCH'}")
    return ok


def case_tokens(torch, device, copy) -> bool:
    """40 tokens from blocks of 16 ([3, 1, 8]) into blocks of 32 ([5, 2])."""
    src = torch.randn(shape_of("flash_attn", 16, HEADS), dtype=torch.bfloat16, device=device)
    dst = torch.zeros(shape_of("flash_attn", 32, HEADS), dtype=torch.bfloat16, device=device)
    src_ids, dst_ids, n = [3, 1, 8], [5, 2], 40
    ldescs, rdescs = token_descriptors(regions([dst]), regions([src]), dst_ids, src_ids,
                                       32, 16, 0, n)
    for (la, ln, _), (ra, _, _) in zip(ldescs, rdescs):
        copy(la, ra, ln)
    _sync(torch, device)
    want = torch.cat([src[:, b] for b in src_ids], dim=1)[:, :n]       # [2, tokens, h, d]
    got = torch.cat([dst[:, b] for b in dst_ids], dim=1)[:, :n]
    moved = torch.zeros(NB, dtype=torch.bool)
    moved[dst_ids] = True
    ok = torch.equal(got, want) and not dst[:, ~moved.to(device)].any() \
        and not dst[:, dst_ids[1], n - 32:].any()
    print(f"  tokens 16 -> 32: {len(ldescs)} spans: {'equal' if ok else 'MISMATCH'}")
    return ok


def case_heads(torch, device, copy) -> bool:
    """Tensor-parallel 2 -> 1: each source rank holds half the heads of a block."""
    half = HEADS // 2
    src = [torch.randn(shape_of("flash_attn", 16, half), dtype=torch.bfloat16, device=device)
           for _ in range(2)]
    dst = torch.zeros(shape_of("flash_attn", 16, HEADS), dtype=torch.bfloat16, device=device)
    src_ids, dst_ids = [4, 9], [30, 2]
    elem = dst.element_size()
    inner_src, inner_dst = [16, half, HEAD], [16, HEADS, HEAD]
    ax_s, ax_d = head_axis(inner_src, half), head_axis(inner_dst, HEADS)
    spans = 0
    for sl in head_map(HEADS, 2, 1)[0]:
        pairs = paired_spans(head_spans(inner_src, ax_s, elem, sl.src_head, sl.count),
                             head_spans(inner_dst, ax_d, elem, sl.dst_head, sl.count))
        for rs, rd in zip(regions([src[sl.src_rank]]), regions([dst])):
            for sb, db in zip(src_ids, dst_ids):
                for so, do, n in pairs:
                    copy(rd.base_addr + db * rd.block_stride + do,
                         rs.base_addr + sb * rs.block_stride + so, n)
                    spans += 1
    _sync(torch, device)
    ok = True
    for r in range(2):
        got = dst[:, dst_ids][:, :, :, r * half:(r + 1) * half]
        ok = ok and torch.equal(got, src[r][:, src_ids])
    rest = [i for i in range(NB) if i not in dst_ids]
    ok = ok and not dst[:, rest].any()
    print(f"  heads tp 2 -> 1: {spans} spans: {'equal' if ok else 'MISMATCH'}")
    return ok


def _sync(torch, device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def run(device: str) -> bool:
    import torch
    torch.manual_seed(0)
    copy = copier(device)
    name = torch.cuda.get_device_name() if device != "cpu" else "host memory"
    print(f"== {name}, torch {torch.__version__}")
    results = [case_blocks(torch, device, copy, layout)
               for layout in ("flash_attn", "flashinfer")]
    results += [case_tokens(torch, device, copy), case_heads(torch, device, copy)]
    return all(results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ok = run(ap.parse_args().device)
    print("all equal" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
