"""Prints the signal handlers this process started with, then the cores it may run on
(tests/component/test_zygote.py)."""

import os
import signal

if __name__ == "__main__":
    print(*(repr(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM,
                                                 signal.SIGHUP, signal.SIGCHLD)),
          sorted(os.sched_getaffinity(0)), sep="\n")
