"""The house's layers, read from the code's imports (module-level and deferred ones alike).

* floor: pdserve's base modules (configuration, errors, the wire, credentials, metrics
  primitives, hashing, process helpers, the latency model, a kept first token's release,
  sampling conversion, vLLM's argument parser). They import no other package of ours.
* runtime: the worker runtime and engine wrapper (`pdserve.worker`, `engine`, `kv_events`,
  `steps`, `step_hook`, `vllm_plugin`), `kv_transfer`, `scheduler`, `frontend`, and the two
  workers. Each imports the floor and only the runtime packages below it (RUNTIME).
* roof: the command line and launcher (`pdserve.cli`, `launcher`, `flags`) and `bench`. They
  may import anything but the tests.

And no two modules import each other, directly or around a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pdserve", "kv_transfer", "scheduler", "frontend", "prefill_worker",
            "decode_worker", "bench", "tests")
FLOOR = {"pdserve", "pdserve.auth", "pdserve.config", "pdserve.errors", "pdserve.kvhash",
         "pdserve.kept_first", "pdserve.latency", "pdserve.lease_client", "pdserve.logs",
         "pdserve.loop_lag", "pdserve.metrics",
         "pdserve.models", "pdserve.procs", "pdserve.rpc", "pdserve.rpc.gen", "pdserve.rpc.pd_pb2",
         "pdserve.rpc.pd_pb2_grpc", "pdserve.sampling", "pdserve.step_budget",
         "pdserve.vllm_args", "pdserve.zygote"}
ROOF = {"pdserve.cli", "pdserve.launcher", "pdserve.flags"}
# runtime group -> the runtime groups it may import (besides its own and the floor)
RUNTIME = {
    "kv_transfer": set(),
    "scheduler": set(),
    "frontend": set(),
    "pdserve-runtime": {"kv_transfer"},
    "prefill_worker": {"kv_transfer", "pdserve-runtime"},
    "decode_worker": {"kv_transfer", "pdserve-runtime"},
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """The modules of ours `path` imports (`from pkg import mod` counts as pkg.mod)."""
    got = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            if n.split(".")[0] in PACKAGES:
                while n and n not in known:
                    n = n.rpartition(".")[0]
                if n:
                    got.add(n)
    return got


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods) | {"pdserve.rpc.pd_pb2", "pdserve.rpc.pd_pb2_grpc"}
    return {m: imports(p, known) - {m} for m, p in mods.items()}


def group(mod: str) -> str:
    if mod in FLOOR or mod.startswith("pdserve.rpc."):
        return "floor"
    if mod in ROOF or mod.split(".")[0] == "bench":
        return "roof"
    if mod.split(".")[0] == "tests":
        return "tests"
    top = mod.split(".")[0]
    return "pdserve-runtime" if top == "pdserve" else top


def test_every_module_has_a_layer():
    assert {group(m) for m in graph()} <= {"floor", "roof", "tests", *RUNTIME}


def test_layers_only_import_downward():
    bad = []
    for mod, deps in graph().items():
        g = group(mod)
        for d in deps:
            h = group(d)
            if g == "tests" or h == g == "roof" or h == "floor":
                continue
            if h == "tests" or g == "floor" or (g in RUNTIME and h not in RUNTIME[g] | {g}):
                bad.append(f"{mod} ({g}) imports {d} ({h})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_circles():
    g = {m: d for m, d in graph().items() if not m.startswith("tests")}
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):          # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in list(g):
        if v not in index:
            visit(v)
    assert not circles, circles


def is_test_module(mod: str) -> bool:
    return mod.startswith("tests.") and mod.rpartition(".")[2].startswith("test_")


def test_no_test_imports_another_test_module():
    """Shared helpers live in the harness (tests/e2e/cluster.py, bench/local_cluster.py),
    conftest or a helper module, never in another test module."""
    bad = sorted(f"{m} imports {d}" for m, deps in graph().items() if m.startswith("tests")
                 for d in deps if is_test_module(d))
    assert not bad, "\n".join(bad)


def test_the_checks_can_fail():
    """The graph sees deferred imports and `from pkg import mod`, so a violation is found."""
    mods = modules()
    deps = graph()
    assert "pdserve.launcher" in deps["pdserve.cli"]                # inside a function
    assert "pdserve.auth" in deps["frontend.app"]                  # from pdserve import auth
    assert group("pdserve.worker") == "pdserve-runtime" and "kv_transfer.agent" in \
        deps["pdserve.worker"]
    assert len(mods) > 60
    assert is_test_module("tests.e2e.test_faults") and not is_test_module("tests.e2e.cluster")
    assert "tests.e2e.cluster" in deps["tests.e2e.test_faults"]
