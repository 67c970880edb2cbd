"""Fit pdserve's step model to a GPU's steps, and see what it makes of them.

    python3 -m bench.gpu_step_fit                       # on a machine with a CUDA GPU
    python3 -m bench.gpu_step_fit --device cpu --shapes smollm2-135m --quick   # a smoke run

The scheduler predicts every engine from six fitted coefficients (pdserve/latency.py),
with nothing tuned to a machine. This checks that claim where pdserve's CPU hosts cannot:
it times forward passes of models shaped like the bundled one (SmolLM2-135M) and like an
8B Llama, random bf16 weights, with Hugging Face's eager forward (no vLLM: its GPU build
cannot be installed where this runs, so a step's fixed part here is an eager engine's,
without CUDA graphs), as prefill steps of k prompts of n tokens and decode steps of b
sequences over c context tokens. It feeds them to `StepModel` as an engine's steps,
prints the coefficients, the fit's error on the steps, and what the rules built on it
decide there: the engine's packing floor (pdserve/step_budget.py `packing_floor`) and how
many short prompts late binding lets join one prefill step (scheduler/holding.py `join`),
beside the same for the CPU coefficients given by --cpu-coef.
"""

from __future__ import annotations

import argparse
import statistics
import time

from pdserve.latency import STEP_FEATURES, Coef, OnlineLinear, StepModel, StepSample, chunk_attn
from pdserve.step_budget import OVERHEAD, packing_floor
from scheduler.holding import join

SHAPES = {  # LlamaConfig fields
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         vocab_size=49152, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     vocab_size=128256),
}


def timed(fn, device: str, reps: int) -> float:
    """Median seconds of `fn()` over `reps` runs after one warm-up."""
    import torch
    fn()
    out = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def steps(shape: str, device: str, quick: bool, reps: int) -> list[StepSample]:
    import torch
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).eval()
    vocab = cfg.vocab_size
    out: list[StepSample] = []
    prefills = [(1, 16), (1, 64), (4, 64), (2, 256)] if quick else \
        [(k, n) for k in (1, 2, 4, 8, 16) for n in (16, 64, 256, 1024) if k * n <= 8192]
    decodes = [(1, 64), (4, 256)] if quick else \
        [(b, c) for b in (1, 8, 32, 128) for c in (128, 1024, 4096) if b * c <= 131072]
    with torch.inference_mode():
        for k, n in prefills:
            ids = torch.randint(0, vocab, (k, n), device=device)
            s = timed(lambda ids=ids: model(ids, use_cache=False, logits_to_keep=1), device, reps)
            out.append(StepSample(s, k * n, k * chunk_attn(n, 0)))
        for b, c in decodes:
            cache = DynamicCache()
            model(torch.randint(0, vocab, (b, c), device=device), past_key_values=cache,
                  use_cache=True, logits_to_keep=1)
            one = torch.randint(0, vocab, (b, 1), device=device)
            s = timed(lambda one=one, cache=cache: model(one, past_key_values=cache,
                                                          use_cache=True), device, reps)
            out.append(StepSample(s, decode_seqs=b, decode_ctx=b * c))
    return out


def packs(coef: Coef, prompt: int, cap: int) -> int:
    """Prompts of `prompt` tokens that `join` lets share one step, one joining at a time
    (no TTFT SLO binding: every due is far)."""
    step = min(cap, packing_floor(coef, OVERHEAD, cap))
    k = 1
    while join(0.0, k * prompt, [1e9] * k, prompt, coef, step) is not None:
        k += 1
    return k


def fitted(samples: list[StepSample]) -> Coef:
    fit = StepModel(mixed=False)
    for _ in range(3):          # the online fit weighs recent steps; three passes
        for s in samples:
            fit.observe(s)
    return Coef.of(fit.coef())


def decode_term_error(samples: list[StepSample]) -> str:
    """The same weighted fit with one more feature, 1 in a step with decode sequences (a
    decode step's fixed part of its own): its median and worst relative error."""
    fit = OnlineLinear(len(STEP_FEATURES) + 1)
    rows = [(s.features() + [1.0 if s.decode_seqs else 0.0], s.seconds) for s in samples]
    for _ in range(3):
        for x, y in rows:
            fit.observe(x, y, 1.0 / max(y, 1e-4) ** 2)
    errs = [abs(fit.predict(x) - y) / y for x, y in rows]
    return (f"median |error| {statistics.median(errs):.1%}, worst {max(errs):.1%}, "
            f"that term {fit.coef()[-1] * 1e3:.3f} ms")


def report(label: str, coef: Coef, samples: list[StepSample] | None, cap: int,
           verbose: bool = True, packing: bool = True) -> None:
    print(f"== {label}")
    print(f"  step {coef.step * 1e3:.3f} ms, prefill {coef.prefill_ktok * 1e3:.3f} ms/ktok, "
          f"attention {coef.prefill_attn_mtok2 * 1e3:.3f} ms/Mtok^2, decode "
          f"{coef.decode_seq * 1e3:.3f} ms/seq + {coef.decode_ctx_10ktok * 1e3:.3f} ms/10ktok")
    if samples:
        errs = [abs(coef.step_time(s.prefill_tokens, s.prefill_attn, s.decode_seqs,
                                   s.decode_ctx) - s.seconds) / s.seconds for s in samples]
        print(f"  fit on its {len(samples)} steps: median |error| "
              f"{statistics.median(errs):.1%}, worst {max(errs):.1%}")
        if verbose:
            print("    step: prompt tokens, decode seqs, context -> measured, predicted ms")
        for s, e in zip(samples, errs if verbose else []):
            guess = coef.step_time(s.prefill_tokens, s.prefill_attn, s.decode_seqs,
                                   s.decode_ctx)
            print(f"    {s.prefill_tokens:6d} {s.decode_seqs:4d} {s.decode_ctx:7d} -> "
                  f"{s.seconds * 1e3:8.2f} {guess * 1e3:8.2f}  ({e:.0%})")
    if not packing:
        return
    print(f"  packing floor (a step's fixed part at most {OVERHEAD:.0%} of it): "
          f"{packing_floor(coef, OVERHEAD, cap)} tokens (cap {cap})")
    print("  prompts that late binding lets share one prefill step: "
          + ", ".join(f"{packs(coef, n, cap)} of {n} tokens" for n in (16, 64, 256, 1024)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shapes", default="smollm2-135m,llama-8b")
    ap.add_argument("--quick", action="store_true", help="a few small steps (smoke run)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cap", type=int, default=8192, help="the engine's batched-token cap")
    ap.add_argument("--cpu-coef", default="0.057,0.52",
                    help="a CPU engine's step (s) and prefill (s/ktok) for comparison")
    ns = ap.parse_args()
    for shape in ns.shapes.split(","):
        samples = steps(shape, ns.device, ns.quick, ns.reps)
        report(f"{shape} on {ns.device}", fitted(samples), samples, ns.cap)
        print(f"  with a decode-step term: {decode_term_error(samples)}")
        # each pool's engine sees its own kind of step: fit each kind on its own
        for kind, some in (("prefill steps only (a prefill engine)",
                            [s for s in samples if s.prefill_tokens]),
                           ("decode steps only (a decode engine)",
                            [s for s in samples if s.decode_seqs])):
            report(f"{shape} on {ns.device}, {kind}", fitted(some), some, ns.cap,
                   verbose=False, packing="prefill" in kind)
    step, ktok = (float(x) for x in ns.cpu_coef.split(","))
    report("CPU coefficients given (--cpu-coef)", Coef(step=step, prefill_ktok=ktok), None,
           2048)


if __name__ == "__main__":
    main()
