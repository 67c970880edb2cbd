"""gRPC stubs (generated: pdserve/rpc/gen.py) and the channel options our clients share."""

# Peers restart (the scheduler, workers): a channel must reconnect within seconds. gRPC's
# default reconnect backoff grows to 120 s after repeated failures, which kept workers from
# registering again with a restarted scheduler (seen in tests/e2e/test_kv_aware.py).
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200),
                     ("grpc.min_reconnect_backoff_ms", 200),
                     ("grpc.max_reconnect_backoff_ms", 2000)]
