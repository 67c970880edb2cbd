"""The committed stubs are what grpcio-tools generates from proto/ today."""

import importlib.util
from pathlib import Path

import pytest

from pdserve.rpc import pd_pb2

ROOT = Path(__file__).resolve().parents[2]


def test_committed_stubs_match_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    from pdserve.rpc.gen import generate

    generate(tmp_path)
    spec = importlib.util.spec_from_file_location("fresh_pb2", tmp_path / "pdserve/rpc/pd_pb2.py")
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert fresh.DESCRIPTOR.serialized_pb == pd_pb2.DESCRIPTOR.serialized_pb, \
        "stubs are stale: run `python -m pdserve.rpc.gen`"

    def body(p: Path) -> list[str]:  # version banners differ across grpcio-tools releases
        return [ln for ln in p.read_text().splitlines()
                if "GRPC_GENERATED_VERSION" not in ln and "_version" not in ln.lower()]

    assert body(tmp_path / "pdserve/rpc/pd_pb2_grpc.py") == \
        body(ROOT / "pdserve/rpc/pd_pb2_grpc.py")
