from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_PREFILL: _ClassVar[Role]
    ROLE_DECODE: _ClassVar[Role]
    ROLE_MIXED: _ClassVar[Role]

class RouteMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUTE_MODE_UNSPECIFIED: _ClassVar[RouteMode]
    ROUTE_MODE_DISAGG: _ClassVar[RouteMode]
    ROUTE_MODE_LOCAL: _ClassVar[RouteMode]

class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PHASE_UNSPECIFIED: _ClassVar[Phase]
    PHASE_PREFILL_DONE: _ClassVar[Phase]
    PHASE_DONE: _ClassVar[Phase]
    PHASE_FAILED: _ClassVar[Phase]
ROLE_UNSPECIFIED: Role
ROLE_PREFILL: Role
ROLE_DECODE: Role
ROLE_MIXED: Role
ROUTE_MODE_UNSPECIFIED: RouteMode
ROUTE_MODE_DISAGG: RouteMode
ROUTE_MODE_LOCAL: RouteMode
PHASE_UNSPECIFIED: Phase
PHASE_PREFILL_DONE: Phase
PHASE_DONE: Phase
PHASE_FAILED: Phase

class KVLayout(_message.Message):
    __slots__ = ("model", "dtype", "block_size", "num_layers", "block_bytes", "layout", "compat_hash")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    COMPAT_HASH_FIELD_NUMBER: _ClassVar[int]
    model: str
    dtype: str
    block_size: int
    num_layers: int
    block_bytes: int
    layout: str
    compat_hash: str
    def __init__(self, model: _Optional[str] = ..., dtype: _Optional[str] = ..., block_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., block_bytes: _Optional[int] = ..., layout: _Optional[str] = ..., compat_hash: _Optional[str] = ...) -> None: ...

class WorkerLoad(_message.Message):
    __slots__ = ("running", "waiting", "kv_usage", "kv_leases_held", "prefill_tokens", "ttft_ms", "tpot_ms", "num_blocks", "max_num_seqs", "step_allow_ms", "step_budget_tokens", "max_num_batched_tokens")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_USAGE_FIELD_NUMBER: _ClassVar[int]
    KV_LEASES_HELD_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    STEP_ALLOW_MS_FIELD_NUMBER: _ClassVar[int]
    STEP_BUDGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_BATCHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    running: int
    waiting: int
    kv_usage: float
    kv_leases_held: int
    prefill_tokens: int
    ttft_ms: float
    tpot_ms: float
    num_blocks: int
    max_num_seqs: int
    step_allow_ms: float
    step_budget_tokens: int
    max_num_batched_tokens: int
    def __init__(self, running: _Optional[int] = ..., waiting: _Optional[int] = ..., kv_usage: _Optional[float] = ..., kv_leases_held: _Optional[int] = ..., prefill_tokens: _Optional[int] = ..., ttft_ms: _Optional[float] = ..., tpot_ms: _Optional[float] = ..., num_blocks: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., step_allow_ms: _Optional[float] = ..., step_budget_tokens: _Optional[int] = ..., max_num_batched_tokens: _Optional[int] = ...) -> None: ...

class StepSample(_message.Message):
    __slots__ = ("seconds", "prefill_tokens", "prefill_attn", "decode_seqs", "decode_ctx", "late_only")
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_ATTN_FIELD_NUMBER: _ClassVar[int]
    DECODE_SEQS_FIELD_NUMBER: _ClassVar[int]
    DECODE_CTX_FIELD_NUMBER: _ClassVar[int]
    LATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    seconds: float
    prefill_tokens: int
    prefill_attn: float
    decode_seqs: int
    decode_ctx: int
    late_only: bool
    def __init__(self, seconds: _Optional[float] = ..., prefill_tokens: _Optional[int] = ..., prefill_attn: _Optional[float] = ..., decode_seqs: _Optional[int] = ..., decode_ctx: _Optional[int] = ..., late_only: _Optional[bool] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "presence_penalty", "frequency_penalty", "logprobs", "ignore_eos", "stop_token_ids", "repetition_penalty", "min_tokens", "cache_salt", "logit_bias", "prompt_logprobs", "structured", "min_p", "allowed_token_ids", "bad_words", "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output", "logprob_token_ids")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    STRUCTURED_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BAD_WORDS_FIELD_NUMBER: _ClassVar[int]
    SKIP_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SPACES_BETWEEN_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_STOP_STR_IN_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    presence_penalty: float
    frequency_penalty: float
    logprobs: int
    ignore_eos: bool
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    repetition_penalty: float
    min_tokens: int
    cache_salt: str
    logit_bias: _containers.ScalarMap[int, float]
    prompt_logprobs: int
    structured: StructuredOutputs
    min_p: float
    allowed_token_ids: _containers.RepeatedScalarFieldContainer[int]
    bad_words: _containers.RepeatedScalarFieldContainer[str]
    skip_special_tokens: bool
    spaces_between_special_tokens: bool
    include_stop_str_in_output: bool
    logprob_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., logprobs: _Optional[int] = ..., ignore_eos: _Optional[bool] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., repetition_penalty: _Optional[float] = ..., min_tokens: _Optional[int] = ..., cache_salt: _Optional[str] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., prompt_logprobs: _Optional[int] = ..., structured: _Optional[_Union[StructuredOutputs, _Mapping]] = ..., min_p: _Optional[float] = ..., allowed_token_ids: _Optional[_Iterable[int]] = ..., bad_words: _Optional[_Iterable[str]] = ..., skip_special_tokens: _Optional[bool] = ..., spaces_between_special_tokens: _Optional[bool] = ..., include_stop_str_in_output: _Optional[bool] = ..., logprob_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class StructuredOutputs(_message.Message):
    __slots__ = ("json", "regex", "choice", "grammar", "json_object", "reasoning_ended", "reasoning_parser_kwargs")
    JSON_FIELD_NUMBER: _ClassVar[int]
    REGEX_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    JSON_OBJECT_FIELD_NUMBER: _ClassVar[int]
    REASONING_ENDED_FIELD_NUMBER: _ClassVar[int]
    REASONING_PARSER_KWARGS_FIELD_NUMBER: _ClassVar[int]
    json: str
    regex: str
    choice: _containers.RepeatedScalarFieldContainer[str]
    grammar: str
    json_object: bool
    reasoning_ended: bool
    reasoning_parser_kwargs: str
    def __init__(self, json: _Optional[str] = ..., regex: _Optional[str] = ..., choice: _Optional[_Iterable[str]] = ..., grammar: _Optional[str] = ..., json_object: _Optional[bool] = ..., reasoning_ended: _Optional[bool] = ..., reasoning_parser_kwargs: _Optional[str] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token_id", "token", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    token: str
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., token: _Optional[str] = ..., logprob: _Optional[float] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "token", "logprob", "top", "rank")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    token: str
    logprob: float
    top: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    rank: int
    def __init__(self, token_id: _Optional[int] = ..., token: _Optional[str] = ..., logprob: _Optional[float] = ..., top: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ..., rank: _Optional[int] = ...) -> None: ...

class KVHandle(_message.Message):
    __slots__ = ("transfer_id", "engine_id", "agent_address", "block_ids", "num_tokens", "compat_hash", "lease_expires_unix", "block_size", "signature")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPAT_HASH_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    engine_id: str
    agent_address: str
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    num_tokens: int
    compat_hash: str
    lease_expires_unix: float
    block_size: int
    signature: bytes
    def __init__(self, transfer_id: _Optional[str] = ..., engine_id: _Optional[str] = ..., agent_address: _Optional[str] = ..., block_ids: _Optional[_Iterable[int]] = ..., num_tokens: _Optional[int] = ..., compat_hash: _Optional[str] = ..., lease_expires_unix: _Optional[float] = ..., block_size: _Optional[int] = ..., signature: _Optional[bytes] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("worker_id", "role", "address", "agent_address", "layout", "load", "metrics_address")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    AGENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: Role
    address: str
    agent_address: str
    layout: KVLayout
    load: WorkerLoad
    metrics_address: str
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., address: _Optional[str] = ..., agent_address: _Optional[str] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., load: _Optional[_Union[WorkerLoad, _Mapping]] = ..., metrics_address: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("heartbeat_interval_s", "heartbeat_timeout_s")
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    def __init__(self, heartbeat_interval_s: _Optional[float] = ..., heartbeat_timeout_s: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("worker_id", "load", "steps")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    load: WorkerLoad
    steps: _containers.RepeatedCompositeFieldContainer[StepSample]
    def __init__(self, worker_id: _Optional[str] = ..., load: _Optional[_Union[WorkerLoad, _Mapping]] = ..., steps: _Optional[_Iterable[_Union[StepSample, _Mapping]]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("known", "draining", "role")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    known: bool
    draining: bool
    role: Role
    def __init__(self, known: _Optional[bool] = ..., draining: _Optional[bool] = ..., role: _Optional[_Union[Role, str]] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RouteRequest(_message.Message):
    __slots__ = ("request_id", "model", "token_ids", "exclude_workers", "max_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    EXCLUDE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    exclude_workers: _containers.RepeatedScalarFieldContainer[str]
    max_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., exclude_workers: _Optional[_Iterable[str]] = ..., max_tokens: _Optional[int] = ...) -> None: ...

class WorkerRef(_message.Message):
    __slots__ = ("worker_id", "address", "agent_address")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    AGENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    agent_address: str
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., agent_address: _Optional[str] = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("prefill", "decode", "booking_id", "mode", "reason", "cached_tokens", "predicted_ttft_ms", "predicted_tpot_ms", "runner_up", "chunk_tokens", "push_ticket", "held_ms", "hold_first_token", "joined")
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    BOOKING_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    RUNNER_UP_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PUSH_TICKET_FIELD_NUMBER: _ClassVar[int]
    HELD_MS_FIELD_NUMBER: _ClassVar[int]
    HOLD_FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    prefill: WorkerRef
    decode: WorkerRef
    booking_id: str
    mode: RouteMode
    reason: str
    cached_tokens: int
    predicted_ttft_ms: float
    predicted_tpot_ms: float
    runner_up: str
    chunk_tokens: int
    push_ticket: bytes
    held_ms: float
    hold_first_token: bool
    joined: bool
    def __init__(self, prefill: _Optional[_Union[WorkerRef, _Mapping]] = ..., decode: _Optional[_Union[WorkerRef, _Mapping]] = ..., booking_id: _Optional[str] = ..., mode: _Optional[_Union[RouteMode, str]] = ..., reason: _Optional[str] = ..., cached_tokens: _Optional[int] = ..., predicted_ttft_ms: _Optional[float] = ..., predicted_tpot_ms: _Optional[float] = ..., runner_up: _Optional[str] = ..., chunk_tokens: _Optional[int] = ..., push_ticket: _Optional[bytes] = ..., held_ms: _Optional[float] = ..., hold_first_token: _Optional[bool] = ..., joined: _Optional[bool] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("booking_id", "phase", "failed_worker_id", "ttft_ms", "tpot_ms", "output_tokens", "kv_bytes", "kv_seconds", "first_gap_ms", "first_held_ms")
    BOOKING_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    FAILED_WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_GAP_MS_FIELD_NUMBER: _ClassVar[int]
    FIRST_HELD_MS_FIELD_NUMBER: _ClassVar[int]
    booking_id: str
    phase: Phase
    failed_worker_id: str
    ttft_ms: float
    tpot_ms: float
    output_tokens: int
    kv_bytes: int
    kv_seconds: float
    first_gap_ms: float
    first_held_ms: float
    def __init__(self, booking_id: _Optional[str] = ..., phase: _Optional[_Union[Phase, str]] = ..., failed_worker_id: _Optional[str] = ..., ttft_ms: _Optional[float] = ..., tpot_ms: _Optional[float] = ..., output_tokens: _Optional[int] = ..., kv_bytes: _Optional[int] = ..., kv_seconds: _Optional[float] = ..., first_gap_ms: _Optional[float] = ..., first_held_ms: _Optional[float] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("known",)
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    known: bool
    def __init__(self, known: _Optional[bool] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("worker_id", "drain")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    drain: bool
    def __init__(self, worker_id: _Optional[str] = ..., drain: _Optional[bool] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("found", "inflight")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    found: bool
    inflight: int
    def __init__(self, found: _Optional[bool] = ..., inflight: _Optional[int] = ...) -> None: ...

class IndexStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class IndexStatsResponse(_message.Message):
    __slots__ = ("blocks", "entries", "events", "lookups", "lookup_blocks", "hit_blocks", "blocks_by_worker", "decisions")
    class BlocksByWorkerEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class DecisionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HIT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_BY_WORKER_FIELD_NUMBER: _ClassVar[int]
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    blocks: int
    entries: int
    events: int
    lookups: int
    lookup_blocks: int
    hit_blocks: int
    blocks_by_worker: _containers.ScalarMap[str, int]
    decisions: _containers.ScalarMap[str, int]
    def __init__(self, blocks: _Optional[int] = ..., entries: _Optional[int] = ..., events: _Optional[int] = ..., lookups: _Optional[int] = ..., lookup_blocks: _Optional[int] = ..., hit_blocks: _Optional[int] = ..., blocks_by_worker: _Optional[_Mapping[str, int]] = ..., decisions: _Optional[_Mapping[str, int]] = ...) -> None: ...

class KVEventBatch(_message.Message):
    __slots__ = ("worker_id", "snapshot", "cleared", "stored", "removed")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    CLEARED_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    snapshot: bool
    cleared: bool
    stored: _containers.RepeatedScalarFieldContainer[int]
    removed: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, worker_id: _Optional[str] = ..., snapshot: _Optional[bool] = ..., cleared: _Optional[bool] = ..., stored: _Optional[_Iterable[int]] = ..., removed: _Optional[_Iterable[int]] = ...) -> None: ...

class KVEventsAck(_message.Message):
    __slots__ = ("batches",)
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    batches: int
    def __init__(self, batches: _Optional[int] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "role", "address", "agent_address", "layout", "load", "last_heartbeat_age_s", "inflight", "metrics_address", "draining", "blocks_indexed", "booked_prefill_tokens", "pending_role", "role_age_s", "role_changes", "step_coef", "step_samples")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    AGENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_INDEXED_FIELD_NUMBER: _ClassVar[int]
    BOOKED_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PENDING_ROLE_FIELD_NUMBER: _ClassVar[int]
    ROLE_AGE_S_FIELD_NUMBER: _ClassVar[int]
    ROLE_CHANGES_FIELD_NUMBER: _ClassVar[int]
    STEP_COEF_FIELD_NUMBER: _ClassVar[int]
    STEP_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: Role
    address: str
    agent_address: str
    layout: KVLayout
    load: WorkerLoad
    last_heartbeat_age_s: float
    inflight: int
    metrics_address: str
    draining: bool
    blocks_indexed: int
    booked_prefill_tokens: int
    pending_role: Role
    role_age_s: float
    role_changes: int
    step_coef: _containers.RepeatedScalarFieldContainer[float]
    step_samples: int
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., address: _Optional[str] = ..., agent_address: _Optional[str] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., load: _Optional[_Union[WorkerLoad, _Mapping]] = ..., last_heartbeat_age_s: _Optional[float] = ..., inflight: _Optional[int] = ..., metrics_address: _Optional[str] = ..., draining: _Optional[bool] = ..., blocks_indexed: _Optional[int] = ..., booked_prefill_tokens: _Optional[int] = ..., pending_role: _Optional[_Union[Role, str]] = ..., role_age_s: _Optional[float] = ..., role_changes: _Optional[int] = ..., step_coef: _Optional[_Iterable[float]] = ..., step_samples: _Optional[int] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ...) -> None: ...

class SetRoleRequest(_message.Message):
    __slots__ = ("worker_id", "role")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: Role
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ...) -> None: ...

class SetRoleResponse(_message.Message):
    __slots__ = ("found", "role", "pending_role")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PENDING_ROLE_FIELD_NUMBER: _ClassVar[int]
    found: bool
    role: Role
    pending_role: Role
    def __init__(self, found: _Optional[bool] = ..., role: _Optional[_Union[Role, str]] = ..., pending_role: _Optional[_Union[Role, str]] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "token_ids", "sampling", "push")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    push: bool
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., push: _Optional[bool] = ...) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("first_token_id", "first_token_text", "first_logprob", "finish_reason", "kv", "num_prompt_tokens", "num_cached_tokens", "push", "prompt_logprobs", "stop_reason")
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_TEXT_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    first_token_id: int
    first_token_text: str
    first_logprob: TokenLogprob
    finish_reason: str
    kv: KVHandle
    num_prompt_tokens: int
    num_cached_tokens: int
    push: KVTransferStats
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    stop_reason: StopReason
    def __init__(self, first_token_id: _Optional[int] = ..., first_token_text: _Optional[str] = ..., first_logprob: _Optional[_Union[TokenLogprob, _Mapping]] = ..., finish_reason: _Optional[str] = ..., kv: _Optional[_Union[KVHandle, _Mapping]] = ..., num_prompt_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., push: _Optional[_Union[KVTransferStats, _Mapping]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., stop_reason: _Optional[_Union[StopReason, _Mapping]] = ...) -> None: ...

class WorkerStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatusResponse(_message.Message):
    __slots__ = ("worker_id", "role", "load", "agent_address", "layout", "metrics_address")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    AGENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: Role
    load: WorkerLoad
    agent_address: str
    layout: KVLayout
    metrics_address: str
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., load: _Optional[_Union[WorkerLoad, _Mapping]] = ..., agent_address: _Optional[str] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., metrics_address: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "first_token_id", "kv", "sampling", "local_prefill", "push", "first_token_text", "first_text_sent", "ttft_due_unix")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    LOCAL_PREFILL_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_TEXT_FIELD_NUMBER: _ClassVar[int]
    FIRST_TEXT_SENT_FIELD_NUMBER: _ClassVar[int]
    TTFT_DUE_UNIX_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    first_token_id: int
    kv: KVHandle
    sampling: SamplingParams
    local_prefill: bool
    push: KVPush
    first_token_text: str
    first_text_sent: int
    ttft_due_unix: float
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., first_token_id: _Optional[int] = ..., kv: _Optional[_Union[KVHandle, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., local_prefill: _Optional[bool] = ..., push: _Optional[_Union[KVPush, _Mapping]] = ..., first_token_text: _Optional[str] = ..., first_text_sent: _Optional[int] = ..., ttft_due_unix: _Optional[float] = ...) -> None: ...

class KVPush(_message.Message):
    __slots__ = ("transfer_id", "agent_address", "ticket")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    agent_address: str
    ticket: bytes
    def __init__(self, transfer_id: _Optional[str] = ..., agent_address: _Optional[str] = ..., ticket: _Optional[bytes] = ...) -> None: ...

class KVTransferStats(_message.Message):
    __slots__ = ("bytes", "seconds", "descriptors", "tokens", "status", "read_seconds", "reason", "checksummed", "prep_seconds", "mode", "exposed_seconds", "writes", "post_seconds", "relayout_seconds", "read_cpu_seconds")
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTORS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    READ_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMMED_FIELD_NUMBER: _ClassVar[int]
    PREP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    EXPOSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WRITES_FIELD_NUMBER: _ClassVar[int]
    POST_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RELAYOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    READ_CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    bytes: int
    seconds: float
    descriptors: int
    tokens: int
    status: str
    read_seconds: float
    reason: str
    checksummed: bool
    prep_seconds: float
    mode: str
    exposed_seconds: float
    writes: int
    post_seconds: float
    relayout_seconds: float
    read_cpu_seconds: float
    def __init__(self, bytes: _Optional[int] = ..., seconds: _Optional[float] = ..., descriptors: _Optional[int] = ..., tokens: _Optional[int] = ..., status: _Optional[str] = ..., read_seconds: _Optional[float] = ..., reason: _Optional[str] = ..., checksummed: _Optional[bool] = ..., prep_seconds: _Optional[float] = ..., mode: _Optional[str] = ..., exposed_seconds: _Optional[float] = ..., writes: _Optional[int] = ..., post_seconds: _Optional[float] = ..., relayout_seconds: _Optional[float] = ..., read_cpu_seconds: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token_ids", "text", "logprobs", "finish_reason", "kv_transfer", "num_external_tokens", "num_cached_tokens", "prompt_logprobs", "stop_reason")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    KV_TRANSFER_FIELD_NUMBER: _ClassVar[int]
    NUM_EXTERNAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    finish_reason: str
    kv_transfer: KVTransferStats
    num_external_tokens: int
    num_cached_tokens: int
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    stop_reason: StopReason
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., finish_reason: _Optional[str] = ..., kv_transfer: _Optional[_Union[KVTransferStats, _Mapping]] = ..., num_external_tokens: _Optional[int] = ..., num_cached_tokens: _Optional[int] = ..., prompt_logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., stop_reason: _Optional[_Union[StopReason, _Mapping]] = ...) -> None: ...

class StopReason(_message.Message):
    __slots__ = ("text", "token_id")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_id: int
    def __init__(self, text: _Optional[str] = ..., token_id: _Optional[int] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class AgentInfoRequest(_message.Message):
    __slots__ = ("peer_compat_hash",)
    PEER_COMPAT_HASH_FIELD_NUMBER: _ClassVar[int]
    peer_compat_hash: str
    def __init__(self, peer_compat_hash: _Optional[str] = ...) -> None: ...

class LayerRegion(_message.Message):
    __slots__ = ("base_addr", "block_stride", "num_blocks")
    BASE_ADDR_FIELD_NUMBER: _ClassVar[int]
    BLOCK_STRIDE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    base_addr: int
    block_stride: int
    num_blocks: int
    def __init__(self, base_addr: _Optional[int] = ..., block_stride: _Optional[int] = ..., num_blocks: _Optional[int] = ...) -> None: ...

class AgentInfo(_message.Message):
    __slots__ = ("engine_id", "agent_name", "nixl_metadata", "layout", "layers", "tp_size", "tp_rank", "rank_addresses", "total_kv_heads", "local_kv_heads")
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_NAME_FIELD_NUMBER: _ClassVar[int]
    NIXL_METADATA_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    RANK_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    agent_name: str
    nixl_metadata: bytes
    layout: KVLayout
    layers: _containers.RepeatedCompositeFieldContainer[LayerRegion]
    tp_size: int
    tp_rank: int
    rank_addresses: _containers.RepeatedScalarFieldContainer[str]
    total_kv_heads: int
    local_kv_heads: int
    def __init__(self, engine_id: _Optional[str] = ..., agent_name: _Optional[str] = ..., nixl_metadata: _Optional[bytes] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., layers: _Optional[_Iterable[_Union[LayerRegion, _Mapping]]] = ..., tp_size: _Optional[int] = ..., tp_rank: _Optional[int] = ..., rank_addresses: _Optional[_Iterable[str]] = ..., total_kv_heads: _Optional[int] = ..., local_kv_heads: _Optional[int] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("transfer_ids", "extend_s")
    TRANSFER_IDS_FIELD_NUMBER: _ClassVar[int]
    EXTEND_S_FIELD_NUMBER: _ClassVar[int]
    transfer_ids: _containers.RepeatedScalarFieldContainer[str]
    extend_s: float
    def __init__(self, transfer_ids: _Optional[_Iterable[str]] = ..., extend_s: _Optional[float] = ...) -> None: ...

class LeaseResponse(_message.Message):
    __slots__ = ("held", "missing")
    HELD_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    held: _containers.RepeatedScalarFieldContainer[str]
    missing: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, held: _Optional[_Iterable[str]] = ..., missing: _Optional[_Iterable[str]] = ...) -> None: ...

class AgentStatsRequest(_message.Message):
    __slots__ = ("pop_transfer_ids",)
    POP_TRANSFER_IDS_FIELD_NUMBER: _ClassVar[int]
    pop_transfer_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, pop_transfer_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class PeerTransport(_message.Message):
    __slots__ = ("engine_id", "transport", "detail", "expected", "fallback")
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    transport: str
    detail: str
    expected: str
    fallback: bool
    def __init__(self, engine_id: _Optional[str] = ..., transport: _Optional[str] = ..., detail: _Optional[str] = ..., expected: _Optional[str] = ..., fallback: _Optional[bool] = ...) -> None: ...

class AgentStats(_message.Message):
    __slots__ = ("leases_held", "loads_pending", "leases_expired_total", "bytes_total", "records", "peers")
    class RecordsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: KVTransferStats
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[KVTransferStats, _Mapping]] = ...) -> None: ...
    LEASES_HELD_FIELD_NUMBER: _ClassVar[int]
    LOADS_PENDING_FIELD_NUMBER: _ClassVar[int]
    LEASES_EXPIRED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    leases_held: int
    loads_pending: int
    leases_expired_total: int
    bytes_total: int
    records: _containers.MessageMap[str, KVTransferStats]
    peers: _containers.RepeatedCompositeFieldContainer[PeerTransport]
    def __init__(self, leases_held: _Optional[int] = ..., loads_pending: _Optional[int] = ..., leases_expired_total: _Optional[int] = ..., bytes_total: _Optional[int] = ..., records: _Optional[_Mapping[str, KVTransferStats]] = ..., peers: _Optional[_Iterable[_Union[PeerTransport, _Mapping]]] = ...) -> None: ...

class OfferRequest(_message.Message):
    __slots__ = ("transfer_id", "consumer_engine_id", "consumer_agent_address", "block_ids", "skip_blocks", "ttl_s", "compat_hash")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_AGENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    SKIP_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    COMPAT_HASH_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    consumer_engine_id: str
    consumer_agent_address: str
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    skip_blocks: int
    ttl_s: float
    compat_hash: str
    def __init__(self, transfer_id: _Optional[str] = ..., consumer_engine_id: _Optional[str] = ..., consumer_agent_address: _Optional[str] = ..., block_ids: _Optional[_Iterable[int]] = ..., skip_blocks: _Optional[int] = ..., ttl_s: _Optional[float] = ..., compat_hash: _Optional[str] = ...) -> None: ...

class OfferResponse(_message.Message):
    __slots__ = ("accepted", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("cancelled", "busy")
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    cancelled: _containers.RepeatedScalarFieldContainer[str]
    busy: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cancelled: _Optional[_Iterable[str]] = ..., busy: _Optional[_Iterable[str]] = ...) -> None: ...

class ChecksumRequest(_message.Message):
    __slots__ = ("addrs", "lengths")
    ADDRS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    addrs: _containers.RepeatedScalarFieldContainer[int]
    lengths: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, addrs: _Optional[_Iterable[int]] = ..., lengths: _Optional[_Iterable[int]] = ...) -> None: ...

class ChecksumResponse(_message.Message):
    __slots__ = ("crc32",)
    CRC32_FIELD_NUMBER: _ClassVar[int]
    crc32: int
    def __init__(self, crc32: _Optional[int] = ...) -> None: ...
