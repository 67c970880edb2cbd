"""The UCX data plane through NIXL. The only module that imports nixl.

UCX needs the target of a READ to make progress (measured here: a 24 MiB READ never
completes while the target process is busy without progressing). The producer
therefore runs NIXL's C++ progress thread. That thread arms UCX's event fd and waits
in poll() for it, with `progress_delay_us` as the poll's timeout: it wakes on UCX's
events, and the timeout only bounds a wait without one. NIXL's Python wrapper sets 0
(a thread spinning on a whole core); 1 ms woke it about 1,000 times a second (1.7% of
an idle engine's core); 100 ms, the default, moves READs exactly as fast. The consumer
drives its own READs.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Sequence

log = logging.getLogger("vllm.pdserve." + __name__)


def _import_nixl():
    try:
        import nixl._api as api
    except ImportError:  # only the cu12 wheel installed
        import nixl_cu12._api as api
    return api


UCX_ERR_MODES = ("peer", "none")


def resolve_err_mode(mode: str, mem_type: str) -> str:
    """UCX endpoint error handling for the agent. `peer` (UCX's failure detection: keepalive,
    requests fail when the peer dies) admits only transports that can detect a dead peer,
    which on one CPU host leaves RMA emulated over TCP active messages. `none` admits
    shared memory RMA (sysv/posix/cma): measured 1.5x the READ bandwidth at half the
    target's CPU (docs/benchmarks.md). A dead peer is still reported by NIXL
    (NIXL_ERR_REMOTE_DISCONNECT, measured), and our own timeouts and leases bound every
    wait. auto: `none` for KV in host memory, `peer` for GPU memory (cuda_ipc and
    InfiniBand detect peer failure themselves, and UCX's keepalive guards remote hosts)."""
    if mode == "auto":
        return "none" if mem_type == "DRAM" else "peer"
    if mode not in UCX_ERR_MODES:
        raise ValueError(f"UCX error handling mode must be auto, peer or none, not {mode!r}")
    return mode


def _make_agent(api, name: str, progress_delay_us: int, err_mode: str = "peer"):
    """nixl_agent with a UCX progress thread that waits at most `progress_delay_us` for
    an event between progress calls,
    and a UCX backend with the given endpoint error handling mode.

    The Python wrapper hard-codes pthrDelay=0 (a thread spinning at 90-100% of a core);
    the binding accepts a delay, so we set it on the config the wrapper builds. The
    wrapper's config has no backend parameters, so the UCX backend is created after.
    """
    cfg = api.nixl_agent_config(enable_prog_thread=progress_delay_us > 0, backends=[],
                                sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
    bind = api.nixlBind
    orig = bind.nixlAgent

    def with_delay(agent_name, agent_config):
        agent_config.pthrDelay = progress_delay_us
        return orig(agent_name, agent_config)

    bind.nixlAgent = with_delay
    try:
        agent = api.nixl_agent(name, cfg)
    finally:
        bind.nixlAgent = orig
    agent.create_backend("UCX", {"ucx_error_handling_mode": err_mode})
    return agent


def lock_memory(spans: Sequence[tuple[int, int]]) -> bool:
    """mlock registered memory: resident, never faulted or reclaimed during a transfer.

    Measured with bench/bench_nixl_read.py (two sibling processes pinned to cores 0 and 1,
    24 MiB READs from fresh offsets of a 1 GiB region): pageable 0.4-4.4 GB/s, varying run to
    run; mlocked 8.4-12.5 GB/s. RDMA registration pins pages anyway; on CPU we must ask.
    Needs RLIMIT_MEMLOCK (or CAP_IPC_LOCK); without it we warn and go on.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    ok = True
    for addr, length in spans:
        if libc.mlock(addr, length) != 0:
            err = ctypes.get_errno()
            log.warning("mlock of %.0f MiB failed (%s); KV transfers may page-fault. Raise "
                        "RLIMIT_MEMLOCK (systemd: LimitMEMLOCK=infinity)", length / 2**20,
                        os.strerror(err))
            ok = False
    return ok


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25


def huge_page_ranges(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The 2 MiB-aligned interiors of `spans` (only those can be huge pages). Pure."""
    out = []
    for addr, length in spans:
        start = -(-addr // HUGE_PAGE) * HUGE_PAGE
        end = (addr + length) // HUGE_PAGE * HUGE_PAGE
        if end > start:
            out.append((start, end - start))
    return out


def advise_huge_pages(spans: Sequence[tuple[int, int]]) -> int:
    """Back registered host memory with transparent huge pages; returns the bytes advised.

    vLLM allocates the KV cache through torch (4 KiB pages: THP is `madvise`-only on
    most distributions, this host included). Every shared-memory copy between processes
    (CMA: the kernel pins and walks the other process's pages) costs per page: measured
    with bench/bench_nixl_read.py, 45 MiB READs ran at 6.7-6.9 GB/s on 4 KiB pages and
    8.4-8.8 GB/s on huge pages. MADV_HUGEPAGE makes later faults huge; MADV_COLLAPSE
    (Linux >= 6.1) rebuilds the pages already there in place, contents kept. Best effort:
    an older kernel, or THP set to `never`, leaves 4 KiB pages and a log line.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done = 0
    for addr, length in huge_page_ranges(spans):
        if libc.madvise(addr, length, MADV_HUGEPAGE) != 0:
            log.info("MADV_HUGEPAGE on %.0f MiB of KV failed (%s): 4 KiB pages",
                     length / 2**20, os.strerror(ctypes.get_errno()))
            continue
        if libc.madvise(addr, length, MADV_COLLAPSE) != 0:
            log.info("MADV_COLLAPSE on %.0f MiB of KV failed (%s): pages already present "
                     "stay 4 KiB", length / 2**20, os.strerror(ctypes.get_errno()))
        done += length
    return done


class NixlError(RuntimeError):
    pass


def enable_endpoint_log(directory: str) -> str | None:
    """Ask UCX to log endpoint configurations (INFO) into a file of ours, so we can tell
    which transports a peer connection really uses (kv_transfer/transport.py). Must run
    before UCX initialises in this process. Respects an operator's own UCX_LOG_FILE or a
    quieter UCX_LOG_LEVEL (then the transport is reported as unknown)."""
    if os.environ.get("UCX_LOG_FILE"):
        path = os.environ["UCX_LOG_FILE"].replace("%p", str(os.getpid()))
        return path if os.environ.get("UCX_LOG_LEVEL", "").lower() in ("info", "debug",
                                                                        "trace") else None
    if os.environ.get("UCX_LOG_LEVEL", "info").lower() not in ("info", "debug", "trace"):
        return None
    path = os.path.join(directory, f"ucx-{os.getpid()}.log")
    os.environ.setdefault("UCX_LOG_LEVEL", "info")
    os.environ["UCX_LOG_FILE"] = path
    return path


class NixlBackend:
    def __init__(self, name: str, mem_type: str = "DRAM", progress_delay_us: int = 0,
                 log_dir: str | None = None, err_mode: str = "auto") -> None:
        # UCX picks transports itself (shm/cma on one host, rc/dc over IB, cuda_ipc
        # for NVLink); UCX_TLS and friends override. See docs/deployment.md.
        self.name = name
        self.mem_type = mem_type
        self.ucx_log = enable_endpoint_log(log_dir) if log_dir else None
        self.err_mode = resolve_err_mode(err_mode, mem_type)
        self.agent = _make_agent(_import_nixl(), name, progress_delay_us, self.err_mode)
        self._reg = None
        self._remotes: dict[str, str] = {}  # engine id -> remote agent name
        self._metadata: bytes | None = None
        self._notif_buf: list[str] = []
        # per-block descriptor lists prepared once (ours; each peer's): transfers pick
        # blocks by index, and NIXL merges descriptors adjacent on both sides
        self._local_blocks = None
        self._remote_blocks: dict[str, Any] = {}

    def register(self, spans: Sequence[tuple[int, int]], device_id: int = 0) -> None:
        self._reg = self.agent.register_memory(
            [(addr, length, device_id, "") for addr, length in spans], self.mem_type)
        self._metadata = self.agent.get_agent_metadata()
        log.info("NIXL agent %s registered %d span(s), %.1f MiB, UCX_TLS=%s, UCX error "
                 "handling %s", self.name, len(spans), sum(n for _, n in spans) / 2**20,
                 os.environ.get("UCX_TLS", "auto"), self.err_mode)

    def register_extra(self, spans: Sequence[tuple[int, int]], device_id: int = 0):
        """Register more local memory a transfer may land in (not advertised to peers: a
        READ's destination needs no remote access); returns the handle to deregister."""
        return self.agent.register_memory(
            [(addr, length, device_id, "") for addr, length in spans], self.mem_type)

    def deregister_extra(self, handle) -> None:
        try:
            self.agent.deregister_memory(handle)
        except Exception as e:  # noqa: BLE001
            log.warning("NIXL: deregister_memory failed: %s", e)

    @property
    def metadata(self) -> bytes:
        if self._metadata is None:
            raise NixlError("memory not registered yet")
        return self._metadata

    def ensure_remote(self, engine_id: str, metadata: bytes) -> str:
        name = self._remotes.get(engine_id)
        if name is None:
            name = self.agent.add_remote_agent(metadata)
            if isinstance(name, bytes):
                name = name.decode()
            self._remotes[engine_id] = name
            log.info("NIXL: added remote agent %s for engine %s", name, engine_id)
        return name

    def prep_blocks(self, descs, engine_id: str | None = None) -> None:
        """Prepare the per-block descriptor list (`layout.block_descs`) of our registered
        KV (`engine_id` None) or of a peer's, once; `post_blocks` picks from them."""
        if engine_id is None:
            self._local_blocks = self.prep_dlist(descs)
        else:
            self._remote_blocks[engine_id] = self.prep_dlist(descs, self._remotes[engine_id])

    def post_blocks(self, op: str, engine_id: str, local_idx, remote_idx):
        """`post` of blocks picked by index from the prepared lists (`layout.block_indices`)."""
        if self._local_blocks is None or engine_id not in self._remote_blocks:
            raise NixlError(f"no prepared block lists for engine {engine_id}")
        return self.post_prepped(op, self._remotes[engine_id], self._local_blocks, local_idx,
                                 self._remote_blocks[engine_id], remote_idx)

    def xfer_blocks(self, op: str, engine_id: str, local_idx, remote_idx,
                    timeout_s: float) -> float:
        return self._finish(*self.post_blocks(op, engine_id, local_idx, remote_idx),
                            timeout_s, f"{op} with engine {engine_id}")

    def forget_remote(self, engine_id: str) -> None:
        dl = self._remote_blocks.pop(engine_id, None)
        if dl is not None:
            self.release_dlist(dl)
        name = self._remotes.pop(engine_id, None)
        if name is not None:
            try:
                self.agent.remove_remote_agent(name)
            except Exception as e:  # noqa: BLE001 - best effort on a dead peer
                log.warning("NIXL: remove_remote_agent(%s) failed: %s", name, e)

    def has_remote(self, engine_id: str) -> bool:
        return engine_id in self._remotes

    def read(self, remote_agent: str, local: Sequence[tuple[int, int, int]],
             remote: Sequence[tuple[int, int, int]], timeout_s: float) -> float:
        """One-sided READ of `remote` spans into `local` spans; blocks until done.
        Returns the seconds spent building the descriptor lists and the handle."""
        return self.xfer("READ", remote_agent, local, remote, timeout_s)

    def xfer(self, op: str, remote_agent: str, local: Sequence[tuple[int, int, int]],
             remote: Sequence[tuple[int, int, int]], timeout_s: float) -> float:
        return self._finish(*self.post(op, remote_agent, local, remote), timeout_s,
                            f"{op} with {remote_agent}")

    def _finish(self, handle, prep_s: float, timeout_s: float, what: str) -> float:
        try:
            self.wait(handle, timeout_s, what)
        finally:
            self.release(handle)
        return prep_s

    def post(self, op: str, remote_agent: str, local: Sequence[tuple[int, int, int]],
             remote: Sequence[tuple[int, int, int]]):
        """Post a transfer without waiting: (handle, seconds spent preparing it). Poll it
        with `done`, and `release` it. Every NIXL UCX transfer ends with an endpoint
        flush: DONE means the bytes reached the target (for WRITE too)."""
        t0 = time.perf_counter()
        ldl = self.agent.get_xfer_descs(list(local), self.mem_type)
        rdl = self.agent.get_xfer_descs(list(remote), self.mem_type)
        handle = self.agent.initialize_xfer(op, ldl, rdl, remote_agent)
        return self._start(op, remote_agent, handle, time.perf_counter() - t0)

    def prep_dlist(self, descs, remote_agent: str | None = None):
        """Prepare a descriptor list once (NIXL prep_xfer_dlist), local (`remote_agent`
        None) or a peer's; transfers then pick descriptors by index (`post_prepped`)
        without building lists. `descs`: an N x 3 array of (addr, length, device)."""
        import numpy as np
        arr = np.ascontiguousarray(np.asarray(descs, dtype=np.int64).reshape(-1, 3))
        return self.agent.prep_xfer_dlist(remote_agent or "NIXL_INIT_AGENT", arr,
                                          self.mem_type)

    def release_dlist(self, handle) -> None:
        try:
            self.agent.release_dlist_handle(handle)
        except Exception as e:  # noqa: BLE001
            log.warning("NIXL: release_dlist_handle failed: %s", e)

    def post_prepped(self, op: str, remote_agent: str, local_h, local_idx, remote_h,
                     remote_idx):
        """`post` from prepared lists: descriptors by index (int32 arrays)."""
        t0 = time.perf_counter()
        handle = self.agent.make_prepped_xfer(op, local_h, local_idx, remote_h, remote_idx)
        return self._start(op, remote_agent, handle, time.perf_counter() - t0)

    def xfer_prepped(self, op: str, remote_agent: str, local_h, local_idx, remote_h,
                     remote_idx, timeout_s: float) -> float:
        return self._finish(*self.post_prepped(op, remote_agent, local_h, local_idx,
                                               remote_h, remote_idx), timeout_s,
                            f"{op} with {remote_agent}")

    def _start(self, op: str, remote_agent: str, handle, prep_s: float):
        try:
            state = self.agent.transfer(handle)
        except Exception:
            self.release(handle)
            raise
        if state not in ("PROC", "DONE"):
            self.release(handle)
            raise NixlError(f"{op} with {remote_agent} failed: {state}")
        return handle, prep_s

    def done(self, handle) -> bool:
        """True when the transfer completed; raises when it failed."""
        state = self.agent.check_xfer_state(handle)
        if state == "DONE":
            return True
        if state != "PROC":
            raise NixlError(f"transfer failed: {state}")
        return False

    def wait(self, handle, timeout_s: float, what: str = "transfer") -> None:
        deadline = time.monotonic() + timeout_s
        sleep = 0.0
        while not self.done(handle):
            if time.monotonic() > deadline:
                raise NixlError(f"{what} timed out after {timeout_s}s")
            if sleep:
                time.sleep(sleep)
            sleep = min(max(sleep * 2, 20e-6), 1e-3)

    def release(self, handle) -> None:
        try:
            self.agent.release_xfer_handle(handle)
        except Exception as e:  # noqa: BLE001
            log.warning("NIXL: release_xfer_handle failed: %s", e)

    def send_notif(self, remote_agent: str, msg: str) -> None:
        self.agent.send_notif(remote_agent, msg.encode())

    def notifs(self) -> list[str]:
        """Notifications received since the last call (this also drives UCX progress)."""
        self.progress()
        out, self._notif_buf = self._notif_buf, []
        return out

    def endpoint_configs(self):
        """UCX endpoint configurations logged so far, newest per scope."""
        from kv_transfer.transport import latest_by_scope, parse
        if not self.ucx_log:
            return {}
        try:   # UCX logs through stdio and flushes only at exit: flush every stream now
            import ctypes
            ctypes.CDLL(None).fflush(None)
        except (OSError, AttributeError):
            pass
        try:
            with open(self.ucx_log, errors="replace") as f:
                return latest_by_scope(parse(f.read()))
        except OSError:
            return {}

    def progress(self) -> None:
        """Drive UCX progress on the passive side (wire-up of new peers); keeps the
        notifications that arrive for `notifs`."""
        for msgs in self.agent.get_new_notifs().values():
            self._notif_buf += [m.decode() if isinstance(m, bytes) else str(m) for m in msgs]

    def close(self) -> None:
        try:
            for eid in list(self._remotes):
                self.forget_remote(eid)
            if self._local_blocks is not None:
                self.release_dlist(self._local_blocks)
                self._local_blocks = None
            if self._reg is not None:
                self.agent.deregister_memory(self._reg)
                self._reg = None
        except Exception as e:  # noqa: BLE001
            log.warning("NIXL close: %s", e)
