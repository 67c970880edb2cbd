"""bench.bench_frontend drives the real app in-process and checks every answer it counts."""

import pytest

from bench import bench_frontend as B


async def test_it_measures_whole_streams_and_refuses_short_ones(monkeypatch):
    ms = await B.measure(requests=5, chunks=4, reps=2)
    assert len(ms) == 2 and all(0 < m < 1000 for m in ms)

    async def short(self, rid, model, ids, sp, timeout_s):       # one chunk fewer than asked
        from frontend.client import Chunk
        for i in range(self.chunks - 1):
            yield Chunk([7], "x", finish_reason="length" if i == self.chunks - 2 else None)
    monkeypatch.setattr(B._Cluster, "generate", short)
    with pytest.raises(RuntimeError, match="unexpected answer"):
        await B.measure(requests=1, chunks=4, reps=1)
