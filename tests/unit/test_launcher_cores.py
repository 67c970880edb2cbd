"""Core assignment of `pdserve serve`: pools never share a core when two or more exist."""

import os

from pdserve.launcher import assign_cores


def test_pools_get_disjoint_cores():
    assert assign_cores(["0", "1"], 1, 1) == (["0"], ["1"])
    assert assign_cores(["0", "1"], 2, 1) == (["0", "0"], ["1"])
    assert assign_cores(["0", "1"], 1, 2) == (["0"], ["1", "1"])
    assert assign_cores(["0", "1", "2", "3"], 3, 1) == (["0", "1", "2"], ["3"])
    assert assign_cores(["0", "1", "2", "3"], 2, 2) == (["0", "1"], ["2", "3"])
    p, d = assign_cores([str(i) for i in range(8)], 4, 4)
    assert not set(p) & set(d) and len(set(p)) == 4


def test_serving_processes_go_to_the_prefill_pools_cores():
    from pdserve.launcher import serving_cores
    assert serving_cores("auto", ["0"], ["1"], gpus=False) == {0}
    assert serving_cores("auto", ["0", "1"], ["2", "3"], gpus=False) == {0, 1}
    assert serving_cores("auto", ["0|1"], ["2"], gpus=False) == {0, 1}   # TP ranks
    assert serving_cores("auto", ["0"], ["0"], gpus=False) is None       # one core
    assert serving_cores("auto", ["0|1"], ["1"], gpus=False) is None     # shared
    assert serving_cores("auto", [], ["1", "0"], gpus=False) is None     # no prefill pool
    assert serving_cores("auto", ["0"], ["1"], gpus=True) is None        # GPU engines
    assert serving_cores("all", ["0"], ["1"], gpus=False) is None
    assert serving_cores("3,5", ["0"], ["1"], gpus=True) == {3, 5}       # as asked
    from pdserve.cli import parse_args
    assert parse_args(["serve", "--model", "m"]).serving_cores == "auto"
    assert parse_args(["serve", "--model", "m", "--serving-cores", " 0, 2"]
                      ).serving_cores == "0,2"
    assert parse_args(["serve", "--model", "m", "--serving-cores", "0,2-3"]
                      ).serving_cores == "0,2,3"              # config.id_list's syntax


def test_bad_serving_cores_are_refused_with_a_message(capsys):
    import pytest
    from pdserve.cli import parse_args
    for bad in ("zero", "0,,1", "-1", "0;1", "", "3-1", "0-x"):
        with pytest.raises(SystemExit) as e:
            parse_args(["serve", "--model", "m", "--serving-cores", bad])
        assert e.value.code == 2
        assert "auto, all, or a comma list of core numbers" in capsys.readouterr().err


def test_one_core_or_one_pool():
    assert assign_cores(["0"], 2, 1) == (["0", "0"], ["0"])
    assert assign_cores(["0", "1"], 0, 2) == ([], ["1", "0"])


def test_tensor_parallel_engines_get_a_core_per_rank():
    from pdserve.engine import omp_bind
    from pdserve.launcher import pool_tp
    assert assign_cores(["0", "1", "2", "3"], 1, 1, tp_p=2) == (["0|1"], ["2"])
    assert assign_cores(["0", "1", "2"], 1, 1, tp_p=2) == (["0|1"], ["2"])
    assert assign_cores(["0", "1"], 1, 1, tp_p=2) == (["0|0"], ["1"])     # shared
    assert assign_cores(["0", "1", "2", "3"], 1, 1, tp_d=2) == (["0"], ["1|2"])
    assert assign_cores(["0"], 1, 1, tp_p=2, tp_d=2) == (["0|0"], ["0|0"])
    # each pool's degree, from its flags as its workers parse them
    from pdserve.cli import parse_args
    from pdserve.launcher import check_pool_args
    ns = parse_args(["serve", "--model", "m", "--kv-cache-gib", "1", "--prefill-args",
                     "-tp 2 --tensor-parallel-size=4"])        # the last wins
    pools = check_pool_args(ns, parse_args)
    assert (pool_tp(pools["prefill"]), pool_tp(pools["decode"])) == (4, 1)
    ns = parse_args(["serve", "--model", "m", "--tensor-parallel-size", "2"])
    assert [pool_tp(v) for v in check_pool_args(ns, parse_args).values()] == [2, 2]
    assert omp_bind("0", 1) == "0" and omp_bind("0", 2) == "0|0"
    assert omp_bind("0,1", 2) == "0|1" and omp_bind("0-4", 2) == "0,1,2|3,4"
    assert omp_bind("0|1", 2) == "0|1"


def _config(backend: str, dp: int = 1):
    from types import SimpleNamespace
    return SimpleNamespace(parallel_config=SimpleNamespace(
        distributed_executor_backend=backend, data_parallel_size=dp))


def _forked_report() -> list:
    """Fork; the child reports its affinity and torch threads, and goes."""
    import json

    import torch

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, json.dumps([sorted(os.sched_getaffinity(0)),
                                torch.get_num_threads()]).encode())
        os._exit(0)
    os.close(w)
    got = json.loads(os.read(r, 4096))
    os.close(r)
    os.waitpid(pid, 0)
    return got


def test_a_forked_engine_core_binds_itself_and_the_worker_keeps_its_own(monkeypatch):
    """The engine-core process is forked at one rank; the child pins itself to the engine's
    cores with as many torch threads, and the worker's own affinity and threads stay."""
    import torch

    from pdserve.config import EngineConfig
    from pdserve.engine import forked_core

    monkeypatch.delenv("PDSERVE_ENGINE_FORK", raising=False)
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")   # what vLLM's CPU platform sets
    core = sorted(os.sched_getaffinity(0))[-1]
    before, threads = os.sched_getaffinity(0), torch.get_num_threads()
    with forked_core(EngineConfig(model="m", cpu_cores=str(core)), _config("uni")):
        assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "fork"
        assert os.sched_getaffinity(0) == before
        got = _forked_report()
    assert got == [[core], 1]
    assert os.sched_getaffinity(0) == before and torch.get_num_threads() == threads
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    # a fork after the engine's leaves the child as it was
    pid = os.fork()
    if pid == 0:
        os._exit(0 if os.sched_getaffinity(0) == before else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_ranks_fork_and_each_binds_to_its_cores(monkeypatch):
    """With ranks (vLLM's multiprocess executor) the engine core is forked unbound, and a
    process forked inside vLLM's `configure_omp_envs` for a rank binds to that rank's
    cores with as many torch threads, as a spawned one reads them from OMP_PLACES."""
    import torch
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    from pdserve.config import EngineConfig
    from pdserve.engine import forked_core

    monkeypatch.delenv("PDSERVE_ENGINE_FORK", raising=False)
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    core = sorted(os.sched_getaffinity(0))[-1]
    before, threads = sorted(os.sched_getaffinity(0)), torch.get_num_threads()
    manager = object.__new__(OMPProcessManager)   # as vLLM's executor builds it, bound by hand
    manager.skip_setup, manager.use_iomp, manager.use_gomp = False, False, False
    manager.cpu_lists = [[before[0]], [core]]
    with forked_core(EngineConfig(model="m", cpu_cores="0|1"), _config("mp")):  # a rank each
        assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "fork"
        assert _forked_report() == [before, threads]          # the engine core: unbound
        with manager.configure_omp_envs(rank=1, local_rank=1):
            assert os.environ["OMP_PLACES"] == "{%d}" % core  # vLLM's own part still runs
            assert _forked_report() == [[core], 1]            # rank 1's worker
        assert _forked_report() == [before, threads]          # outside a rank: as it was
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    assert sorted(os.sched_getaffinity(0)) == before and torch.get_num_threads() == threads
    manager.skip_setup = True                                 # VLLM_CPU_OMP_THREADS_BIND=nobind
    with manager.configure_omp_envs(rank=1, local_rank=1):
        assert _forked_report() == [before, threads]


def test_the_engine_core_is_spawned_with_data_parallel_or_when_asked():
    import pytest

    from pdserve.config import EngineConfig
    from pdserve.engine import forked_core

    before = os.sched_getaffinity(0)
    cfg = EngineConfig(model="m", cpu_cores="0")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        with forked_core(cfg, _config("mp", dp=2)):       # an engine core per DP rank
            assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
            assert os.sched_getaffinity(0) == before
        mp.setenv("PDSERVE_ENGINE_FORK", "0")
        for backend in ("uni", "mp"):
            with forked_core(cfg, _config(backend)):
                assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
                assert os.sched_getaffinity(0) == before


def test_only_a_process_own_command_line_names_vllms_log_prefix(monkeypatch):
    """vLLM fixes its log prefix when its parser first imports it, so a process given vLLM
    engine arguments names its role first; the launcher checking each pool's arguments
    does not rename itself (nor the children it starts after)."""
    from pdserve.cli import parse_args
    from pdserve.launcher import check_pool_args
    monkeypatch.delenv("VLLM_LOGGING_PREFIX", raising=False)
    argv = ["decode", "--model", "m", "--worker-id", "decode-3", "--max-logprobs", "3"]
    ns = parse_args(["serve", "--model", "m", "--max-logprobs", "3"])
    check_pool_args(ns, parse_args)
    parse_args(argv)
    assert "VLLM_LOGGING_PREFIX" not in os.environ
    parse_args(argv, own=True)
    assert os.environ["VLLM_LOGGING_PREFIX"] == "[decode-decode-3] "


def test_something_else_on_the_frontends_port_is_not_healthy():
    """A process that bound the frontend's port first (a worker's gRPC server on port 0
    can get the number) answers /health with bytes that are not HTTP: the launcher's
    wait treats it as not up, and ends when a child exits, instead of crashing."""
    import socket
    import threading

    from pdserve.launcher import _wait_healthy

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def answer():
        for _ in range(2):
            conn, _ = srv.accept()
            conn.recv(1024)
            conn.sendall(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00")    # an HTTP/2 frame
            conn.close()
    t = threading.Thread(target=answer, daemon=True)
    t.start()

    class Child:
        def __init__(self):
            self.calls = 0

        def alive(self):
            self.calls += 1
            return self.calls < 3       # the frontend fails to bind and exits
    url = f"http://127.0.0.1:{srv.getsockname()[1]}/health"
    assert _wait_healthy(url, 10, [Child()], 1, 1) is False
    srv.close()


def test_vllms_own_server_forks_its_engine_core_bound_as_itself(monkeypatch):
    """With PDSERVE_FORK_ENGINE=1 pdserve's plugin makes vLLM's server fork its engine core
    (`stock_server_forks`): the child keeps the server's cores (a server under `taskset -c 1`
    computes on core 1) with a torch thread per core, as a spawned child would start."""
    import contextlib

    import torch
    from vllm.v1.engine import core_client

    from pdserve.engine_fork import stock_server_forks

    core = sorted(os.sched_getaffinity(0))[-1]
    seen = {}

    @contextlib.contextmanager
    def launch(vllm_config, *args, **kwargs):            # vLLM's, starting one process
        seen["method"] = os.environ["VLLM_WORKER_MULTIPROC_METHOD"]
        seen["child"] = _forked_report()
        yield "launched"

    monkeypatch.setattr(core_client, "launch_core_engines", launch)
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    monkeypatch.delenv("PDSERVE_ENGINE_FORK", raising=False)
    threads, before = torch.get_num_threads(), os.sched_getaffinity(0)
    stock_server_forks()
    stock_server_forks()                                  # once only
    assert core_client.launch_core_engines is not launch
    os.sched_setaffinity(0, {core})                       # the server, under taskset -c
    try:
        with core_client.launch_core_engines(_config("uni"),
                                             None, False, None) as got:
            assert got == "launched"
    finally:
        os.sched_setaffinity(0, before)
    assert seen == {"method": "fork", "child": [[core], 1]}
    assert os.environ["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    assert torch.get_num_threads() == threads


def test_pin_serving_moves_every_thread_of_the_process(monkeypatch):
    """In a forked child (this process's own threads stay as they are): every thread it
    has, and one it starts afterwards, on the cores PDSERVE_SERVING_CPUS lists."""
    import threading
    from pdserve.procs import SERVING_CPUS_ENV, pin_serving
    core = sorted(os.sched_getaffinity(0))[-1]
    monkeypatch.setenv(SERVING_CPUS_ENV, str(core))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            hold = threading.Event()
            t = threading.Thread(target=hold.wait)
            t.start()
            got = pin_serving()
            tids = [int(x) for x in os.listdir("/proc/self/task")]
            seen = []
            later = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
            later.start()
            later.join()
            ok = (got == {core} and len(tids) >= 2 and seen == [{core}]
                  and all(os.sched_getaffinity(x) == {core} for x in tids))
            hold.set()
            t.join()
        finally:
            os.write(w, b"1" if ok else b"0")
            os._exit(0)
    os.close(w)
    assert os.read(r, 1) == b"1"
    os.waitpid(pid, 0)
    monkeypatch.setenv(SERVING_CPUS_ENV, "")
    assert pin_serving() is None          # not asked: nothing moves
    monkeypatch.setenv(SERVING_CPUS_ENV, "x")
    assert pin_serving() is None


def test_a_process_spawned_by_a_pinned_one_starts_on_the_launchers_cores():
    """The autoscaler runs in the scheduler, pinned to the serving cores: the workers it
    spawns start up on the launcher's cores (PDSERVE_START_CPUS), then pin themselves."""
    import subprocess
    import sys

    import pytest
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs two cores")
    code = ("import os; from pdserve.procs import widen_for_start, pin_serving; "
            "os.sched_setaffinity(0, {%d}); r = widen_for_start(); "
            "a = sorted(os.sched_getaffinity(0)); p = pin_serving(); "
            "print(sorted(r or []), a, sorted(p or []), sorted(os.sched_getaffinity(0)))"
            % allowed[0])
    start = ",".join(map(str, allowed[:2]))

    def run(**env):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, env={**os.environ, **env}, check=True)
        return out.stdout.strip()

    both, one, other = allowed[:2], [allowed[0]], [allowed[1]]
    assert run(PDSERVE_START_CPUS=start, PDSERVE_SERVING_CPUS=str(allowed[1])) == (
        f"{both} {both} {other} {other}")
    # not asked: stays where it was put
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDSERVE_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=env, check=True).stdout.strip()
    assert out == f"[] {one} [] {one}"
    # cores it may not use, or not numbers: stays, no error
    assert run(PDSERVE_START_CPUS="4096") == f"[] {one} [] {one}"
    assert run(PDSERVE_START_CPUS="x") == f"[] {one} [] {one}"
