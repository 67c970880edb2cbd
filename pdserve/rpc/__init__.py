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

    MAX = 256              # peers come and go (a restarted worker has a new port)
    EVICT_GRACE_S = 600.0  # an evicted channel's calls in progress get this long to end

    def __init__(self, creds=None, max_channels: int = MAX) -> None:
        self._ch: dict = {}              # address -> channel, least recently used first
        self.creds = creds
        self.max = max_channels
        self._closing: set = set()

    def get(self, address: str):
        import asyncio

        from pdserve import auth
        ch = self._ch.pop(address, None)
        if ch is None:
            ch = auth.aio_channel(address, self.creds, options=RECONNECT_OPTIONS)
            while len(self._ch) >= self.max:
                old = self._ch.pop(next(iter(self._ch)))
                t = asyncio.ensure_future(old.close(grace=self.EVICT_GRACE_S))
                self._closing.add(t)
                t.add_done_callback(self._closing.discard)
        self._ch[address] = ch
        return ch

    async def close(self) -> None:
        for ch in self._ch.values():
            await ch.close()
        self._ch.clear()
