"""Generate the gRPC stubs from proto/ with grpcio-tools.

    python -m pdserve.rpc.gen            # rewrite pdserve/rpc/pd_pb2*.py
    python -m pdserve.rpc.gen --out DIR  # write elsewhere (the staleness test uses this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
PROTO = "pdserve/rpc/pd.proto"


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc  # dev dependency only

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_DIR / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    gen_dir = out_dir / "pdserve" / "rpc"
    return sorted(gen_dir.glob("pd_pb2*"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT)
    ns = ap.parse_args(argv)
    for p in generate(ns.out):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
