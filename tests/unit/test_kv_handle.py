"""The KV handle's conversions: vLLM's kv_transfer_params <-> KVHandle <-> the wire."""

import time

from kv_transfer.handle import (
    P_FIRST_AT,
    P_KEY,
    P_PUSH,
    P_REMOTE_DECODE,
    P_REMOTE_PREFILL,
    KVHandle,
    prefill_params,
    push_params,
    source,
)


def handle() -> KVHandle:
    return KVHandle.made("req-1", "prefill-0", "127.0.0.1:5000", [7, 3, 9], 300, "abc", 64,
                         lease_s=30.0)


def test_made_runs_its_lease_from_now_and_round_trips_through_params_and_the_wire():
    h = handle()
    assert h.block_ids == (7, 3, 9) and abs(h.lease_expires_unix - time.time() - 30) < 5
    assert KVHandle.from_params(h.to_params()) == h
    wire = h.to_proto()
    assert list(wire.block_ids) == [7, 3, 9] and wire.block_size == 64
    assert KVHandle.from_proto(wire) == h
    # a handle from an older producer without block size or lease: the defaults
    p = h.to_params()
    del p["block_size"], p["lease_expires_unix"], p["compat_hash"]
    old = KVHandle.from_params(p)
    assert old.block_size == 0 and old.lease_expires_unix == 0.0 and old.compat_hash == ""


def test_a_decode_request_loads_from_the_handle_and_releases_at_its_source():
    h = handle()
    p = h.load_params("cmpl-9")
    assert p[P_REMOTE_PREFILL] is True and p[P_KEY] == "cmpl-9" and P_PUSH not in p
    assert KVHandle.from_params(p) == h        # the consumer half reads what was sent
    assert source(p) == ("127.0.0.1:5000", "req-1")
    assert P_FIRST_AT not in p      # when the first token went out, only when said
    assert h.load_params("cmpl-9", first_token_at=123.5)[P_FIRST_AT] == 123.5


def test_push_requests_carry_no_handle_only_their_source():
    p = push_params("cmpl-9", "req-1", "127.0.0.1:5000")
    assert p[P_REMOTE_PREFILL] and p[P_PUSH] and source(p) == ("127.0.0.1:5000", "req-1")
    assert prefill_params() == {P_REMOTE_DECODE: True}
    assert prefill_params("req-1") == {P_REMOTE_DECODE: True, P_PUSH: True,
                                       "transfer_id": "req-1"}
