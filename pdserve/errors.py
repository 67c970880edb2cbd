"""One error hierarchy, mapped at the boundaries.

Every error we raise on purpose is a `PDError`. Its `kind` picks one row of
`ERROR_TABLE`, which gives both the gRPC status code (internal API) and the
HTTP status / OpenAI error type (public API). `tests/unit/test_errors.py` checks
the table is total and that gRPC codes round-trip back to the same kind.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import grpc


class ErrorKind(enum.Enum):
    INVALID_REQUEST = "invalid_request"
    UNSUPPORTED_PARAMETER = "unsupported_parameter"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    MODEL_NOT_FOUND = "model_not_found"
    NO_WORKERS = "no_workers"
    INCOMPATIBLE_KV = "incompatible_kv"
    KV_LEASE_EXPIRED = "kv_lease_expired"
    KV_TRANSFER_FAILED = "kv_transfer_failed"
    WORKER_UNAVAILABLE = "worker_unavailable"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    OVERLOADED = "overloaded"              # admission control refused: retry later (429)
    PAYLOAD_TOO_LARGE = "payload_too_large"   # the frontend's body limit (413; never on gRPC)
    INTERNAL = "internal"


@dataclass(frozen=True)
class ErrorMapping:
    grpc_code: grpc.StatusCode
    http_status: int
    openai_type: str


ERROR_TABLE: dict[ErrorKind, ErrorMapping] = {
    ErrorKind.INVALID_REQUEST: ErrorMapping(
        grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error"),
    ErrorKind.UNSUPPORTED_PARAMETER: ErrorMapping(
        grpc.StatusCode.UNIMPLEMENTED, 400, "invalid_request_error"),
    ErrorKind.CONTEXT_LENGTH_EXCEEDED: ErrorMapping(
        grpc.StatusCode.OUT_OF_RANGE, 400, "invalid_request_error"),
    ErrorKind.MODEL_NOT_FOUND: ErrorMapping(
        grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error"),
    ErrorKind.NO_WORKERS: ErrorMapping(
        grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable"),
    ErrorKind.INCOMPATIBLE_KV: ErrorMapping(
        grpc.StatusCode.FAILED_PRECONDITION, 500, "server_error"),
    ErrorKind.KV_LEASE_EXPIRED: ErrorMapping(
        grpc.StatusCode.ABORTED, 503, "service_unavailable"),
    ErrorKind.KV_TRANSFER_FAILED: ErrorMapping(
        grpc.StatusCode.DATA_LOSS, 502, "server_error"),
    ErrorKind.WORKER_UNAVAILABLE: ErrorMapping(
        grpc.StatusCode.INTERNAL, 502, "server_error"),
    ErrorKind.TIMEOUT: ErrorMapping(
        grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout"),
    ErrorKind.CANCELLED: ErrorMapping(
        grpc.StatusCode.CANCELLED, 499, "cancelled"),
    ErrorKind.OVERLOADED: ErrorMapping(
        grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
    ErrorKind.PAYLOAD_TOO_LARGE: ErrorMapping(
        grpc.StatusCode.RESOURCE_EXHAUSTED, 413, "invalid_request_error"),
    ErrorKind.INTERNAL: ErrorMapping(
        grpc.StatusCode.UNKNOWN, 500, "server_error"),
}

# gRPC codes that several kinds would share are resolved to one kind here.
_BY_GRPC: dict[grpc.StatusCode, ErrorKind] = {m.grpc_code: k for k, m in ERROR_TABLE.items()}
_BY_GRPC[grpc.StatusCode.RESOURCE_EXHAUSTED] = ErrorKind.OVERLOADED   # 413 stays at the edge


class PDError(Exception):
    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(self, message: str, *, kind: ErrorKind | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind
        self.message = message
        self.param = param

    @property
    def mapping(self) -> ErrorMapping:
        return ERROR_TABLE[self.kind]

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.mapping.openai_type,
                          "param": self.param, "code": self.kind.value}}


class InvalidRequest(PDError):
    kind = ErrorKind.INVALID_REQUEST


class UnsupportedParameter(PDError):
    kind = ErrorKind.UNSUPPORTED_PARAMETER


class ContextLengthExceeded(PDError):
    kind = ErrorKind.CONTEXT_LENGTH_EXCEEDED


class ModelNotFound(PDError):
    kind = ErrorKind.MODEL_NOT_FOUND


class NoWorkers(PDError):
    kind = ErrorKind.NO_WORKERS


class Overloaded(PDError):
    """Refused by admission control; `retry_after_s` goes out as Retry-After."""
    kind = ErrorKind.OVERLOADED

    def __init__(self, message: str, retry_after_s: float = 1.0, **kw) -> None:
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s


def from_grpc_error(err: grpc.RpcError, what: str) -> PDError:
    """Translate a gRPC error from one of our peers into our hierarchy."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    if code == grpc.StatusCode.UNAVAILABLE and "no " not in (details or ""):
        return PDError(f"{what}: peer unavailable ({details})", kind=ErrorKind.WORKER_UNAVAILABLE)
    if code == grpc.StatusCode.CANCELLED:
        # a call we cancel raises asyncio.CancelledError here, never this status: the peer
        # ended it (a server stopping, as a worker does when its engine dies), not the client
        return PDError(f"{what}: the peer ended the call ({details})",
                       kind=ErrorKind.WORKER_UNAVAILABLE)
    kind = _BY_GRPC.get(code, ErrorKind.INTERNAL)
    return PDError(f"{what}: {details}", kind=kind)
