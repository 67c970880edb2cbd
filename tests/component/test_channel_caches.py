"""Channel caches stay bounded as peers come and go (a restarted worker has a new port)."""

import asyncio

from kv_transfer.agent import AgentClients
from pdserve.rpc import Channels


async def test_channels_keep_the_most_recent_peers_and_close_the_rest():
    ch = Channels(max_channels=3)
    first = ch.get("127.0.0.1:1")
    for port in (2, 3):
        ch.get(f"127.0.0.1:{port}")
    assert ch.get("127.0.0.1:1") is first          # used again: now the most recent
    ch.get("127.0.0.1:4")                           # evicts :2, the least recently used
    assert list(ch._ch) == ["127.0.0.1:3", "127.0.0.1:1", "127.0.0.1:4"]
    await asyncio.gather(*list(ch._closing))        # the evicted one closes
    assert not ch._closing
    await ch.close()


def test_agent_clients_are_bounded_too():
    ac = AgentClients(max_channels=2)
    a = ac.get("127.0.0.1:1")
    ac.get("127.0.0.1:2")
    assert ac.get("127.0.0.1:1") is a
    ac.get("127.0.0.1:3")
    assert list(ac._stubs) == ["127.0.0.1:1", "127.0.0.1:3"]
    assert set(ac._channels) == set(ac._stubs)
    ac.close()
