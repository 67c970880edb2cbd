"""Prints the signal handlers this process started with (tests/component/test_zygote.py)."""

import signal

if __name__ == "__main__":
    print(*(repr(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM,
                                                 signal.SIGHUP, signal.SIGCHLD)), sep="\n")
