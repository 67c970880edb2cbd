import grpc

from pdserve.errors import ERROR_TABLE, ErrorKind, PDError, from_grpc_error


class FakeRpcError(grpc.RpcError):
    def __init__(self, code, details):
        self._c, self._d = code, details

    def code(self):
        return self._c

    def details(self):
        return self._d


def test_table_is_total_and_statuses_are_errors():
    assert set(ERROR_TABLE) == set(ErrorKind)
    for kind, m in ERROR_TABLE.items():
        assert m.http_status >= 400 and m.grpc_code != grpc.StatusCode.OK, kind


def test_grpc_codes_round_trip_to_the_same_kind():
    for kind, m in ERROR_TABLE.items():
        if kind in (ErrorKind.WORKER_UNAVAILABLE, ErrorKind.PAYLOAD_TOO_LARGE,
                    ErrorKind.CANCELLED):
            continue      # from a peer these read as "unavailable" / "overloaded"
        back = from_grpc_error(FakeRpcError(m.grpc_code, "no x"), "op")
        assert back.kind == kind, kind


def test_a_call_the_peer_cancelled_is_a_peer_failure_not_a_client_hang_up():
    """A worker whose server stops (its engine died) ends the calls in flight CANCELLED;
    the frontend's own cancellations raise asyncio.CancelledError instead. So a CANCELLED
    status from a peer is the peer's failure (502), not the client's 499."""
    from frontend.client import _worker_down

    e = FakeRpcError(grpc.StatusCode.CANCELLED, "Cancelled")
    back = from_grpc_error(e, "decode on decode-0")
    assert back.kind == ErrorKind.WORKER_UNAVAILABLE and back.mapping.http_status != 499
    assert "decode on decode-0" in back.message
    assert _worker_down(e) and _worker_down(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "x"))
    assert not _worker_down(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "x"))


def test_openai_body_shape():
    body = PDError("bad", kind=ErrorKind.INVALID_REQUEST, param="max_tokens").openai_body()
    assert body == {"error": {"message": "bad", "type": "invalid_request_error",
                              "param": "max_tokens", "code": "invalid_request"}}
