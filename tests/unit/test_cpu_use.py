"""bench.cpu_use: who a process is, CPU seconds between two readings, and a real reading
of a child process that burned a known amount of CPU."""

import os
import subprocess
import sys

from bench.cpu_use import _worker_id, idle_report, report, role, snapshot, usage


def test_role_from_command_line():
    py = "/repo/.venv/bin/python -m "
    assert role("VLLM::EngineCore") == "engine"
    assert role("VLLM::Worker") == "engine"
    assert role(py + "pdserve.cli frontend --model m --host 127.0.0.1") == "frontend"
    assert role(py + "pdserve.cli scheduler --port 5") == "scheduler"
    assert role(py + "pdserve.cli decode --worker-id decode-0") == "worker"
    assert role(py + "pdserve.cli prefill --worker-id prefill-0") == "worker"
    assert role(py + "pdserve.cli serve --port 8000") == "launcher"
    assert role(py + "vllm.entrypoints.openai.api_server --model m") == "api-server"
    assert role(py + "bench.proxy --port 1 --mode least-outstanding") == "proxy"
    assert role("/usr/bin/sleep 10") == "other"
    assert role(py + "pdserve.cli frontend", client=True) == "client"
    # an engine is named after the worker that started it
    assert _worker_id(py + "pdserve.cli decode --worker-id decode-0 --cores 1") == "decode-0"
    assert _worker_id(py + "pdserve.cli frontend --port 1") == ""


def test_usage_counts_what_each_thread_spent_between_the_readings():
    eng, fe = "VLLM::EngineCore", "python -m pdserve.cli frontend"
    before = {(10, 10): (eng, "VLLM::EngineCor", 5.0, 1.0, 0),
              (20, 20): (fe, "python", 1.0, 0.0, 0),
              (20, 21): (fe, "event_engine", 0.5, 0.0, 0),
              (30, 30): ("python -m x", "python", 2.0, 0.0, 0)}
    after = {(10, 10): (eng, "VLLM::EngineCor", 9.0, 1.5, 0),
             (20, 20): (fe, "python", 1.25, 0.25, 0),
             (20, 21): (fe, "event_engine", 0.75, 0.0, 0),
             (20, 22): (fe, "grpc_new", 0.5, 0.125, 0),     # began between the readings
             (30, 30): ("python -m x", "python", 3.0, 0.0, 0)}
    u = usage(before, after, client=30)
    assert u["roles"] == {"engine": 4.0, "frontend": 1.0, "client": 1.0}
    assert list(u["roles"])[0] == "engine"                # most first
    assert u["waits"] == {"engine": 0.5, "frontend": 0.375, "client": 0.0}
    assert [p[:3] for p in u["procs"]] == [[4.0, 10, "engine"], [1.0, 20, "frontend"],
                                           [1.0, 30, "client"]]
    assert u["procs"][0][4] == 0.5
    assert u["threads"][0] == [4.0, 10, "VLLM::EngineCor", 0.5, 0]   # no switches between
    assert [0.5, 20, "grpc_new", 0.125, 0] in u["threads"]
    text = report("pdserve", 4.0, 2, u)
    assert "6.0 CPU s over 4.0 s on 2 cores (75% of them)" in text
    assert "engine         4.00 s   66.7%   waited for a CPU   0.50 s" in text
    assert "4.00 s, waited   0.50 s       10 VLLM::EngineCore" in text


def test_snapshot_reads_a_child_that_burned_cpu():
    burn = ("import sys, time\n"
            "while time.process_time() < 0.3:\n    pass\n"
            "print('done', flush=True)\nsys.stdin.read()\n")
    p = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "done"
        s = snapshot(os.getpid())
        mine = [v for (pid, _tid), v in s.items() if pid == p.pid]
        assert mine, "the child is under this process"
        assert sum(cpu for _cmd, _name, cpu, _wait, _sw in mine) >= 0.25   # whole ticks
        assert all(wait >= 0 and sw >= 1 for *_x, wait, sw in mine)
        assert "-c" in mine[0][0]
        u = usage({}, s, client=os.getpid())
        assert u["roles"]["client"] > 0 and u["roles"]["other"] >= 0.25
    finally:
        p.stdin.close()
        p.wait(timeout=30)


def test_idle_report_counts_wake_ups_per_role_and_thread():
    """Context switches between two readings: per role, and the threads that woke most
    (one name's threads of one process summed), as rates over the window."""
    eng, fe = "VLLM::EngineCore", "python -m pdserve.cli frontend"
    before = {(10, 11): (eng, "gloo_tcp_loop", 1.0, 0.0, 100),
              (10, 12): (eng, "gloo_tcp_loop", 1.0, 0.0, 100),
              (10, 13): (eng, "VLLM::EngineCor", 5.0, 0.0, 50),
              (20, 20): (fe, "python", 1.0, 0.0, 7)}
    after = {(10, 11): (eng, "gloo_tcp_loop", 1.02, 0.0, 1090),
             (10, 12): (eng, "gloo_tcp_loop", 1.02, 0.0, 1090),
             (10, 13): (eng, "VLLM::EngineCor", 5.0, 0.0, 60),
             (20, 20): (fe, "python", 1.1, 0.0, 1107)}
    u = usage(before, after, client=99)
    assert u["switches"] == {"engine": 1990, "frontend": 1100}
    text = idle_report("pdserve", 10.0, u)
    assert "engine       0.40% of a core       199 wake-ups/s" in text
    assert "frontend     1.00% of a core       110 wake-ups/s" in text
    lines = text.splitlines()
    first = lines.index("   threads that wake most:") + 1
    assert lines[first].split()[:1] == ["198/s"] and lines[first].endswith("gloo_tcp_loop")
