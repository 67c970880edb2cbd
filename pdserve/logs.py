"""Logging with the process role in every line, so mixed logs stay readable."""

from __future__ import annotations

import logging
import os
import sys

_FMT = "%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s"


def setup_logging(role: str, level: str | None = None) -> None:
    level = (level or os.environ.get("PDSERVE_LOG_LEVEL", "INFO")).upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_FMT.format(role=role)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    os.environ["PDSERVE_ROLE"] = role  # inherited by engine subprocesses
    # vLLM configures its own loggers; tag them too.
    os.environ["VLLM_LOGGING_PREFIX"] = f"[{role}] "
    logging.getLogger("httpx").setLevel(logging.WARNING)
