"""A real local cluster (`pdserve serve` as a subprocess) for tests and benchmarks: start it,
wait until every worker has registered, talk to its internal plane, stop it by PID.

The cluster runs with a secret this process made (`SECRET`), so the caller can call the
internal plane as any role (`channel`)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from pdserve import auth, zygote
from pdserve.engine import free_port
from pdserve.rpc import pd_pb2, pd_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
# every cluster started here runs authenticated with this secret (`pdserve serve` would make
# its own; giving it one lets the caller use the internal plane as any role)
SECRET = auth.new_secret()


def creds(role: str = auth.ADMIN) -> auth.Credentials:
    ring = auth.Keyring(SECRET)
    return auth.Credentials(ring.token(role), ring)


def channel(address: str, role: str = auth.ADMIN):
    """A blocking channel to such a cluster's gRPC service, as `role`."""
    return auth.channel(address, creds(role))


@dataclass
class Cluster:
    proc: subprocess.Popen
    url: str
    scheduler: str
    model_dir: str
    model_name: str
    log_path: Path

    def workers(self) -> list[pd_pb2.WorkerInfo]:
        with channel(self.scheduler) as ch:
            return list(pd_pb2_grpc.SchedulerStub(ch).ListWorkers(
                pd_pb2.ListWorkersRequest(), timeout=5).workers)

    def status(self, w: pd_pb2.WorkerInfo) -> pd_pb2.WorkerStatusResponse:
        with channel(w.address) as ch:
            stub = (pd_pb2_grpc.PrefillWorkerStub(ch) if w.role == pd_pb2.ROLE_PREFILL
                    else pd_pb2_grpc.DecodeWorkerStub(ch))
            return stub.Status(pd_pb2.WorkerStatusRequest(), timeout=5)

    def metrics(self, w: pd_pb2.WorkerInfo) -> str:
        return httpx.get(f"http://{w.metrics_address}/metrics", timeout=5).text

    def wait_idle(self, timeout: float = 30.0,
                  workers: list | None = None) -> dict[str, pd_pb2.WorkerLoad]:
        """Until every worker (or each of `workers`) reports no running/waiting requests, no
        KV in use, no leases; their loads then, or at `timeout` (`busy` says which are not)."""
        deadline = time.monotonic() + timeout
        while True:
            loads = {w.worker_id: self.status(w).load
                     for w in (self.workers() if workers is None else workers)}
            if not busy(loads) or time.monotonic() > deadline:
                return loads
            time.sleep(0.25)


def wait_until(cond, timeout: float = 60.0, step: float = 0.2, what: str = "condition"):
    """Poll `cond()` until it returns something truthy (returned) or `timeout` passes
    (AssertionError naming `what`): the harness's one way to wait for a state."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met in {timeout:g}s")
        time.sleep(step)


def busy(loads: dict[str, pd_pb2.WorkerLoad]) -> dict[str, pd_pb2.WorkerLoad]:
    """The workers among `loads` that still hold a request, KV or a lease."""
    return {k: v for k, v in loads.items()
            if v.running or v.waiting or v.kv_usage > 0 or v.kv_leases_held}


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus sample's values whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+([-+eE\d.naif]+)", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


class PortTaken(RuntimeError):
    pass


def start_cluster(model_dir: str, log_path: Path, env: dict[str, str] | None = None,
                  extra: list[str] | None = None, timeout: float = 400) -> Cluster:
    """The launcher needs fixed frontend/scheduler ports; retry if one was taken meanwhile."""
    for attempt in range(3):
        try:
            return _start_cluster(model_dir, log_path, env, extra, timeout)
        except PortTaken:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _start_cluster(model_dir: str, log_path: Path, env: dict[str, str] | None,
                   extra: list[str] | None, timeout: float) -> Cluster:
    port, sport = free_port(), free_port()
    argv = [sys.executable, "-m", "pdserve.cli", "serve", "--model", model_dir,
            "--port", str(port), "--scheduler-port", str(sport), "--kv-cache-gib", "0.25",
            # the tests check routes, transfers and cache hits in responses
            "--expose-routing", "--enable-prompt-tokens-details",
            "--shutdown-grace-s", "10", *(extra or [])]
    logf = open(log_path, "w")
    proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, auth.ENV_SECRET: SECRET, **(env or {})},
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log_path.read_text()
            if "address already in use" in text.lower():
                raise PortTaken(f"a port was taken before the cluster bound it ({log_path})")
            raise RuntimeError(f"cluster exited early; see {log_path}:\n" + text[-4000:])
        try:
            # the launcher logs "ready:" once every configured worker has registered
            if "pdserve.launcher: ready:" in log_path.read_text() and \
                    httpx.get(f"{url}/health", timeout=2).status_code == 200:
                key = (extra or [])[(extra or []).index("--api-key") + 1] \
                    if "--api-key" in (extra or []) else ""
                name = httpx.get(f"{url}/v1/models", timeout=5, headers={
                    "Authorization": f"Bearer {key}"} if key else {}).json()["data"][0]["id"]
                return Cluster(proc, url, f"127.0.0.1:{sport}", model_dir, name, log_path)
        except httpx.HTTPError:
            pass
        except Exception:
            stop_cluster_proc(proc)      # never leave a cluster behind a failed start
            raise
        time.sleep(0.2)
    stop_cluster_proc(proc)
    raise RuntimeError(f"cluster not healthy in {timeout}s; see {log_path}")


def stop_cluster_proc(proc: subprocess.Popen) -> int:
    """Ctrl-C the launcher (by PID); it stops its children. Kill the group if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    return proc.returncode


def start_frontend(c: Cluster, log_path: Path, extra: list[str] | None = None,
                   timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """A second HTTP frontend (`pdserve frontend ...extra`) on a running cluster's
    scheduler, as an operator adds one; (its process, its URL) once it answers. Stop it
    with `stop_cluster_proc`. Forked by the zygote where one answers (`start_module`)."""
    port = free_port()
    proc = start_module("pdserve.cli", [
        "frontend", "--model", c.model_dir, "--served-model-name", c.model_name,
        "--scheduler", c.scheduler, "--port", str(port), *(extra or [])],
        open(log_path, "w"), env={auth.ENV_SECRET: SECRET})
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"frontend exited early; see {log_path}")
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
    try:
        wait_until(up, timeout, step=0.5, what=f"frontend on {url}")
    except BaseException:
        stop_cluster_proc(proc)
        raise
    return proc, url


def start_zygote(folder: Path, timeout: float = 180,
                 preload: str | None = None) -> tuple[subprocess.Popen, str]:
    """A fork server (pdserve/zygote.py) with pdserve's and vLLM's modules imported:
    (its process, its socket) once it listens. Clusters started while PDSERVE_ZYGOTE names
    the socket fork their workers, scheduler and frontend from it instead of importing
    afresh (a tiny-model cluster: ready in 8-11 s instead of 20-21 s on a 2-core host).
    Stop it with `stop_cluster_proc` once no cluster uses it. `preload`: its modules
    (comma list; default: pdserve's processes' and vLLM's)."""
    sock = folder / "d" / "z.sock"
    logf = open(folder / "zygote.log", "w")
    # a light preload (component tests) has no vLLM to warm
    extra = ["--preload", preload, "--warm", ""] if preload is not None else []
    proc = subprocess.Popen([sys.executable, "-m", "pdserve.zygote", "--socket", str(sock),
                             *extra],
                            stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT,
                            start_new_session=True)

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"the zygote exited; see {folder / 'zygote.log'}")
        return sock.exists()
    try:
        wait_until(up, timeout, step=0.2, what="the zygote")
    except BaseException:
        stop_cluster_proc(proc)
        raise
    return proc, str(sock)


def start_module(module: str, args: list[str], stdout, env: dict[str, str] | None = None,
                 stdin=None, stderr=None, cpus: list[int] | None = None):
    """`python -m module *args` in ROOT and its own session: forked by the zygote
    PDSERVE_ZYGOTE names where one answers (vLLM and the serving stack already imported:
    about 8 s sooner), else a new interpreter. `stdout`, `stdin` (default: none) and
    `stderr` (default: with stdout) are files or descriptors; `cpus`: bound to those cores,
    as `taskset -c`. A `Popen`, or the zygote's `Popen`-like handle (pid, poll, wait,
    send_signal)."""
    full = {**os.environ, **(env or {})}
    with open(os.devnull) as null:
        fds = [f if isinstance(f, int) else f.fileno()
               for f in (null if stdin is None else stdin, stdout,
                         stdout if stderr is None else stderr)]
        if full.get(zygote.ENV):
            try:
                return zygote.fork_module(full[zygote.ENV], module, args, full,
                                          cwd=str(ROOT), fds=tuple(fds), cpus=cpus)
            except OSError:
                pass
        pin = ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []
        return subprocess.Popen([*pin, sys.executable, "-m", module, *args], cwd=ROOT,
                                env=full, stdin=fds[0], stdout=fds[1], stderr=fds[2],
                                start_new_session=True)


def run_module(module: str, args: list[str], timeout: float,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`start_module` run to its end, its output as `subprocess.run(..., text=True,
    stdout=PIPE, stderr=STDOUT)` gives it: stdout and stderr together in `stdout`."""
    with tempfile.TemporaryFile() as out:
        p = start_module(module, args, out, env)
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
            raise
        out.seek(0)
        text = out.read().decode(errors="replace")
    return subprocess.CompletedProcess([sys.executable, "-m", module, *args], rc, text)
