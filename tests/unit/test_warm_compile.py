"""`warm_compiled_ops` (the zygote's warm-up, pdserve/engine.py): a process forked after it
runs vLLM's compiled sampler kernel, as an engine at one core calls it, without compiling
it again: for any batch size and another vocabulary size."""

import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import os, sys
    import torch
    from pdserve.engine import warm_compiled_ops
    from vllm.v1.sample.ops.logprobs import batched_count_greater_than

    if sys.argv[1] == "warm":
        warm_compiled_ops()
    assert torch.get_num_threads() == {threads}, "the thread count is left as it was"
    pid = os.fork()
    if pid == 0:
        torch.set_num_threads(1)             # an engine core at one core
        torch._dynamo.config.error_on_recompile = True
        code = 0
        try:
            with torch.inference_mode():
                for n, vocab in ((1, 49152), (5, 49152), (3, 320)):
                    x = torch.randn(n, vocab)
                    ids = torch.randint(0, vocab, (n, 1))
                    picked = x.gather(-1, ids)
                    torch._dynamo.decorators.mark_unbacked(x, 0)
                    torch._dynamo.decorators.mark_unbacked(picked, 0)
                    got = batched_count_greater_than(x, picked)
                    assert got.tolist() == (x >= picked).sum(-1).tolist()
        except Exception as e:
            print(type(e).__name__, e)
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    sys.exit(os.waitstatus_to_exitcode(status))
""")


def start(mode: str) -> subprocess.Popen:
    threads = 2 if (os.cpu_count() or 1) >= 2 else 1
    return subprocess.Popen([sys.executable, "-c", CHILD.format(threads=threads), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def test_a_forked_process_runs_the_warmed_kernel_without_compiling():
    # and the check can fail: without the warm-up the forked process compiles (the two at
    # once, one per core)
    warm, cold = start("warm"), start("cold")
    out, err = warm.communicate(timeout=300)
    assert warm.returncode == 0, out + err[-3000:]
    out, err = cold.communicate(timeout=300)
    assert cold.returncode == 3 and "recompil" in out.lower(), out + err[-3000:]
