"""Which transport a KV connection uses, from UCX's endpoint log lines (pure)."""

from kv_transfer import transport as T

# measured on this machine: NIXL 1.5.1's UCX 1.23, two processes, default UCX_TLS
HERE = ("[1795398335.160730] [vm:13091:1]      ucp_worker.c:1997 UCX  INFO    bench-target "
        "intra-node cfg#1 rma_am(tcp/lo)  amo_am(tcp/lo)  am(tcp/lo cma/memory)  ka(tcp/lo)")
SELF = ("[1795398323.084491] [vm:13091:0]      ucp_worker.c:1997 UCX  INFO    bench-target "
        "self cfg#0 rma_am(tcp/lo)  amo_am(tcp/lo)  am(tcp/lo cma/memory)  ka(tcp/lo)")
TCP_ONLY = ("[1.0] [vm:1:0] ucp_worker.c:1997 UCX  INFO    a intra-node cfg#1 rma_am(tcp/lo)  "
            "amo_am(tcp/lo)  am(tcp/lo)  ka(tcp/lo)")
# shapes of GPU nodes: NVLink within a node, InfiniBand between nodes
NVLINK = ("[1.0] [gpu:7:0] ucp_worker.c:1997 UCX  INFO    p intra-node cfg#2 "
          "tag(cuda_ipc/cuda rc_mlx5/mlx5_0:1) rma(rc_mlx5/mlx5_0:1) "
          "rma_bw(cuda_ipc/cuda rc_mlx5/mlx5_0:1) am(rc_mlx5/mlx5_0:1) ka(ud_mlx5/mlx5_0:1)")
IB = ("[1.0] [gpu:7:0] ucp_worker.c:1997 UCX  INFO    p inter-node cfg#3 "
      "rma(rc_mlx5/mlx5_0:1) rma_bw(rc_mlx5/mlx5_0:1 rc_mlx5/mlx5_1:1) am(rc_mlx5/mlx5_0:1) "
      "ka(ud_mlx5/mlx5_0:1)")
IB_DOWN = ("[1.0] [gpu:7:0] ucp_worker.c:1997 UCX  INFO    p inter-node cfg#4 "
           "rma_am(tcp/eth0) amo_am(tcp/eth0) am(tcp/eth0) ka(tcp/eth0)")


def test_parses_lanes_of_the_measured_line():
    (c,) = T.parse("noise\n" + HERE + "\nmore noise")
    assert (c.agent, c.scope) == ("bench-target", "intra-node")
    assert c.lanes["am"] == ("tcp/lo", "cma/memory") and c.lanes["rma_am"] == ("tcp/lo",)
    # bulk rides on CMA (shared memory); RMA itself is emulated over TCP active messages
    assert c.transport == "shm" and c.rma_emulated
    assert "RMA emulated" in c.describe()


def test_classes_of_transports():
    assert [T.parse(x)[0].transport for x in (TCP_ONLY, NVLINK, IB, IB_DOWN)] == \
        ["tcp", "nvlink", "rdma", "tcp"]
    assert not T.parse(IB)[0].rma_emulated
    assert T.classify("rc_mlx5") == "rdma" and T.classify("dc_mlx5") == "rdma"
    assert T.classify("cuda_copy") == "none" and T.classify("posix") == "shm"


def test_newest_configuration_per_scope():
    got = T.latest_by_scope(T.parse("\n".join([SELF, TCP_ONLY, HERE, IB])))
    assert got["self"].scope == "self"
    assert got["intra-node"].transport == "shm"       # HERE came after TCP_ONLY
    assert got["inter-node"].transport == "rdma"


def test_fallback_against_expectations():
    assert T.fallback("tcp", "shm") and T.fallback("tcp", "rdma") and T.fallback("shm", "nvlink")
    assert not T.fallback("shm", "shm") and not T.fallback("rdma", "shm")
    assert not T.fallback("tcp", "") and not T.fallback("tcp", "tcp")
    assert T.default_expectation("intra-node", False) == "shm"
    assert T.default_expectation("inter-node", True) == "rdma"
    assert T.default_expectation("inter-node", False) == "tcp"


# the same two processes with UCX error handling "none" (--kv-ucx-err-mode): shared memory RMA
SHM_RMA = ("[1795430723.957192] [vm:8267 :0]      ucp_worker.c:1997 UCX  INFO    "
           "bench-initiator intra-node cfg#1 rma(sysv/memory posix/memory)  "
           "amo(sysv/memory posix/memory)  am(sysv/memory cma/memory)")


def test_shared_memory_rma_when_error_handling_is_off():
    (c,) = T.parse(SHM_RMA)
    assert c.transport == "shm" and not c.rma_emulated
    assert c.data_transports == ("sysv", "posix", "cma")


def test_ucx_error_handling_mode_resolution():
    import pytest

    from kv_transfer.backends.nixl import resolve_err_mode
    assert resolve_err_mode("auto", "DRAM") == "none"      # CPU KV: shared-memory RMA
    assert resolve_err_mode("auto", "VRAM") == "peer"      # GPU: UCX's failure detection
    assert resolve_err_mode("peer", "DRAM") == "peer" and resolve_err_mode("none", "VRAM") == "none"
    with pytest.raises(ValueError, match="auto, peer or none"):
        resolve_err_mode("off", "DRAM")


def test_huge_page_ranges_are_the_aligned_interiors():
    from kv_transfer.backends.nixl import HUGE_PAGE, huge_page_ranges
    M = HUGE_PAGE
    assert huge_page_ranges([(M, 4 * M)]) == [(M, 4 * M)]
    assert huge_page_ranges([(M + 4096, 4 * M)]) == [(2 * M, 3 * M)]   # head and tail trimmed
    assert huge_page_ranges([(M + 1, M)]) == []                       # no whole huge page
    assert huge_page_ranges([(0, 3 * M - 1), (5 * M, M)]) == [(0, 2 * M), (5 * M, M)]
