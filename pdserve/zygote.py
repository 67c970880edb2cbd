"""A fork server for pdserve's own processes: imports once, forks each worker, scheduler and
frontend from there.

Each of those processes spends most of its start importing: vLLM, torch and the serving
stack, about 7.5-9 s of one core each (measured on a 2-core AVX512 host: `python -c
"import frontend.app"` 8.8 s, the worker's modules 8.9 s), and a cluster starts three of
them at once on two cores: about 10 of the 22 s a tiny-model cluster takes to be ready.
A zygote pays that once. Started with `python -m pdserve.zygote --socket PATH`, it imports
its `--preload` modules and then listens on a Unix socket; `spawn` (pdserve/procs.py)
sends it a `python -m pdserve.cli ...` command line, the environment and its stdin, stdout
and stderr (SCM_RIGHTS), where PDSERVE_ZYGOTE names the socket. The zygote forks; the
child starts its own session, takes those descriptors, that environment and directory,
and runs `pdserve.cli` as `python -m` would. Anything else, or no zygote, is started as a
new interpreter, as before. (`fork_module` asks for another module, on descriptors and
cores of the caller's choosing: the test suite's ground-truth vLLM engines,
tests/e2e/cluster.py, and benchmark commands and servers, bench/local_cluster.py and
bench/compare.py.)

The caller gets a `Popen`-like handle (`Forked`): the pid, `poll`, `wait` and
`returncode` come over the same connection ("pid N", then "exit CODE", negative for a
signal, as `Popen`). The child is the zygote's, not the caller's, so PR_SET_PDEATHSIG
cannot tie it to the caller: the zygote does, by sending SIGTERM to the child's process
group when the caller's connection closes (the caller exited, or was killed) before the
child did.

Only one user: the socket lives in a directory only its owner can enter, and the zygote
serves only its own uid (SO_PEERCRED). The zygote never starts threads of its own (a fork
copies only the thread that calls it); it waits with `select` and reaps with `waitpid`.
Once imported it runs its `--warm` callables: work every child would repeat, done once
(vLLM's sampler kernel, compiled at one thread: `pdserve.engine.warm_compiled_ops`).

Used by the test suite (tests/e2e/conftest.py), where it saves those imports at every
cluster start; an operator may run one beside `pdserve serve` the same way.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback

ENV = "PDSERVE_ZYGOTE"
MODULE = "pdserve.cli"
PRELOAD = ("pdserve.cli", "pdserve.worker", "decode_worker.server", "prefill_worker.server",
           "scheduler.server", "frontend.app", "vllm.v1.engine.async_llm", "vllm.v1.engine.core")
# called once the modules are imported: work every forked process would otherwise repeat
WARM = ("pdserve.engine:warm_compiled_ops",)
MAX_REQUEST = 1 << 20


class Forked:
    """A child the zygote forked: what the launcher and the local actuator use of `Popen`
    (they signal its process group by `pid`). `buf`: what came after the pid line."""

    def __init__(self, conn: socket.socket, pid: int, args: list[str], buf: bytes = b"") -> None:
        self.conn, self.pid, self.args = conn, pid, args
        self.returncode: int | None = None
        self._buf = buf

    def _read(self, timeout: float | None) -> None:
        while self.returncode is None:
            if b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                if line.startswith(b"exit "):
                    self.returncode = int(line[5:])
                    self.conn.close()
                continue
            ready, _, _ = select.select([self.conn], [], [], timeout)
            if not ready:
                return
            data = self.conn.recv(4096)
            if not data:     # the zygote died: its child went with it (PR_SET_PDEATHSIG)
                self.returncode = -signal.SIGKILL
                self.conn.close()
                return
            self._buf += data

    def poll(self) -> int | None:
        self._read(0)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._read(left)
        return self.returncode



def fork_cli(path: str, args: list[str], env: dict[str, str], timeout: float = 10.0) -> Forked:
    """`python -m pdserve.cli *args` forked by the zygote at `path`, with `env`, this
    process's directory, stdin, stdout, stderr and cores (as a child it started itself
    would have). OSError when it cannot."""
    return fork_module(path, MODULE, args, env, timeout=timeout,
                       cpus=sorted(os.sched_getaffinity(0)))


def fork_module(path: str, module: str, args: list[str], env: dict[str, str],
                fds: tuple[int, int, int] = (0, 1, 2), timeout: float = 10.0,
                cwd: str | None = None, cpus: list[int] | None = None) -> Forked:
    """`python -m module *args` forked by the zygote at `path`, with `env`, `cwd` (default:
    this process's directory) and `fds` as its stdin, stdout and stderr (the caller keeps
    its copies); bound to `cpus` if given, as `taskset -c` would. OSError when it cannot."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(timeout)
        conn.connect(path)
        body = json.dumps({"module": module, "args": args, "env": env,
                           "cwd": cwd or os.getcwd(), "cpus": cpus}).encode()
        if len(body) + 4 > MAX_REQUEST:
            raise OSError("command line and environment too large for the zygote")
        socket.send_fds(conn, [struct.pack("!I", len(body)) + body], list(fds))
        buf = b""
        while b"\n" not in buf:
            data = conn.recv(4096)
            if not data:
                raise OSError("the zygote closed the connection")
            buf += data
        line, rest = buf.split(b"\n", 1)
        if not line.startswith(b"pid "):
            raise OSError(f"the zygote refused: {line.decode(errors='replace')}")
        conn.settimeout(None)
        return Forked(conn, int(line[4:]), [sys.executable, "-m", module, *args], rest)
    except BaseException:
        conn.close()
        raise


# -- the server


def _die_with_parent() -> None:
    """SIGTERM when the parent process dies (PR_SET_PDEATHSIG)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST, 3)
    try:
        while len(data) < 4 or len(data) < 4 + struct.unpack("!I", data[:4])[0]:
            more = conn.recv(MAX_REQUEST)
            if not more:
                raise OSError("short request")
            data += more
        n = struct.unpack("!I", data[:4])[0]
        req = json.loads(data[4:4 + n])
        module = req.setdefault("module", MODULE)
        cpus = req.get("cpus")
        if len(fds) != 3 or not isinstance(req.get("args"), list) \
                or not isinstance(req.get("env"), dict) or not isinstance(module, str) \
                or not all(p.isidentifier() for p in module.split(".")) \
                or not (cpus is None or isinstance(cpus, list)
                        and all(isinstance(c, int) for c in cpus)):
            raise ValueError("a request is a module, args, env, cwd, cpus and three "
                             "descriptors")
        return req, fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _same_user(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


def _title(argv: list[str]) -> None:
    """What `ps` and `pgrep -f` show: the command line the child stands for, not the
    zygote's. Set before the environment changes: setproctitle (vLLM's dependency, which
    names the engine core `VLLM::EngineCore` with it later) finds the memory it rewrites
    from the process's original environment, and without this first call it did not (the
    engine core kept the zygote's name)."""
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(" ".join(argv))
    import ctypes

    try:    # the short name (`comm`) stays the interpreter's, as for `python -m`
        ctypes.CDLL("libc.so.6").prctl(15, os.path.basename(sys.executable)[:15].encode())
    except OSError:
        pass


def _child(req: dict, fds: list[int], close: list[socket.socket], ready: int) -> None:
    """In the forked child: become `python -m module *args`; never returns. `ready`:
    a pipe to tell the zygote that the child leads its own process group and takes
    signals as a new process does (before that, a SIGTERM to its group missed it)."""
    code = 1
    try:
        for s in close:
            s.close()
        os.setsid()
        # the handlers a new interpreter starts with: Ctrl-C raises KeyboardInterrupt (the
        # commands stop cleanly on it), the others are the system's defaults
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.write(ready, b"1")
        os.close(ready)
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
            os.close(fd)
        # our parent is the zygote: it stops us when the caller goes (PR_SET_PDEATHSIG ties
        # us to the zygote, which lives longer)
        _die_with_parent()
        _title([sys.executable, "-m", req["module"], *map(str, req["args"])])
        if req.get("cpus"):
            os.sched_setaffinity(0, req["cpus"])
        os.chdir(req.get("cwd") or "/")
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in req["env"].items()})
        sys.argv = [sys.argv[0], *map(str, req["args"])]
        import runpy

        runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            import atexit

            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(path: str, preload: list[str], warm: list[str] = ()) -> None:
    for name in preload:
        importlib.import_module(name)
    for spec in warm:       # "module:function", called with no argument
        mod, _, fn = spec.partition(":")
        t0 = time.monotonic()
        try:
            getattr(importlib.import_module(mod), fn)()
        except Exception as e:      # noqa: BLE001 - a saving, not a duty: children redo it
            print(f"zygote: {spec} failed ({type(e).__name__}: {e}); children will do it "
                  "themselves", file=sys.stderr)
            continue
        print(f"zygote: {spec} took {time.monotonic() - t0:.2f}s", file=sys.stderr)
    # what every child inherits, out of the collector's way: a child's collections neither
    # walk it nor write its objects' headers, so its pages stay shared with this process
    # (Python's gc docs: freeze right before forking); a serving child freezes its own
    # start-up heap later (pdserve.procs.freeze_heap)
    gc.collect()
    gc.freeze()
    sys.stdout.flush()
    sys.stderr.flush()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, mode=0o700, exist_ok=True)
    os.chmod(d, 0o700)
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{path}.{os.getpid()}"
    lst.bind(tmp)
    lst.listen(64)
    os.rename(tmp, path)     # callers see the socket only once it listens
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    kids: dict[int, socket.socket] = {}          # pid -> its caller's connection
    try:
        while not stopping:
            watch = [lst, *[c for c in kids.values() if c.fileno() >= 0]]
            try:
                ready, _, _ = select.select(watch, [], [], 0.2)
            except InterruptedError:
                ready = []
            for s in ready:
                if s is lst:
                    _accept(lst, kids)
                else:
                    _caller_gone(s, kids)
            _reap(kids)
    finally:
        for pid in kids:
            _kill_group(pid, signal.SIGTERM)
        lst.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _accept(lst: socket.socket, kids: dict[int, socket.socket]) -> None:
    conn, _ = lst.accept()
    try:
        if not _same_user(conn):
            conn.sendall(b"refused: another user\n")
            conn.close()
            return
        conn.settimeout(10)
        req, fds = _read_request(conn)
    except (OSError, ValueError) as e:
        try:
            conn.sendall(f"refused: {e}\n".encode())
        except OSError:
            pass
        conn.close()
        return
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(req, fds, [lst, conn, *kids.values()], w)
    os.close(w)
    for fd in fds:
        os.close(fd)
    try:
        if select.select([r], [], [], 30)[0]:
            os.read(r, 1)     # in its own group now (or gone: EOF)
    finally:
        os.close(r)
    conn.settimeout(None)
    try:
        conn.sendall(f"pid {pid}\n".encode())
    except OSError:
        _kill_group(pid, signal.SIGTERM)
    kids[pid] = conn


def _caller_gone(conn: socket.socket, kids: dict[int, socket.socket]) -> None:
    """A caller's connection is readable: it sends nothing more, so it closed."""
    try:
        data = conn.recv(4096)
    except OSError:
        data = b""
    if data:
        return
    for pid, c in kids.items():
        if c is conn:
            _kill_group(pid, signal.SIGTERM)    # what PR_SET_PDEATHSIG would have done
    conn.close()


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(kids: dict[int, socket.socket]) -> None:
    while kids:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = kids.pop(pid, None)
        if conn is not None and conn.fileno() >= 0:
            try:
                conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
            except OSError:
                pass
            conn.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pdserve.zygote", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", required=True, help="where to listen (its folder: mode 0700)")
    ap.add_argument("--preload", default=",".join(PRELOAD),
                    help="modules to import before forking (comma list)")
    ap.add_argument("--warm", default=",".join(WARM),
                    help="module:function callables to run once the modules are imported "
                         "(comma list; default: compile vLLM's sampler kernel)")
    ns = ap.parse_args(argv)
    _die_with_parent()       # and its children with it
    serve(ns.socket, [m for m in ns.preload.split(",") if m],
          [w for w in ns.warm.split(",") if w])
    return 0


if __name__ == "__main__":
    sys.exit(main())
