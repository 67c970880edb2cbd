"""What a finished request's report teaches the scheduler: its measured TTFT and TPOT
against the predictions it was placed with (`pdserve_scheduler_prediction_error`), and the
samples the latency book learns from (the first token's fixed part, the handoff by load,
the KV transfer, the decode stream's TPOT error). No I/O beyond the metrics it exports.
"""

from __future__ import annotations

import logging
import math

from scheduler import metrics as SM
from scheduler.models import LatencyBook, handoff_s
from scheduler.state import Booking, Worker

log = logging.getLogger(__name__)


def forget_worker(worker_id: str) -> None:
    """Drop a worker's learned-part gauges (it left, or expired)."""
    for g, labels in ((SM.SCHED_FIRST_OVER, (worker_id, "remote")),
                      (SM.SCHED_FIRST_OVER, (worker_id, "local")),
                      (SM.SCHED_LOCAL_SLOW, (worker_id,))):
        try:
            g.remove(*labels)
        except KeyError:
            pass


def learn_from_report(book: LatencyBook, b: Booking, r, decode: Worker | None,
                      long_from_s: float = math.inf) -> None:
    """`r`: the frontend's ReportRequest for booking `b`; `decode`: its decode worker, if
    still registered; `long_from_s`: a local prefill whose engine part was predicted at
    this or more is long (LatencyBook.local_slow): how far it ran over is a factor of its
    length, which the first token's fixed part does not learn."""
    err = SM.SCHED_PRED_ERROR
    if r.ttft_ms > 0 and b.pred_ttft_s > 0:
        err.labels("ttft").observe(b.pred_ttft_s * 1e3 / r.ttft_ms - 1)
    if r.tpot_ms > 0 and b.pred_tpot_s > 0:
        err.labels("tpot").observe(b.pred_tpot_s * 1e3 / r.tpot_ms - 1)
    ready_ms = r.ttft_ms - r.first_held_ms     # until the prefilling worker computed it
    if ready_ms > 0 and b.pred_ttft_s > 0:
        raw = b.pred_ttft_s - b.pred_handoff_s - b.pred_first_over_s
        who, kind = (b.prefill, "remote") if b.prefill is not None else (b.decode, "local")
        # a local prefill's residual is the fixed part only where its engine part was
        # short. A long one runs over by a share of its length (the prompts and streams
        # that land beside it), which local_slow learns: taken as a fixed part too, the
        # long ones' 0.2-0.5 s put a 35-token prompt on an idle decode engine at 345 ms,
        # the remote option at 170 (docs/benchmarks.md, m133)
        if kind == "remote" or raw - b.held_s < long_from_s:
            book.observe_first(who, kind, ready_ms / 1e3 - raw)
        if kind == "local":
            book.observe_local(b.decode, raw - b.held_s,      # its engine part, no hold
                               ready_ms / 1e3 - b.held_s - b.pred_first_over_s)
            SM.SCHED_LOCAL_SLOW.labels(b.decode).set(book.local_slow(b.decode, long_from_s))
        SM.SCHED_FIRST_OVER.labels(who, kind).set(book.first_over_s(who, kind))
    if r.ttft_ms > r.first_held_ms > 0 and b.pred_ttft_s > b.pred_handoff_s > 0:
        # a kept first token: its TTFT in two parts, until the prefill worker computed it
        # (`ready`) and the handoff to the decode engine's first token
        ready = b.pred_ttft_s - b.pred_handoff_s
        err.labels("ready").observe(ready * 1e3 / ready_ms - 1)
        err.labels("handoff").observe(b.pred_handoff_s * 1e3 / r.first_held_ms - 1)
        log.debug("kept first token %s: ready %.0f ms (predicted %.0f), handoff %.0f ms "
                  "(predicted %.0f), %d streams on %s when chosen", b.booking_id, ready_ms,
                  ready * 1e3, r.first_held_ms, b.pred_handoff_s * 1e3, b.decode_streams,
                  b.decode)
    if r.tpot_ms > 0 and b.pred_tpot_s > 0 and b.prefill is not None:
        book.observe_tpot(b.decode, b.pred_tpot_s, r.tpot_ms / 1e3)
    # a first token the frontend kept: its stream's TPOT from when it was ready
    tpot = r.tpot_ms + r.first_held_ms / max(1, r.output_tokens - 1)
    extra = handoff_s(r.first_gap_ms, tpot, r.output_tokens)
    waited = handoff_s(r.first_gap_ms, tpot, r.output_tokens, stalls=True)
    nbytes = decode.kv_bytes_per_token * b.prompt_tokens if decode is not None else 0
    if waited is not None and decode is not None:      # its tail, stalls included
        book.observe_handoff(b.decode, nbytes, waited,
                             b.decode_streams if b.decode_streams >= 0 else None)
    if extra is not None and decode is not None:       # what the client waited for the KV
        SM.SCHED_HANDOFF.observe(extra)
        book.observe_transfer(b.decode, nbytes, extra)
    elif r.kv_bytes and r.kv_seconds > 0:
        book.observe_transfer(b.decode, r.kv_bytes, r.kv_seconds)
