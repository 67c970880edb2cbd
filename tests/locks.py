"""A probe of pdserve/core_share.py's lock files, shared by its unit and e2e tests."""

from __future__ import annotations

import fcntl
import os


def held(path: str) -> bool:
    """Whether some open file holds an exclusive `flock` on `path` (a lock file that
    does not exist yet is created, and is not held)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
