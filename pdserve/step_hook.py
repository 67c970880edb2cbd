"""Inside vLLM's engine core: time every step, fit the engine's step model, hold prefill
chunks to the running streams' TPOT allowance, and send each step to the worker process.

Installed by pdserve's vLLM plugin (pdserve/vllm_plugin.py) when PDSERVE_STEP_HOOK=1,
which pdserve sets for its own engines only. It wraps two methods of vLLM's v1
`Scheduler`:
- `schedule`: first the budget (pdserve/step_budget.py): with decode streams running, the
  step's token budget becomes streams + the prompt tokens their allowance leaves + what
  the waiting remote-prefilled requests need to start (`max_num_scheduled_tokens`), and
  the prompts being computed share the allowance's tokens
  (`long_prefill_token_threshold`); vLLM's own chunked prefill does the rest. With no
  stream and several prompts queued, the budget is the head prompt's remaining tokens
  (`fcfs_tokens`): prompts end in arrival order instead of all at the end of one packed
  step. Remote-prefilled requests go first in the waiting queue (`_landing_first`), and
  the steps that start one (its KV load, its last prompt tokens) carry no prompt chunk
  where a chunk would make them longer than an SLO-sized step (`_handoff_step`). Then
  what the step computes: prompt tokens and their attention work, decode sequences and
  their context (pdserve/latency.py's features).
- `update_from_output`: the step is over; its wall time since `schedule` began becomes a
  `StepSample` for the engine's own fit and a datagram to the worker
  (PDSERVE_STEP_SOCKET, an abstract Unix socket; dropped when nobody reads), which
  forwards samples to the scheduler's latency model in its heartbeats.

PDSERVE_TPOT_SLO_MS is the SLO the allowance protects (0: no budget, samples only).
PDSERVE_LANDING_WAIT=1 (off by default: two A/B runs were ties, docs/design.md) and the
TTFT SLO in PDSERVE_TTFT_SLO_MS: while local prompts are computed alone, streams landing
from a prefill worker wait for them where the prompts can still end within their TTFT SLOs
and the streams start before the frontend sends their kept first token (`_defer_landing`).
PDSERVE_WHOLE_ALONE=1: a local prompt computed alone goes in whole steps where its `alone`
chunks would end after its TTFT SLO and whole steps would not (`_whole_alone`).
PDSERVE_HANDOFF_STEPS=0 turns handoff steps and `_landing_first` off (for comparisons:
bench.matrix `--variant 'pdserve-nohandoff=PDSERVE_HANDOFF_STEPS=0'`).
PDSERVE_STEP_FLOOR is the least prompt tokens a step beside streams computes
(step_budget.floor_tokens; 0: none where not one fits, a decode-only step).
PDSERVE_STEP_TRACE=FILE appends every step there as a text line (diagnosis; `%p` in the
name becomes the engine core's pid, one file per engine): seconds, prompt tokens, their
attention work, decode sequences, their context, allowance, budget, monotonic time at the
end, the prompts held back for a handoff step, 1 where every stream in the step was
late (its first token after its TTFT SLO, `_late`), and how many requests computed prompt
tokens in it (a local prompt's chunk, a landing request's last token), and the landing
requests that waited for local prompts in it (`_defer_landing`), and the cores it
borrowed (pdserve/core_share.py).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
from collections import deque

from kv_transfer.handle import P_FIRST_AT, P_REMOTE_PREFILL
from pdserve.latency import Coef, StepModel, StepSample, chunk_attn
from pdserve.config import step_switches, whole_alone as whole_alone_on
from pdserve.kept_first import release_after
from pdserve.patching import scheduled, switched_once
from pdserve.sampling import TTFT_DUE
from pdserve.step_wire import encode, unix_address
from pdserve.step_budget import (SAFETY, Budget, Stream, alone, budget, fcfs_tokens,
                                 landing_wait, late_only, left_after, overrun, whole_alone)

log = logging.getLogger("vllm.pdserve.steps")

# an engine's first steps pay lazy initialisation (measured on CPU: 2.8-3.5 s for a
# 4-token prompt, 0.16 s for the next one): they would teach the model nothing true
SKIP_FIRST = 2
REFIT = 16
MAX_HANDOFF_S = 30.0   # a first token older than this is a clock to distrust
MAX_WAITING_DECODE_TOKENS = 16   # budget one waiting remote-prefilled request adds, at most


class _State:
    def __init__(self, slo_ms: float, address: str, ttft_slo_ms: float = 0.0) -> None:
        self.slo_s = slo_ms / 1e3
        self.ttft_s = ttft_slo_ms / 1e3
        self.wait_landing = os.environ.get("PDSERVE_LANDING_WAIT", "0") == "1"
        self.whole = whole_alone_on()
        mixed, self.least, keep = step_switches()
        self.model = StepModel(mixed=mixed, keep=keep)
        self.first: dict[str, float] = {}       # req id -> when it started decoding here
        self.late: set[str] = set()             # ... whose first token missed its TTFT SLO
        self.landing: dict[tuple, float] = {}   # (req id, phase) -> when first seen
        self.handoffs = os.environ.get("PDSERVE_HANDOFF_STEPS", "1") != "0"
        self.pending: dict[int, tuple] = {}
        self.sock = None
        self.address = unix_address(address)
        self.allow, self.tokens = float("inf"), 0
        self.skip = SKIP_FIRST
        self.coef: Coef | None = None     # refitted every REFIT steps, not every step
        # slack-sized steps: measured / predicted, and what they say (step_budget.overrun,
        # taken when one is measured, not at every step); off with PDSERVE_STEP_OVERRUN=0
        # (comparisons)
        self.overruns: deque[float] = deque(maxlen=32)
        self.over = 1.0
        self.use_overrun = os.environ.get("PDSERVE_STEP_OVERRUN", "1") != "0"
        if address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.sock.setblocking(False)
        trace = os.environ.get("PDSERVE_STEP_TRACE", "").replace("%p", str(os.getpid()))
        self.trace = open(trace, "a", buffering=1) if trace else None

    def current(self) -> Coef | None:
        m = self.model
        if m.samples % REFIT == 0 or (self.coef is None and m.warm()):
            self.coef = Coef.of(m.coef()) if m.warm() else None
        return self.coef

    def send(self, sample: StepSample, allow: float, tokens: int, held: int = 0,
             waited: int = 0, borrowed: int = 0) -> None:
        """The step to the worker with the slack it left (`left_after`, with the decode
        step of the coefficients its budget used); the trace keeps the allowance the step
        was given. A step on `borrowed` cores more than the engine's is only traced."""
        coef = self.coef
        rest = (coef.decode_step(sample.decode_seqs, sample.decode_ctx) / SAFETY
                if coef is not None else 0.0)
        left = left_after(allow, sample.seconds, rest)
        if self.trace is not None:
            self.trace.write(f"{sample.seconds:.6f} {sample.prefill_tokens} "
                             f"{sample.prefill_attn:.0f} {sample.decode_seqs} "
                             f"{sample.decode_ctx} {allow:.4f} {tokens} "
                             f"{time.monotonic():.3f} {held} {int(sample.late_only)} "
                             f"{sample.prefill_seqs} {waited} {borrowed}\n")
        if self.sock is None or borrowed:
            return
        try:
            self.sock.sendto(encode(sample, left, tokens), self.address)
        except OSError:
            pass   # the worker is not reading (yet): the sample is lost, never the step


def _note_overrun(st: _State, sample: StepSample, sized: bool) -> None:
    """A slack-sized step (a prompt chunk beside streams): measured against what the
    model (as the budget used it) predicted for what it computed."""
    coef = st.coef
    if not sized or coef is None or not (sample.prefill_tokens and sample.decode_seqs):
        return
    pred = coef.step_time(sample.prefill_tokens, sample.prefill_attn, sample.decode_seqs,
                          sample.decode_ctx)
    if pred > 0:
        st.overruns.append(sample.seconds / pred)
        if st.use_overrun:
            st.over = overrun(st.overruns)


def _prefilling(r) -> bool:
    """Is the request's prompt still being computed (a prefill, not yet a stream)?"""
    return r.num_computed_tokens < r.num_prompt_tokens


def _streams(sched, st: _State, now: float) -> tuple[list[Stream], int, bool]:
    """The decode streams, their context, and whether a prompt being computed will
    decode here (a local prefill)."""
    out, ctx, local = [], 0, False
    for r in sched.running:
        if _prefilling(r):
            local = local or (r.max_tokens or 0) > 1
            continue
        t0 = st.first.get(r.request_id)
        if t0 is None:
            t0 = st.first[r.request_id] = now - _handoff_s(r)
            if _late(r):
                st.late.add(r.request_id)
        # a stream whose first token came from a prefill worker: the client counts that
        # token and the gap since it (the KV load) in its TPOT, so the allowance does too
        extra = 1 if _first_token_at(r) else 0
        out.append(Stream(now - t0, r.num_output_tokens + extra, int(r.max_tokens or 0) + extra,
                          r.request_id in st.late))
        ctx += r.num_computed_tokens
    if not local:
        local = any((r.max_tokens or 0) > 1 and _prefilling(r)
                    for r in sched.waiting)
    return out, ctx, local


def _late(r) -> bool:
    """Was the request's first token computed after its TTFT SLO? Asked when it is first
    seen decoding here: its first token came from a prefill worker then (`P_FIRST_AT`),
    or from this engine now."""
    due = _due(r)
    return due > 0 and (_first_token_at(r) or time.time()) > due


def _due(r) -> float:
    """When the request's TTFT SLO ends (`TTFT_DUE`, unix s, which the frontend sets; 0:
    no SLO)."""
    sp = getattr(r, "sampling_params", None)
    try:
        return float(((sp.extra_args if sp is not None else None) or {}).get(TTFT_DUE) or 0.0)
    except (TypeError, ValueError, AttributeError):
        return 0.0


def _first_token_at(r) -> float:
    p = getattr(r, "kv_transfer_params", None)
    try:
        return float(p.get(P_FIRST_AT) or 0.0) if isinstance(p, dict) else 0.0
    except (TypeError, ValueError):
        return 0.0


def _handoff_s(r) -> float:
    """Seconds since the client got this request's first token from a prefill worker
    (0: it did not); at most MAX_HANDOFF_S, whatever the clocks say."""
    at = _first_token_at(r)
    return min(MAX_HANDOFF_S, max(0.0, time.time() - at)) if at else 0.0


def _waiting_decodes(sched) -> int:
    """Tokens the waiting requests whose prompt KV comes from a prefill worker need this
    step: one to start their KV load (vLLM's waiting loop runs only while budget is left,
    and an async load costs none), and their last few prompt tokens once it is in.

    Without them a budget that prompt chunks use up left a remote-prefilled stream waiting
    for a local prefill on its engine to end (measured: first gaps of 1-2.6 s)."""
    need = 0
    for q in (getattr(sched, "kv_holding_waiting", ()), sched.waiting):
        for r in q:
            if _remote(r):
                left = r.num_tokens - r.num_computed_tokens if r.num_computed_tokens else 1
                need += max(1, min(MAX_WAITING_DECODE_TOKENS, left))
    return need


def _handoff_due(sched, st: "_State", now: float) -> bool:
    """Does a remote-prefilled request need this step to start its KV load, or to compute
    its last prompt tokens after it? Each of its phases (waiting to start, loading,
    loaded) counts for at most one SLO-sized step's time (SAFETY * SLO) from when it was
    first seen: a load that takes longer (a slow or dying peer), or a request vLLM cannot
    admit yet (no free KV blocks, which the held prompts may be holding), no longer holds
    the prompts back."""
    due, seen = False, {}
    window = SAFETY * st.slo_s
    for q in (getattr(sched, "kv_holding_waiting", ()), sched.waiting):
        for r in q:
            if not _remote(r):
                continue
            key = (r.request_id, getattr(getattr(r, "status", None), "name", ""),
                   r.num_computed_tokens > 0)
            t0 = seen[key] = st.landing.get(key, now)
            due = due or now - t0 < window
    st.landing = seen
    return due


def _remote(r) -> bool:
    p = getattr(r, "kv_transfer_params", None)
    return isinstance(p, dict) and bool(p.get(P_REMOTE_PREFILL))


def _whole_alone(sched, st: "_State", b: Budget, cap: int) -> Budget:
    """`b` with no chunk limit where the head local prompt, computed alone, would end
    after its TTFT SLO in `alone` chunks and would not in whole steps (PDSERVE_WHOLE_ALONE=1,
    step_budget.whole_alone)."""
    for r in itertools.chain(sched.running, sched.waiting):
        if _prefilling(r) and (r.max_tokens or 0) > 1 and not _remote(r):
            left, due = r.num_prompt_tokens - r.num_computed_tokens, _due(r)
            if due > 0 and whole_alone(st.current(), left, r.num_computed_tokens, b.tokens,
                                       due - time.time(), cap):
                return Budget(b.allow_s, 0)
            return b
    return b


def _landing_first(sched) -> None:
    """Remote-prefilled requests go to the front of vLLM's waiting queue: their prompt
    was computed elsewhere, they need a token to start their KV load and their last
    prompt tokens after it, and behind local prompts they would wait for every one of
    those prompts to be admitted first. A priority queue (vLLM's `--scheduling-policy
    priority`) keeps its own order."""
    q = sched.waiting
    if not isinstance(q, deque):
        return
    first = [r for r in q if _remote(r)]
    if first and any(not _remote(r) for r in itertools.islice(q, len(first))):
        q.remove_requests(first)
        q.prepend_requests(reversed(first))


def _defer_landing(sched, st: "_State", streams: list) -> list:
    """Take out of vLLM's waiting queue, for this step, the remote-prefilled requests that
    have not started their KV load, while the engine computes local prompts with no stream
    that has an SLO left beside them: they wait until the prompts that can still end
    within their TTFT SLOs alone have (`step_budget.landing_wait`), as long as each still
    starts, after the step in progress and its own first step, before the frontend sends
    its kept first token anyway (`release_after` its TTFT SLO). `_put_back` returns them.

    Without it a stream that landed took the prompt's steps: beside it the prompt went
    at the floor, a few tokens a step, and missed its TTFT SLO (a 1,024-token prompt at
    1.9 s against 1.28, beside two short streams whose own TTFTs had a second to spare)."""
    coef, q = st.coef, sched.waiting
    if (not st.wait_landing or coef is None or st.slo_s <= 0 or st.ttft_s <= 0
            or not isinstance(q, deque) or any(not s.late for s in streams)):
        return []
    landing = [r for r in q if _remote(r) and r.num_computed_tokens == 0 and _due(r) > 0]
    prompts = [(r.num_prompt_tokens - r.num_computed_tokens, r.num_computed_tokens, _due(r))
               for r in sched.running if _prefilling(r) and (r.max_tokens or 0) > 1]
    if not landing or not prompts:
        return []
    until = landing_wait(prompts, time.time(), coef, st.slo_s, st.over)
    if until == float("-inf"):     # no prompt that can still make its SLO
        return []
    lead = alone(coef, st.slo_s)[0] + coef.decode_step(len(streams) + 1, 0)
    gap = st.ttft_s - release_after(st.ttft_s)
    wait = [r for r in landing if until + lead <= _due(r) - gap]
    if wait:
        q.remove_requests(wait)
    return wait


def _put_back(sched, wait: list) -> None:
    if wait:
        sched.waiting.prepend_requests(reversed(wait))


def _admission_limit(sched) -> str:
    """The attribute vLLM's scheduler admits waiting requests up to (running ones counted)."""
    return "max_num_active_reqs" if hasattr(sched, "max_num_active_reqs") \
        else "max_num_running_reqs"


def _hold_prompts(sched) -> list:
    """Take the prompts being computed out of vLLM's running list for one step (they get
    no tokens in it: what a budget that ran out before them does); `_restore` puts them
    back in front, in their order. Should the step run out of KV blocks, vLLM preempts
    from what is left in the list (the newest stream first), not a held prompt.

    The held prompts keep their slots: vLLM's admission limit goes down by as many for
    the step. Without that, vLLM filled the slots they had left from its waiting queue,
    the restored list held more than `max_num_seqs`, and the next step's own check killed
    the engine core (`assert len(self.running) <= self.max_num_running_reqs`; the
    autoscaler's decode burst, 12 streams on 2 slots, in one suite run of four)."""
    held = [r for r in sched.running if _prefilling(r)]
    if held:
        keep = {id(r) for r in held}
        sched.running = [r for r in sched.running if id(r) not in keep]
        attr = _admission_limit(sched)
        setattr(sched, attr, getattr(sched, attr) - len(held))
    return held


def _restore(sched, held: list) -> None:
    if held:
        sched.running = held + sched.running
        attr = _admission_limit(sched)
        setattr(sched, attr, getattr(sched, attr) + len(held))


def _partial_prefills(sched) -> int:
    return sum(1 for r in sched.running if _prefilling(r))


def _head(sched) -> tuple[int, int]:
    """The first queued prompt's uncomputed tokens (running before waiting: the order
    vLLM schedules in) and how many prompts are queued."""
    head, n = 0, 0
    for q in (sched.running, sched.waiting):
        for r in q:
            if _prefilling(r):
                n += 1
                head = head or r.num_prompt_tokens - r.num_computed_tokens
    return head, n


def _handoff_step(sched, st: "_State", streams: list, b, now: float) -> bool:
    """Is this step a handoff step: one that carries no prompt chunk, so that a stream
    landing from a prefill worker starts within short steps instead of waiting for long
    ones? Only where a prompt chunk would make the step longer than an SLO-sized step
    (SAFETY * SLO): a local prefill alone (`alone` steps are longer on a host whose step's
    fixed part is most of the SLO), or beside streams whose slack allows a long step.

    Without it the landing stream waited for the step in progress, the step its KV loaded
    in and the step that computed its last prompt token, each a prompt chunk long
    (measured: first gaps of 0.7-2.7 s on a 2-core CPU, where `alone` steps take
    0.5-0.8 s). With it the last two are an empty step (the load, which the worker waits
    for: at most 20 ms) and a decode-sized one; the prompts lose about one step's fixed
    part per handoff."""
    coef = st.coef
    if not st.handoffs or coef is None or st.slo_s <= 0 or not _partial_prefills(sched):
        return False
    step_s = b.allow_s if streams else alone(coef, st.slo_s)[0]
    return step_s > SAFETY * st.slo_s * 1.001 and _handoff_due(sched, st, now)


@switched_once("PDSERVE_STEP_HOOK")
def install() -> bool:
    try:
        from vllm.v1.core.sched.scheduler import Scheduler
    except ImportError:
        return False
    st = _State(float(os.environ.get("PDSERVE_TPOT_SLO_MS") or 0),
                os.environ.get("PDSERVE_STEP_SOCKET", ""),
                float(os.environ.get("PDSERVE_TTFT_SLO_MS") or 0))
    orig_schedule, orig_update = Scheduler.schedule, Scheduler.update_from_output

    def schedule(self, *args, **kwargs):
        now = time.monotonic()
        cap = self.scheduler_config.max_num_batched_tokens
        if not hasattr(self, "_pd_base_threshold"):
            self._pd_base_threshold = self.scheduler_config.long_prefill_token_threshold
        streams, ctx, local = _streams(self, st, now)
        wait, held = _defer_landing(self, st, streams), []
        try:     # the deferred requests go back whatever happens
            if st.slo_s > 0 and st.handoffs:
                _landing_first(self)
            b = budget(streams, st.current(), st.slo_s, ctx, cap, local_prefill=local,
                       least=st.least, over=st.over)
            if st.whole and b.tokens and (not streams or late_only(streams)):
                b = _whole_alone(self, st, b, cap)
            st.allow, st.tokens = b.allow_s, b.tokens
            fcfs = 0
            if not b.tokens and not streams:
                head, queued = _head(self)
                fcfs = fcfs_tokens(head, st.current(), cap) if queued > 1 else 0
            held = _hold_prompts(self) if b.hold or _handoff_step(self, st, streams, b, now) else []
            # room for remote-prefilled streams to start, whatever the prompts take
            ready = _waiting_decodes(self) if held or b.tokens or fcfs else 0
            if held or b.hold:   # a handoff or decode-only step: the streams, no prompt
                self.max_num_scheduled_tokens = min(cap, len(streams) + ready)
                self.scheduler_config.long_prefill_token_threshold = self._pd_base_threshold
            elif b.tokens:
                self.max_num_scheduled_tokens = min(cap, len(streams) + ready + b.tokens)
                # each prompt being computed gets its share: together they stay within it
                self.scheduler_config.long_prefill_token_threshold = max(
                    1, b.tokens // max(1, _partial_prefills(self)))
            elif fcfs:      # prompts one after another (step_budget.fcfs_tokens)
                self.max_num_scheduled_tokens = min(cap, fcfs + ready)
                self.scheduler_config.long_prefill_token_threshold = self._pd_base_threshold
            else:
                self.max_num_scheduled_tokens = cap
                self.scheduler_config.long_prefill_token_threshold = self._pd_base_threshold
            out = orig_schedule(self, *args, **kwargs)
        finally:
            _restore(self, held)
            _put_back(self, wait)
        p, attn, d, c, seqs = 0, 0.0, 0, 0, 0
        for r, n, before in scheduled(out, self.requests):
            if before < r.num_prompt_tokens:
                p += n
                seqs += 1
                attn += chunk_attn(n, before)
            else:
                d += 1
                c += before
        st.pending[id(out)] = (now, StepSample(0.0, p, attn, d, c, late_only(streams), seqs),
                               b.allow_s, b.tokens, len(held), b.sized and not held, len(wait))
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        res = orig_update(self, scheduler_output, model_runner_output)
        got = st.pending.pop(id(scheduler_output), None)
        if got is not None and scheduler_output.total_num_scheduled_tokens > 0:
            t0, s, allow, tokens, held, sized, waited = got
            sample = StepSample(time.monotonic() - t0, s.prefill_tokens, s.prefill_attn,
                                s.decode_seqs, s.decode_ctx, s.late_only, s.prefill_seqs)
            borrowed = getattr(self, "_pd_borrowed", 0)   # pdserve/core_share.py
            if st.skip > 0:
                st.skip -= 1
            elif borrowed:      # faster than this engine's cores: traced, not fitted
                st.send(sample, allow, tokens, held, waited, borrowed)
            else:
                _note_overrun(st, sample, sized)
                st.model.observe(sample)
                st.send(sample, allow, tokens, held, waited)
        if len(st.first) > 4 * max(1, len(self.running)) + 64:
            live = {r.request_id for r in self.running}
            st.first = {k: v for k, v in st.first.items() if k in live}
            st.late &= live
        if len(st.pending) > 64:        # outputs that never came back (aborted batches)
            st.pending.clear()
        return res

    Scheduler.schedule = schedule
    Scheduler.update_from_output = update_from_output
    log.debug("step hook: TPOT SLO %.0f ms, samples to %s", st.slo_s * 1e3,
              st.address or "nowhere")
    return True
