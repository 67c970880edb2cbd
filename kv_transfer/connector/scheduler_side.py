"""The connector's scheduler half (runs in vLLM's engine core, beside its scheduler): which
requests load KV from a producer, which finished prefills keep their blocks under a lease,
push offers and cancels, and the handle (`kv_transfer_params`) a finished prefill returns.
It hands work to the worker half through PDConnectorMetadata, once per step."""

from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING

from kv_transfer import layout as L
from kv_transfer.agent import AgentClients, read_agent_address
from kv_transfer.connector.config import RPC_TIMEOUT_S, ConnectorConfig
from kv_transfer.connector.metadata import LoadSpec, OfferSpec, PDConnectorMetadata, PushChunk
from kv_transfer.handle import (
    P_DONE,
    P_KEY,
    P_PUSH,
    P_REMOTE_DECODE,
    P_REMOTE_PREFILL,
    KVHandle,
    source,
)
from pdserve.lease_client import LeaseClient

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger("vllm.pdserve.kv_transfer.connector")


def engine_quiescent(sched, own_work: bool, waiting_for_kv) -> bool:
    """True when no step of vLLM's scheduler `sched` can make progress until an outside
    event: the connector has nothing to hand to its worker half (`own_work` False),
    nothing runs or has just finished, and every waiting request waits on a KV load that
    has not finished (status `waiting_for_kv`; a finished load keeps that status until the
    next step admits the request); other requests left are finished ones whose blocks the
    producer holds under lease. The engine core may then sleep (pdserve's vLLM plugin)
    until a new request, a wakeup from the worker half (a transfer ended, a lease was
    released: kv_transfer/wakeup.py) or a short bound. Conservative: anything unexpected
    answers False, and vLLM steps as it would without us. Pure."""
    if own_work:
        return False
    try:
        if (sched.running or sched.finished_req_ids or not sched.requests
                or sched.finished_recving_kv_req_ids):   # loaded: the next step admits them
            return False
        waiting = list(sched.waiting) + list(getattr(sched, "kv_holding_waiting", ()))
    except (AttributeError, TypeError):   # another vLLM's scheduler: do as it does
        return False
    return all(r.status == waiting_for_kv for r in waiting)


def advance_grammar(request, reasoner=None) -> bool:
    """Pull: the decode engine's request is the prompt plus the first token, which the
    prefill engine sampled under the same constraint. vLLM's grammar for the request starts
    at the beginning of the output: advance it past that token, or the second token would
    be constrained as if it were the first. The grammar is compiled by now (vLLM promotes
    a request waiting for its grammar before asking the connector). False: nothing to do,
    or the token does not fit the grammar (then vLLM's own checks end the request).

    `reasoner` (the engine runs a reasoning parser, `--reasoning-parser`): vLLM constrains
    only what follows the reasoning. If the prompt had not ended it, the first token was
    reasoning, or the token that ends it, and never went through the grammar; then the
    grammar stays at its start and vLLM's own gate reads the prompt plus that token (ended
    there or not) as it would have read it after sampling the token itself."""
    so = getattr(request, "structured_output_request", None)
    grammar = so.grammar if so is not None else None
    if grammar is None or isinstance(grammar, Exception):
        return False
    if (reasoner is not None and not so.reasoning_ended
            and not reasoner.is_reasoning_end(request.prompt_token_ids[:-1])):
        return False
    first = request.prompt_token_ids[-1]
    if grammar.accept_tokens(request.request_id, [first]):
        return True
    log.warning("request %s: the first token %d (from the prefill engine) does not fit its "
                "structured-output grammar", request.request_id, first)
    return False


def reasoner_for(vllm_config, request):
    """The request's reasoning parser as vLLM's structured-output gate builds it (and
    then reuses: it is kept on the request), or None when the engine runs none."""
    so_cfg = getattr(vllm_config, "structured_outputs_config", None)
    so = getattr(request, "structured_output_request", None)
    if (so is None or so_cfg is None or not so_cfg.reasoning_parser
            or so_cfg.enable_in_reasoning):
        return None
    if so.reasoner is None:
        from vllm.reasoning import ReasoningParserManager
        from vllm.tokenizers import cached_tokenizer_from_config
        cls = ReasoningParserManager.get_reasoning_parser(so_cfg.reasoning_parser)
        so.reasoner = cls(tokenizer=cached_tokenizer_from_config(
            model_config=vllm_config.model_config), **(so.reasoning_parser_kwargs or {}))
    return so.reasoner


class _Releaser:
    """Sends Release to producers off the scheduler's thread; never blocks a step."""

    def __init__(self, leases: LeaseClient) -> None:
        self.leases = leases
        self.q: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self.t = threading.Thread(target=self._run, name="pd-releaser", daemon=True)
        self.t.start()

    def release(self, address: str, transfer_id: str) -> None:
        self.q.put((address, transfer_id))

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            batch: dict[str, list[str]] = {item[0]: [item[1]]}
            while True:  # coalesce what is already queued
                try:
                    more = self.q.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self.q.put(None)
                    break
                batch.setdefault(more[0], []).append(more[1])
            for address, ids in batch.items():
                self.leases.release(address, ids)   # a failure: the lease expires

    def stop(self) -> None:
        self.q.put(None)
        self.t.join(timeout=5)


class SchedulerHalf:
    def __init__(self, vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig") -> None:
        self.cfg = ConnectorConfig.from_vllm(vllm_config, kv_cache_config)
        self._vllm_config = vllm_config
        self._agent_address = ""
        self._local_hit: dict[str, int] = {}
        self._loads: list[LoadSpec] = []
        self._loading: dict[str, tuple[str, str]] = {}  # req id -> (agent address, transfer id)
        self._new_leases: dict[str, int] = {}
        self._releaser = _Releaser(LeaseClient(AgentClients().get, RPC_TIMEOUT_S))
        # push mode
        self._offers: list[OfferSpec] = []
        self._cancels: list[str] = []
        self._push_prompt: dict[str, int] = {}        # producer: req id -> prompt tokens
        self._push_blocks: dict[str, list[int]] = {}  # producer: req id -> blocks so far
        self._push_tid: dict[str, str] = {}           # producer: req id -> transfer id
        # set once pdserve's vLLM plugin asks `quiescent`: the engine core then sleeps
        # while only transfers are pending, and the worker half's idle-step wait is moot
        self.hold_wait = False

    @property
    def agent_address(self) -> str:
        """The KV agent's address: configured, or published by the worker half (it binds
        port 0, so no other process can take the port between choosing and binding)."""
        if not self._agent_address:
            if self.cfg.agent_port:
                self._agent_address = f"{self.cfg.agent_host}:{self.cfg.agent_port}"
            else:
                self._agent_address = read_agent_address(self.cfg.agent_file)
        return self._agent_address

    # -- consumer
    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int):
        p = request.kv_transfer_params
        if p and p.get(P_PUSH) and p.get(P_REMOTE_DECODE) and self.cfg.is_producer:
            self._push_prompt[request.request_id] = request.num_prompt_tokens
            # the engine adds a suffix to the caller's request id; offers use the caller's
            self._push_tid[request.request_id] = str(p.get("transfer_id") or
                                                     request.request_id)
            return 0, False
        if not p or not p.get(P_REMOTE_PREFILL) or p.get(P_DONE):
            return 0, False
        self._local_hit[request.request_id] = num_computed_tokens
        # pull: the handle's tokens; push: the whole prompt (vLLM recomputes its last
        # token to sample the first output token here)
        total = (request.num_prompt_tokens if p.get(P_PUSH)
                 else KVHandle.from_params(p).num_tokens)
        count = total - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        p = request.kv_transfer_params
        if not p or not p.get(P_REMOTE_PREFILL) or p.get(P_DONE):
            return
        p[P_DONE] = True
        if not p.get(P_PUSH):
            advance_grammar(request, reasoner_for(self._vllm_config, request))
        local_hit = self._local_hit.pop(request.request_id, 0)
        if num_external_tokens <= 0:
            # everything was in our own prefix cache: the producer's copy is not needed
            self._releaser.release(*source(p))
            return
        first = local_hit // self.cfg.block_size
        if p.get(P_PUSH):
            n_blocks = L.blocks_for_tokens(request.num_prompt_tokens, self.cfg.block_size)
            address, tid = source(p)
            self._offers.append(OfferSpec(
                req_id=request.request_id, transfer_key=str(p.get(P_KEY, "")),
                transfer_id=tid, agent_address=address,
                block_ids=list(blocks.get_block_ids()[0][:n_blocks]), skip_blocks=first,
                num_tokens=num_external_tokens))
            self._loading[request.request_id] = (address, tid)
            return
        h = KVHandle.from_params(p)
        num_tokens = h.num_tokens
        local_ids = list(blocks.get_block_ids()[0][
            first:L.blocks_for_tokens(num_tokens, self.cfg.block_size)])
        # the producer's blocks holding tokens [local_hit, num_tokens): the same blocks
        # when both block sizes agree, else those the relayout reads (kv_transfer/relayout.py)
        src_bs = h.block_size or self.cfg.block_size
        remote_ids = list(h.block_ids[local_hit // src_bs:L.blocks_for_tokens(num_tokens, src_bs)])
        self._loads.append(LoadSpec(
            req_id=request.request_id, transfer_key=str(p.get(P_KEY, "")),
            transfer_id=h.transfer_id, engine_id=h.engine_id,
            agent_address=h.agent_address, compat_hash=h.compat_hash,
            local_block_ids=local_ids, remote_block_ids=remote_ids,
            num_tokens=num_external_tokens, src_block_size=src_bs, first_token=local_hit,
            end_token=num_tokens))
        self._loading[request.request_id] = (h.agent_address, h.transfer_id)

    def update_connector_output(self, connector_output) -> None:
        for req_id in connector_output.finished_recving or ():
            src = self._loading.pop(req_id, None)
            if src is not None:
                self._releaser.release(*src)

    # -- both
    def build_connector_meta(self, so=None) -> PDConnectorMetadata:
        meta = PDConnectorMetadata(loads=self._loads, leases=self._new_leases,
                                   offers=self._offers, cancels=self._cancels,
                                   pushes=self._push_chunks(so) if so is not None else [],
                                   idle=(so is not None and not so.total_num_scheduled_tokens
                                         and (not self.hold_wait or bool(self._loading))))
        self._loads, self._new_leases, self._offers, self._cancels = [], {}, [], []
        return meta

    def _push_chunks(self, so) -> list[PushChunk]:
        """Producer: the prompt tokens each push request computes in this step."""
        if not self._push_prompt:
            return []
        out = []
        for r in so.scheduled_new_reqs:
            n = self._push_prompt.get(r.req_id)
            if n is None:
                continue
            blocks = self._push_blocks[r.req_id] = list(r.block_ids[0])
            end = r.num_computed_tokens + so.num_scheduled_tokens.get(r.req_id, 0)
            # from token 0: blocks this engine had cached are pushed in this step too
            out.append(PushChunk(r.req_id, self._push_tid[r.req_id], list(blocks), 0,
                                 min(end, n), n))
        c = so.scheduled_cached_reqs
        for i, rid in enumerate(c.req_ids):
            n = self._push_prompt.get(rid)
            if n is None:
                continue
            new = c.new_block_ids[i]
            if rid in c.resumed_req_ids:
                self._push_blocks[rid] = list(new[0]) if new else []
            elif new:
                self._push_blocks.setdefault(rid, []).extend(new[0])
            start = c.num_computed_tokens[i]
            if start >= n:
                continue
            end = start + so.num_scheduled_tokens.get(rid, 0)
            out.append(PushChunk(rid, self._push_tid[rid], list(self._push_blocks.get(rid, [])),
                                 start, min(end, n), n))
        return out

    def request_finished(self, request: "Request", block_ids: list[int]):
        from vllm.v1.request import RequestStatus

        p = request.kv_transfer_params
        if not p:
            return False, None
        if p.get(P_REMOTE_PREFILL):
            self._local_hit.pop(request.request_id, None)
            if (p.get(P_PUSH) and p.get(P_DONE) and request.request_id in self._loading
                    and request.status == RequestStatus.FINISHED_ABORTED):
                # aborted while the producer may still WRITE into its blocks: the worker
                # half cancels the offer; vLLM keeps the blocks until it reports back
                self._cancels.append(request.request_id)
            if not p.get(P_DONE):
                # aborted before it was ever scheduled: free the producer's blocks
                p[P_DONE] = True
                self._releaser.release(*source(p))
            # else: release follows finished_recving (vLLM delays our free until then)
            return False, None
        if not p.get(P_REMOTE_DECODE) or not self.cfg.is_producer:
            return False, None
        self._push_prompt.pop(request.request_id, None)
        self._push_blocks.pop(request.request_id, None)
        self._push_tid.pop(request.request_id, None)
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED,
                                  RequestStatus.FINISHED_STOPPED) or not block_ids:
            return False, None  # aborted prefill: nothing to hand over
        self._new_leases[request.request_id] = len(block_ids)
        return True, KVHandle.made(
            request.request_id, self.cfg.engine_id, self.agent_address, block_ids,
            request.num_computed_tokens, self.cfg.compat_hash, self.cfg.block_size,
            self.cfg.lease_s).to_params()

    def quiescent(self, sched) -> bool:
        """May the engine core sleep until an outside event? (engine_quiescent)"""
        from vllm.v1.request import RequestStatus

        # the plugin asks: the engine core sleeps instead, so the worker half waits in an
        # empty step only while a load is in flight (a handoff step, pdserve/step_hook.py)
        self.hold_wait = True
        own = bool(self._loads or self._new_leases or self._offers or self._cancels
                   or self._push_prompt)
        return engine_quiescent(sched, own, RequestStatus.WAITING_FOR_REMOTE_KVS)

    def shutdown(self) -> None:
        self._releaser.stop()


