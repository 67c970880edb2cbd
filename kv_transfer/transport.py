"""Which UCX transports a KV connection really uses, read from UCX's own endpoint log.

UCX logs every new endpoint configuration at INFO level, e.g. (measured here, NIXL 1.5.1's
UCX 1.23, two processes on one host, default UCX_TLS):

    ucp_worker.c:1997 UCX  INFO    agent intra-node cfg#1 rma_am(tcp/lo)  amo_am(tcp/lo)
        am(tcp/lo cma/memory)  ka(tcp/lo)

Each `lane(transport/device ...)` group names the transports of one kind of lane: `rma`
and `rma_bw` (one-sided put/get), `rma_am` (RMA emulated over active messages: the target's
CPU serves it), `am` (active messages; a second entry carries zero-copy bulk), `tag`, `ka`
(keepalive). Pure functions: no UCX, no files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LINE = re.compile(r"UCX\s+INFO\s+(?P<agent>\S+)\s+(?P<scope>self|intra-node|inter-node)\s+"
                   r"cfg#(?P<cfg>\d+)\s+(?P<lanes>.*)$")
_LANE = re.compile(r"(?P<kind>[a-z_]+)\((?P<tls>[^)]*)\)")

# transport name prefix -> class
_CLASSES = (
    ("cuda_ipc", "nvlink"),
    ("rc", "rdma"), ("dc", "rdma"), ("ud", "rdma"), ("srd", "rdma"), ("gga", "rdma"),
    ("xpmem", "shm"), ("knem", "shm"), ("cma", "shm"), ("posix", "shm"), ("sysv", "shm"),
    ("tcp", "tcp"),
)
RANK = {"nvlink": 4, "rdma": 3, "shm": 2, "tcp": 1, "none": 0}


@dataclass(frozen=True)
class EndpointConfig:
    agent: str
    scope: str                        # self | intra-node | inter-node
    lanes: dict[str, tuple[str, ...]]  # lane kind -> ("tcp/lo", "cma/memory", ...)

    @property
    def data_transports(self) -> tuple[str, ...]:
        """Transports that can carry KV bytes: the RMA lanes and the AM lanes (bulk
        rendezvous rides on the AM lanes when RMA is emulated over active messages)."""
        out: list[str] = []
        for kind in ("rma_bw", "rma", "rma_am", "am"):
            for t in self.lanes.get(kind, ()):
                name = t.split("/")[0]
                if name not in out:
                    out.append(name)
        return tuple(out)

    @property
    def transport(self) -> str:
        """The best class among the data transports: nvlink > rdma > shm > tcp."""
        best = "none"
        for t in self.data_transports:
            c = classify(t)
            if RANK[c] > RANK[best]:
                best = c
        return best

    @property
    def rma_emulated(self) -> bool:
        """One-sided RMA runs as active messages: the target must make progress."""
        return "rma_am" in self.lanes and "rma" not in self.lanes and "rma_bw" not in self.lanes

    def describe(self) -> str:
        lanes = " ".join(f"{k}({' '.join(v)})" for k, v in self.lanes.items())
        note = "; RMA emulated over active messages" if self.rma_emulated else ""
        return f"{self.transport} [{lanes}]{note}"


def classify(transport: str) -> str:
    for prefix, cls in _CLASSES:
        if transport.startswith(prefix):
            return cls
    return "none"


def parse(text: str) -> list[EndpointConfig]:
    out = []
    for line in text.splitlines():
        m = _LINE.search(line)
        if not m:
            continue
        lanes: dict[str, tuple[str, ...]] = {}
        for lm in _LANE.finditer(m.group("lanes")):
            lanes[lm.group("kind")] = tuple(lm.group("tls").split())
        out.append(EndpointConfig(m.group("agent"), m.group("scope"), lanes))
    return out


def latest_by_scope(configs: list[EndpointConfig]) -> dict[str, EndpointConfig]:
    """The newest configuration per scope (UCX logs a configuration once, when it is
    first created; later endpoints of the same kind reuse it)."""
    out: dict[str, EndpointConfig] = {}
    for c in configs:
        out[c.scope] = c
    return out


def fallback(actual: str, expected: str) -> bool:
    """True when the data path is worse than what the deployment expects
    (`expected`: nvlink, rdma, shm, tcp, or "" for no expectation)."""
    if not expected or expected not in RANK:
        return False
    return RANK.get(actual, 0) < RANK[expected]


def default_expectation(scope: str, has_rdma_device: bool) -> str:
    """What a peer pair should use when nothing is configured: shared memory on one host,
    RDMA between hosts when the host has an RDMA device, else TCP is all there is."""
    if scope in ("self", "intra-node"):
        return "shm"
    return "rdma" if has_rdma_device else "tcp"
