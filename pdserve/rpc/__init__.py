"""gRPC stubs (generated: pdserve/rpc/gen.py) and the channel options our clients share."""

# Peers restart (the scheduler, workers): a channel must reconnect within seconds. gRPC's
# default reconnect backoff grows to 120 s after repeated failures, which kept workers from
# registering again with a restarted scheduler (seen in tests/e2e/test_kv_aware.py).
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200),
                     ("grpc.min_reconnect_backoff_ms", 200),
                     ("grpc.max_reconnect_backoff_ms", 2000)]


class Channels:
    """Cached asyncio channels to peers, one per address, with RECONNECT_OPTIONS; each
    call carries `creds`' token (pdserve/auth.py; None: internal auth is off)."""

    def __init__(self, creds=None) -> None:
        self._ch: dict = {}
        self.creds = creds

    def get(self, address: str):
        from pdserve import auth
        ch = self._ch.get(address)
        if ch is None:
            ch = self._ch[address] = auth.aio_channel(address, self.creds,
                                                      options=RECONNECT_OPTIONS)
        return ch

    async def close(self) -> None:
        for ch in self._ch.values():
            await ch.close()
        self._ch.clear()
