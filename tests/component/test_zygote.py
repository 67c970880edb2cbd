"""The fork server (pdserve/zygote.py) with a light preload: `procs.spawn` gets a child it
forked, which runs `python -m pdserve.cli` with our descriptors, environment and folder;
exit codes and signals come back as `Popen` gives them; a caller that dies takes its
children with it; without a zygote, spawn starts a new interpreter."""

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from bench.local_cluster import ROOT, start_zygote, stop_cluster_proc, wait_until
from pdserve import procs
from pdserve.zygote import Forked, fork_module

CLI = [sys.executable, "-m", "pdserve.cli"]
# a long-running pdserve process that needs no engine
SCHEDULER = [*CLI, "scheduler", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    proc, sock = start_zygote(tmp_path_factory.mktemp("z"), preload="json")
    yield sock
    assert stop_cluster_proc(proc) == 0
    assert not os.path.exists(sock)       # it removes its socket


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):     # gone while read
        return False


def test_a_forked_cli_gets_our_descriptors_environment_and_exit_code(zygote, capfd, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setenv("PDSERVE_ZYGOTE", zygote)
    monkeypatch.chdir(tmp_path)
    p = procs.spawn([*CLI, "--help"], {"PDSERVE_SOME_FLAG": "x"})
    assert isinstance(p, Forked) and p.pid > 0
    assert p.wait(timeout=60) == 0 and p.returncode == 0 and p.poll() == 0
    assert "usage: pdserve" in capfd.readouterr().out       # our stdout, not the zygote's
    bad = procs.spawn([*CLI, "no-such-command"])
    assert bad.wait(timeout=60) == 2
    assert "invalid choice" in capfd.readouterr().err


def test_signals_come_back_as_popen_gives_them(zygote, monkeypatch):
    monkeypatch.setenv("PDSERVE_ZYGOTE", zygote)
    monkeypatch.setenv("PDSERVE_INTERNAL_AUTH", "off")
    p = procs.spawn(SCHEDULER)
    assert isinstance(p, Forked)
    with pytest.raises(subprocess.TimeoutExpired):
        p.wait(timeout=0.5)                 # running
    assert p.poll() is None
    assert os.getpgid(p.pid) == p.pid       # its own session, as start_new_session
    os.killpg(p.pid, signal.SIGKILL)
    assert p.wait(timeout=30) == -signal.SIGKILL


def test_a_forked_command_starts_with_a_new_interpreters_signal_handlers(zygote):
    """Ctrl-C is Python's KeyboardInterrupt in the child, as in a new interpreter started
    from a shell (the commands stop cleanly on it; a forked frontend that got the system's
    default instead died of SIGINT, where a new one exits 0), the others the system's
    defaults. (A new interpreter would also inherit signals its caller ignores, as under
    nohup; a forked one starts from these.)"""
    from bench.local_cluster import run_module

    forked = run_module("tests.component.signal_probe", [], 60, {"PDSERVE_ZYGOTE": zygote})
    assert forked.returncode == 0, forked.stdout
    assert forked.stdout.split("\n")[:4] == [
        repr(signal.default_int_handler), *[repr(signal.SIG_DFL)] * 3], forked.stdout


def test_a_caller_that_dies_takes_its_children_with_it(zygote, tmp_path):
    """What PR_SET_PDEATHSIG does for a child the caller started itself."""
    caller = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pdserve import procs
            p = procs.spawn({SCHEDULER!r})
            print(p.pid, flush=True)
            time.sleep(600)
        """)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PDSERVE_ZYGOTE": zygote, "PDSERVE_INTERNAL_AUTH": "off",
             "PYTHONPATH": str(ROOT)})
    child = int(caller.stdout.readline())
    assert _alive(child)
    caller.kill()
    caller.wait(timeout=30)
    wait_until(lambda: not _alive(child), 30, what="the orphan to be stopped")


def test_another_module_runs_on_the_descriptors_given(zygote):
    """`fork_module`: the ground-truth engines' way (tests/e2e/cluster.py), with pipes."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    p = fork_module(zygote, "json.tool", ["--sort-keys"], dict(os.environ),
                    fds=(in_r, out_w, 2))
    os.close(in_r)
    os.close(out_w)
    with os.fdopen(in_w, "w") as w:
        w.write('{"b": 1, "a": [2]}')
    with os.fdopen(out_r) as r:
        assert r.read().split() == ["{", '"a":', "[", "2", "],", '"b":', "1", "}"]
    assert p.wait(timeout=60) == 0
    # bound to the cores asked for, as `taskset -c` (bench.compare's servers)
    out_r, out_w = os.pipe()
    p = fork_module(zygote, "tests.component.signal_probe", [], dict(os.environ),
                    fds=(0, out_w, 2), cpus=[0])
    os.close(out_w)
    with os.fdopen(out_r) as r:
        assert r.read().splitlines()[-1] == "[0]"
    assert p.wait(timeout=60) == 0
    with pytest.raises(OSError, match="refused"):
        fork_module(zygote, "not a module", [], dict(os.environ))


def test_a_request_without_descriptors_is_refused(zygote):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(zygote)
    s.sendall(b"\x00\x00\x00\x02{}")
    s.settimeout(30)
    assert s.recv(4096).startswith(b"refused")
    s.close()


def test_without_a_zygote_spawn_starts_a_new_interpreter(monkeypatch, tmp_path):
    monkeypatch.setenv("PDSERVE_ZYGOTE", str(tmp_path / "none.sock"))
    p = procs.spawn([*CLI, "--help"])
    assert isinstance(p, subprocess.Popen)
    assert p.wait(timeout=60) == 0
