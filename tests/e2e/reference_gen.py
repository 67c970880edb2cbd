"""Ground truth: one colocated vLLM engine (no connector), same model, dtype, thread count.

    python -m tests.e2e.reference_gen --model DIR --cores 1 --log FILE

A long-lived server, so the suite starts one such engine per configuration rather than one
per test module: each line on stdin is a request, each answer one line on the stdout it was
started with (the engine's own output goes to FILE).
request: {"max_tokens": N, "prompts": [[token ids], ...], "sampling": [{...}, ...]}
("sampling", optional: more vLLM SamplingParams per prompt, e.g. a logit_bias)
answer: {"outputs": [{"token_ids": [...], "text": "...", "prompt_logprobs": ...}, ...]}
or {"error": "..."}. Prompts run one at a time on an empty prefix cache, as a fresh engine
would run them.
"""

import argparse
import asyncio
import json
import os
import sys

from pdserve.config import EngineConfig
from pdserve.engine import build_engine


async def generate(eng, req: dict) -> list[dict]:
    from vllm import SamplingParams

    out = []
    extra = req.get("sampling") or [{}] * len(req["prompts"])
    for i, ids in enumerate(req["prompts"]):
        kw = dict(extra[i])
        if kw.get("logit_bias"):      # JSON keys are strings
            kw["logit_bias"] = {int(k): v for k, v in kw["logit_bias"].items()}
        if kw.get("structured_outputs"):
            from vllm.sampling_params import StructuredOutputsParams
            kw["structured_outputs"] = StructuredOutputsParams(**kw["structured_outputs"])
        sp = SamplingParams(**{"max_tokens": req["max_tokens"], "temperature": 0.0, **kw})
        await eng.reset_prefix_cache()
        final_ids, text, plps = [], "", None
        async for o in eng.generate({"prompt_token_ids": ids}, sp, f"ref-{os.urandom(6).hex()}"):
            final_ids = list(o.outputs[0].token_ids)
            text = o.outputs[0].text
            plps = plps or o.prompt_logprobs
        res = {"token_ids": final_ids, "text": text}
        if plps:   # per prompt token: its logprob and the top ids by rank
            res["prompt_logprobs"] = [None] + [
                {"logprob": d[t].logprob,
                 "top": [k for k, v in sorted(d.items(), key=lambda kv: kv[1].rank)
                         if v.rank <= kw["prompt_logprobs"]]}
                for t, d in zip(ids[1:], plps[1:])]
        out.append(res)
    return out


async def serve(ns, answers) -> None:
    cfg = EngineConfig(model=ns.model, dtype=ns.dtype, cpu_cores=ns.cores,
                       kv_cache_bytes=256 << 20,
                       max_model_len=ns.max_model_len, block_size=ns.block_size,
                       **({"max_num_batched_tokens": ns.max_num_batched_tokens}
                          if ns.max_num_batched_tokens else {}))
    eng = build_engine(cfg, None, None)
    loop = asyncio.get_running_loop()
    try:
        answers.write(json.dumps({"ready": True}) + "\n")
        answers.flush()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            try:
                ans = {"outputs": await generate(eng, json.loads(line))}
            except Exception as e:     # noqa: BLE001 - the test that asked sees it
                ans = {"error": f"{type(e).__name__}: {e}"}
            answers.write(json.dumps(ans) + "\n")
            answers.flush()
    finally:
        eng.shutdown()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--cores", default="1")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-batched-tokens", type=int, default=0)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--dtype", default="float32")   # as the tests' clusters (conftest.py)
    ap.add_argument("--log", required=True)
    ns = ap.parse_args()
    # answers on the stdout we were given; everything else (ours, the engine's, its
    # children's) to the log
    answers = os.fdopen(os.dup(1), "w")
    logf = open(ns.log, "a")
    os.dup2(logf.fileno(), 1)
    os.dup2(logf.fileno(), 2)
    asyncio.run(serve(ns, answers))
