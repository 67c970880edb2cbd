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
        if kind in (ErrorKind.WORKER_UNAVAILABLE, ErrorKind.PAYLOAD_TOO_LARGE):
            continue      # from a peer these read as "unavailable" / "overloaded"
        back = from_grpc_error(FakeRpcError(m.grpc_code, "no x"), "op")
        assert back.kind == kind, kind


def test_openai_body_shape():
    body = PDError("bad", kind=ErrorKind.INVALID_REQUEST, param="max_tokens").openai_body()
    assert body == {"error": {"message": "bad", "type": "invalid_request_error",
                              "param": "max_tokens", "code": "invalid_request"}}
