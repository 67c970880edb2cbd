import os
import random
import re
import subprocess
import time
import warnings

import pytest

from pdserve.models import build_tiny_model
from tests.e2e.cluster import close_references, start_cluster, start_zygote, stop_cluster_proc


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session", autouse=True)
def _reference_engines():
    """The ground-truth engines `reference()` starts live for the session; stop them."""
    yield
    close_references()


@pytest.fixture(scope="session", autouse=True)
def _vllm_sockets(tmp_path_factory):
    """vLLM's ZMQ sockets of every engine the session starts (its clusters' and the ground
    truth's) in the session's folder, not the system's temporary folder: an engine killed
    on purpose leaves its sockets behind."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_RPC_BASE_PATH", str(tmp_path_factory.mktemp("zmq")))
        yield


@pytest.fixture(scope="session", autouse=True)
def _zygote(tmp_path_factory):
    """Every cluster of the session forks its processes from one zygote that imported
    vLLM once (pdserve/zygote.py): about 10 s less per cluster start.
    PDSERVE_TEST_ZYGOTE=0 starts them as new interpreters (comparisons)."""
    if os.environ.get("PDSERVE_TEST_ZYGOTE", "1") == "0":
        yield
        return
    try:
        proc, sock = start_zygote(tmp_path_factory.mktemp("zygote"))
    except Exception as e:      # an accelerator; its own tests: tests/component/test_zygote.py
        warnings.warn(f"no zygote, clusters start new interpreters: {e}", stacklevel=2)
        yield
        return
    os.environ["PDSERVE_ZYGOTE"] = sock
    yield
    os.environ.pop("PDSERVE_ZYGOTE", None)
    stop_cluster_proc(proc)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0))


KV = ["--policy", "kv"]      # prefill on a prefill worker, every request


# Greedy output is compared with colocated vLLM token for token, and requests share engine
# steps with other requests. In bfloat16 (dtype auto on an AVX512-BF16 host) a step's
# numbers depend on what else is in it, and greedy paths part at near-ties (measured: the
# batched and n > 1 parity tests failed there, at every commit); float32 does not.
TEST_DTYPE = ["--dtype", "float32"]


def serving(model, tmp_path_factory, name: str, env: dict | None = None,
            extra: list[str] | None = None):
    """A fixture body: a cluster `pdserve serve ...extra` logging to `<name>.log`; after its
    tests, the launcher must exit 0 and leave no process behind. `yield from` it."""
    c = start_cluster(model, tmp_path_factory.mktemp("logs") / f"{name}.log", env=env,
                      extra=[*TEST_DTYPE, *(extra or [])])
    yield c
    rc = stop_cluster_proc(c.proc)
    assert rc == 0, f"launcher exited {rc}; see {c.log_path}"
    assert_no_orphans(c.log_path)
    # every answer the frontend sent fit vLLM's response models (frontend/responses.py)
    assert "does not fit vLLM's" not in c.log_path.read_text(), c.log_path


@pytest.fixture(scope="session")
def cluster(tiny_model, tmp_path_factory):
    # every request disaggregated: the tests sharing this cluster check the transfer path,
    # and the adaptive choice may prefill a prompt on an idle decode worker instead (its
    # own tests are in test_adaptive.py)
    # (and requests may bring their own chat template, as a vLLM server with the same flag:
    # test_vllm_server_parity.py compares them)
    # Every first token sent as soon as the prefill worker computes it (--first-token
    # early): the greedy, streaming, stop-string and hang-up tests here go through that
    # path; the other modules' clusters keep it for the stream, as the defaults do.
    yield from serving(tiny_model, tmp_path_factory, "cluster",
                       extra=[*KV, "--trust-request-chat-template",
                              "--first-token", "early"])


@pytest.fixture(scope="session")
def cond_cluster(tiny_model, tmp_path_factory):
    """Conditional disaggregation (prompts of at most 64 uncached tokens are prefilled on
    the decode worker) with vLLM's deepseek_v3 reasoning parser on: test_conditional.py
    and test_reasoning.py share it. The parser changes nothing for a request that does not
    ask for thinking, so the conditional tests compare their greedy output with `cluster`
    as before."""
    yield from serving(tiny_model, tmp_path_factory, "conditional",
                       extra=["--reasoning-parser", "deepseek_v3",
                              "--local-prefill-max-tokens", "64"])


def assert_no_orphans(log_path, settle_s: float = 15.0) -> None:
    """No child of the launcher, nor anything in a child's process group, survives it.

    A process SIGKILLed a moment ago may still be exiting (an engine frees gigabytes of
    mlocked KV cache): it gets `settle_s` to finish."""
    text = log_path.read_text()
    pids = {int(p) for p in re.findall(r"started \S+ \(pid (\d+)\)", text)}
    pids |= {int(p) for p in re.findall(r"local: started \S+ on core \S+ \(pid (\d+)\)",
                                        text)}
    assert pids, "launcher log names no children"
    deadline = time.monotonic() + settle_s
    while True:
        out = subprocess.run(["ps", "-eo", "pid=,pgid=,stat=,args="], capture_output=True,
                             text=True).stdout
        # zombies are skipped: they hold nothing, and a container's PID 1 may never reap them
        left = [ln for ln in out.splitlines()
                if ln.split() and not ln.split()[2].startswith("Z")
                and (int(ln.split()[0]) in pids or int(ln.split()[1]) in pids)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not left, f"orphans: {left}"


def words(n: int, seed: int) -> str:
    """A prompt of exactly n tokens for the tiny word-level tokenizer."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(900)] + ["the", "paris", "fox", "decode", "prefill"]
    return " ".join(rng.choice(vocab) for _ in range(n))


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from frontend.app import Tokenizer
    return Tokenizer(tiny_model)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
