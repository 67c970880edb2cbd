"""NIXL (UCX) READ (pull) or WRITE (push) between two processes on this host, against an
in-process copy.

    .venv/bin/python -m bench.bench_nixl_read                      # siblings, pinned 0/1
    .venv/bin/python -m bench.bench_nixl_read --op WRITE           # push instead of pull
    .venv/bin/python -m bench.bench_nixl_read --unpinned
    .venv/bin/python -m bench.bench_nixl_read --ucx-err-mode peer  # RMA over TCP AM
    .venv/bin/python -m bench.bench_nixl_read --progress-delay-us 0 # target never progresses

Each READ moves --mib MiB in 30 descriptors (one per "layer") from fresh offsets of a
--reg-mib MiB registered region, like KV blocks of successive requests.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

import numpy as np


def _lock(buf, on: bool) -> None:
    if on:
        from kv_transfer.backends.nixl import lock_memory
        lock_memory([(buf.ctypes.data, buf.nbytes)])


def _alloc(n: int, fill: int, thp: bool) -> np.ndarray:
    """n bytes filled with `fill`. numpy asks for transparent huge pages for large arrays
    itself; thp=False advises against them before the first touch (4 KiB pages, as a
    torch-allocated KV cache gets unless pdserve advises huge pages)."""
    import ctypes
    import mmap
    buf = np.empty(n, dtype=np.uint8)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    start = buf.ctypes.data & ~(mmap.PAGESIZE - 1)
    libc.madvise(start, buf.ctypes.data + n - start,
                 getattr(mmap, "MADV_HUGEPAGE" if thp else "MADV_NOHUGEPAGE"))
    buf.fill(fill)
    return buf


def _target(q, done, core, reg, delay, mlock, err_mode="auto", thp=True):
    if core >= 0:
        os.sched_setaffinity(0, {core})
    from kv_transfer.backends.nixl import NixlBackend
    buf = _alloc(reg, 1, thp)
    _lock(buf, mlock)
    b = NixlBackend("bench-target", progress_delay_us=delay, err_mode=err_mode)
    b.register([(buf.ctypes.data, reg)])
    q.put((b.metadata, buf.ctypes.data))
    c0 = time.process_time()
    done.get()
    # CPU seconds of this process (all threads: UCX progress included) while the
    # initiator transferred: which side's cores pay for the copy
    done.put(("target_cpu", time.process_time() - c0))


def _initiator(q, done, out, core, reg, n, reads, timeout, mlock, op="READ", err_mode="auto",
               thp=True, descs="merged", block_kib=96):
    if core >= 0:
        os.sched_setaffinity(0, {core})
    from kv_transfer.backends.nixl import NixlBackend, NixlError
    md, raddr = q.get()
    dst = _alloc(reg, 0 if op == "READ" else 1, thp)
    _lock(dst, mlock)
    b = NixlBackend("bench-initiator", err_mode=err_mode)
    b.register([(dst.ctypes.data, reg)])
    name = b.ensure_remote("bench-target", md)
    blk = block_kib << 10
    per_layer = n // 30 // blk           # whole blocks per "layer"
    chunk = per_layer * blk
    nblk = reg // blk
    if descs == "prepped":               # every block of the region, prepared once
        t0 = time.perf_counter()
        lh = b.prep_dlist([(dst.ctypes.data + k * blk, blk, 0) for k in range(nblk)])
        rh = b.prep_dlist([(raddr + k * blk, blk, 0) for k in range(nblk)], name)
        once = time.perf_counter() - t0
    times, preps = [], []
    c0 = time.process_time()
    try:
        for i in range(reads):
            off = (i * 2 * n) % (reg - n) // blk * blk
            t0 = time.perf_counter()
            if descs == "prepped":
                idx = np.array([off // blk + k * per_layer + j for k in range(30)
                                for j in range(per_layer)], dtype=np.int32)
                preps.append(b.xfer_prepped(op, name, lh, idx, rh, idx, timeout))
            else:
                step = blk if descs == "blocks" else chunk
                spans = [off + k * chunk + j for k in range(30) for j in range(0, chunk, step)]
                preps.append(b.xfer(op, name, [(dst.ctypes.data + o, step, 0) for o in spans],
                                    [(raddr + o, step, 0) for o in spans], timeout))
            times.append(time.perf_counter() - t0)
        cpu = time.process_time() - c0
        ok = bool(dst[off:off + 30 * chunk].min() == 1)   # WRITE: the source, unchanged
        if descs == "prepped":
            preps.append(once)
        out.put(("ok", times, ok, cpu, preps))
    except NixlError as e:
        out.put(("error", str(e), False, 0.0, []))
    done.put(1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", choices=["READ", "WRITE"], default="READ")
    ap.add_argument("--mib", type=int, default=24)
    ap.add_argument("--reg-mib", type=int, default=1024)
    ap.add_argument("--reads", type=int, default=10)
    ap.add_argument("--unpinned", action="store_true")
    ap.add_argument("--progress-delay-us", type=int, default=1000)
    ap.add_argument("--timeout-s", type=float, default=10.0)
    ap.add_argument("--ucx-err-mode", choices=["auto", "peer", "none"], default="auto",
                    help="UCX endpoint error handling (auto: none for host memory; peer "
                         "leaves RMA emulated over TCP active messages on one host)")
    ap.add_argument("--no-thp", action="store_true",
                    help="4 KiB pages on both sides (as a KV cache without huge pages)")
    ap.add_argument("--descs", choices=["merged", "blocks", "prepped"], default="merged",
                    help="merged: one descriptor per layer, built per transfer; blocks: one "
                         "per KV block, built per transfer; prepped: one per block of the "
                         "whole region, prepared once (prep_xfer_dlist), picked by index")
    ap.add_argument("--block-kib", type=int, default=96,
                    help="KV block size per layer (SmolLM2: 96 KiB)")
    ap.add_argument("--no-mlock", action="store_true",
                    help="leave the registered memory pageable (as before the fix)")
    ns = ap.parse_args(argv)
    n, reg = ns.mib << 20, ns.reg_mib << 20
    cores = (-1, -1) if ns.unpinned else (0, 1)
    ctx = mp.get_context("spawn")
    q, done, out = ctx.Queue(), ctx.Queue(), ctx.Queue()
    t = ctx.Process(target=_target, args=(q, done, cores[0], reg, ns.progress_delay_us,
                                          not ns.no_mlock, ns.ucx_err_mode, not ns.no_thp))
    i = ctx.Process(target=_initiator,
                    args=(q, done, out, cores[1], reg, n, ns.reads, ns.timeout_s,
                          not ns.no_mlock, ns.op, ns.ucx_err_mode, not ns.no_thp, ns.descs,
                          ns.block_kib))
    t.start()
    i.start()
    status, times, ok, icpu, preps = out.get()
    i.join()
    _, tcpu = done.get(timeout=30)
    t.join()
    a, b = np.ones(n, np.uint8), np.zeros(n, np.uint8)
    copies = []
    for _ in range(7):
        t0 = time.perf_counter()
        np.copyto(b, a)
        copies.append(time.perf_counter() - t0)
    memcpy = n / min(copies) / 1e9
    label = (f"siblings {'unpinned' if ns.unpinned else 'pinned 0/1'}, "
             f"{'pageable' if ns.no_mlock else 'mlocked'} {ns.reg_mib} MiB "
             f"{'4 KiB pages' if ns.no_thp else 'huge pages'}, "
             f"progress delay {ns.progress_delay_us} us, UCX error handling "
             f"{ns.ucx_err_mode}, {ns.mib} MiB/{ns.op}, descriptors {ns.descs}")
    if status != "ok":
        print(f"{label}: READ failed: {times}; in-process memcpy {memcpy:.1f} GB/s")
        return 1
    med = statistics.median(times[1:])  # the first READ includes connection wire-up
    print(f"{label}: {ns.op} median {med * 1e3:.2f} ms = {n / med / 1e9:.2f} GB/s "
          f"(first {times[0] * 1e3:.1f} ms); in-process memcpy {memcpy:.1f} GB/s; "
          f"ratio {n / med / 1e9 / memcpy:.2f}; data ok={ok}; CPU s over {ns.reads} "
          f"transfers ({sum(times):.3f} s): initiator {icpu:.3f}, target {tcpu:.3f}; "
          f"preparation per transfer median {statistics.median(preps[1:ns.reads]) * 1e3:.3f} ms"
          + (f", lists prepared once in {preps[-1] * 1e3:.1f} ms" if ns.descs == "prepped"
             else ""))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
