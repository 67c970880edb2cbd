"""Ground truth: one colocated vLLM engine (no connector), same model, dtype, thread count.

    python tests/e2e/reference_gen.py --model DIR --cores 1 --inp req.json --out out.json
req.json: {"max_tokens": N, "prompts": [[token ids], ...], "sampling": [{...}, ...]}
("sampling", optional: more vLLM SamplingParams per prompt, e.g. a logit_bias)
"""

import argparse
import asyncio
import json

from pdserve.config import EngineConfig
from pdserve.engine import build_engine


async def run(ns) -> None:
    from vllm import SamplingParams

    req = json.load(open(ns.inp))
    cfg = EngineConfig(model=ns.model, cpu_cores=ns.cores, kv_cache_bytes=256 << 20,
                       max_model_len=ns.max_model_len, block_size=ns.block_size,
                       **({"max_num_batched_tokens": ns.max_num_batched_tokens}
                          if ns.max_num_batched_tokens else {}))
    eng = build_engine(cfg, None, None)
    out = []
    try:
        extra = req.get("sampling") or [{}] * len(req["prompts"])
        for i, ids in enumerate(req["prompts"]):
            kw = dict(extra[i])
            if kw.get("logit_bias"):      # JSON keys are strings
                kw["logit_bias"] = {int(k): v for k, v in kw["logit_bias"].items()}
            if kw.get("structured_outputs"):
                from vllm.sampling_params import StructuredOutputsParams
                kw["structured_outputs"] = StructuredOutputsParams(**kw["structured_outputs"])
            sp = SamplingParams(max_tokens=req["max_tokens"], temperature=0.0, **kw)
            final_ids, text, plps = [], "", None
            async for o in eng.generate({"prompt_token_ids": ids}, sp, f"ref-{i}"):
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
    finally:
        eng.shutdown()
    json.dump(out, open(ns.out, "w"))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--cores", default="1")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-batched-tokens", type=int, default=0)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--inp", required=True)
    ap.add_argument("--out", required=True)
    asyncio.run(run(ap.parse_args()))
