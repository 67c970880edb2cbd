"""Engine steps from the engine core to the worker: the wire format and the socket
(pdserve/step_hook.py, pdserve/steps.py). A real abstract Unix socket, no engine."""

import math

from pdserve.latency import StepSample
from pdserve.step_hook import _State, decode, encode
from pdserve.steps import StepReceiver


def test_wire_round_trip():
    s = StepSample(0.0421, 512, 131072.0, 3, 1500)
    got, allow, tok = decode(encode(s, 0.09, 40))
    assert (got, allow, tok) == (s, 0.09, 40)
    assert math.isinf(decode(encode(s, float("inf"), 0))[1])


def test_engine_sends_worker_keeps_the_newest_and_the_last_allowance():
    rx = StepReceiver(keep=3)
    try:
        tx = _State(100.0, rx.address)
        assert rx.allowance() == (0.0, 0) and rx.take() == []
        for i in range(5):
            tx.send(StepSample(0.01 * (i + 1), 0, 0.0, i + 1, 100 * i), 0.05, 16 + i)
        got = rx.take()
        assert [g.decode_seqs for g in got] == [3, 4, 5]       # the newest `keep`
        assert rx.allowance() == (0.05, 20) and rx.take() == []
        tx.send(StepSample(0.5, 1000, 5e5), float("inf"), 0)   # no stream: unchunked
        assert rx.take()[0].prefill_tokens == 1000 and rx.allowance() == (0.0, 0)
    finally:
        rx.stop()


def test_sending_to_nobody_never_fails():
    tx = _State(100.0, "@pdserve-steps-nobody-listens")
    tx.send(StepSample(0.01), 0.05, 16)
