"""Shared by the adaptive placement tests (tests/unit/test_adaptive.py,
tests/unit/test_overflow.py, tests/unit/test_first_token.py): an engine's fit, workers
and a warm latency book."""

from pdserve.latency import Coef, StepSample, chunk_attn
from scheduler import adaptive as A
from scheduler.models import LatencyBook
from scheduler.policy import PlacementConfig
from scheduler.state import Load, Worker

# an engine: 4 ms per step, 1 s per 1,000 prompt tokens, 2 ms per decode sequence
C = Coef(step=0.004, prefill_ktok=1.0, prefill_attn_mtok2=0.0, decode_seq=0.002,
         decode_ctx_10ktok=0.001)
# placement under test; where the first token goes is tests/unit/test_first_token.py's
SLO = A.SLO(ttft_s=3.0, tpot_s=0.1, first_token="early")
CFG = PlacementConfig()


def W(wid, role, **load):
    load.setdefault("num_blocks", 1000)
    load.setdefault("max_num_seqs", 32)
    load.setdefault("max_num_batched_tokens", 4096)
    return Worker(wid, role, f"a-{wid}", f"g-{wid}", "m", "h", 0.0, Load(**load),
                  block_size=16, kv_bytes_per_token=1000)


def warm_book(*ids, coef=C):
    """A latency book whose workers' engines ran the steps `coef` describes."""
    b = LatencyBook()
    for wid in ids:
        steps = [StepSample(coef.step_time(p, chunk_attn(p, 0), d, d * 500), p,
                            chunk_attn(p, 0), d, d * 500)
                 for p, d in ((512, 0), (1024, 0), (0, 1), (0, 4), (0, 8), (256, 4),
                              (128, 0), (0, 2))]
        b.observe_steps(wid, "m", steps * 3, now=10.0)
    return b


def no_cache(ws):
    return {}
