"""decode_worker/stops.py: stop strings checked across the first token give what one
colocated vLLM engine gives, checked against vLLM's own incremental detokenizer (its stop
check, min_tokens rule and streaming hold-back) on the same token texts."""

from types import SimpleNamespace

import pytest
from vllm import SamplingParams
from vllm.v1.engine.detokenizer import BaseIncrementalDetokenizer

from decode_worker.stops import StopAcrossFirst
from pdserve.sampling import first_text_sent

TEXTS = ["fox", " dog", " lazy", " brown", " jumps", "!", " a", "xx", "x"]


class _Det(BaseIncrementalDetokenizer):
    def decode_next(self, token_id: int) -> str:
        return TEXTS[token_id]


def colocated(tokens, stop, min_tokens=0, include=False):
    """(streamed pieces, tokens generated) of one vLLM engine producing `tokens`."""
    det = _Det(SimpleNamespace(sampling_params=SamplingParams(
        stop=stop, min_tokens=min_tokens, include_stop_str_in_output=include)))
    pieces, n = [], 0
    for i, t in enumerate(tokens):
        n += 1
        hit = det.update([t], False)
        done = hit is not None or i == len(tokens) - 1
        pieces.append(det.get_next_output_text(done, delta=True))
        if done:
            break
    return pieces, n


def disaggregated(tokens, stop, min_tokens=0, include=False):
    """The same through pdserve: the prefill engine's first token (the frontend sends what
    first_text_sent allows), then the decode engine with no stop strings, checked here."""
    first = TEXTS[tokens[0]]
    sent = first_text_sent(first, stop, len(tokens) == 1, include)
    pieces, n = [first[:sent]], 1
    st = StopAcrossFirst(stop, first, sent, max(min_tokens - 1, 0), include)
    for i, t in enumerate(tokens[1:]):
        n += 1
        out, hit, keep = st.step(TEXTS[t], [t], i == len(tokens) - 2)
        assert keep == 1
        pieces.append(out)
        if hit:
            break
    return pieces, n


CASES = [
    ([0, 1, 2, 3], ["fox dog"], 0),          # spans the first and second token: cut at 0
    ([0, 1, 2, 3], ["x dog l"], 0),          # spans three tokens
    ([0, 1, 2, 3], ["dog lazy"], 0),         # wholly in the decode engine's output
    ([0, 1, 2, 3], ["cat"], 0),              # never
    ([0, 1, 2, 3], ["fox dog", "lazy"], 0),
    ([0, 1, 0, 1, 2], ["fox dog"], 2),       # min_tokens: the first match is too early
    ([0, 1, 0, 1, 2], ["fox dog"], 3),
    ([7, 8, 2], ["xxx"], 0),                 # "xx" + "x"
    ([7, 8, 2], ["xxx", "x l"], 0),
    ([0, 5, 6, 4], ["x!", "! a j"], 0),
]


@pytest.mark.parametrize("include", [False, True], ids=["cut", "include_stop_str"])
@pytest.mark.parametrize("tokens,stop,min_tokens", CASES)
def test_equals_one_colocated_engine(tokens, stop, min_tokens, include):
    """Also with vLLM's include_stop_str_in_output: the text ends after the match, and
    nothing is held back while the request runs."""
    want, n_want = colocated(tokens, stop, min_tokens, include)
    got, n_got = disaggregated(tokens, stop, min_tokens, include)
    assert "".join(got) == "".join(want)
    assert n_got == n_want
    # nothing streamed that the end takes back: every prefix is a prefix of the answer
    assert all("".join(want).startswith("".join(got[:i])) for i in range(len(got) + 1))


def test_without_it_the_decode_engine_misses_the_spanning_match():
    """The check above can fail: the decode engine alone, with the first token as prompt,
    runs past a stop string that begins in it."""
    tokens, stop = [0, 1, 2, 3], ["fox dog"]
    want, n_want = colocated(tokens, stop)
    det = _Det(SimpleNamespace(sampling_params=SamplingParams(stop=stop)))
    for t in tokens[1:]:
        det.update([t], False)
    assert "".join(want) == "" and n_want == 2
    assert TEXTS[0] + det.output_text == "fox dog lazy brown"


def test_first_text_held_back_only_when_a_stop_could_follow():
    assert first_text_sent("fox", [], False) == 3
    assert first_text_sent("fox", ["abcd"], True) == 3         # the request ended there
    assert first_text_sent("fox", ["ab"], False) == 2          # vLLM holds back len - 1
    assert first_text_sent("fox", ["abcdef"], False) == 0
    assert first_text_sent("fox", ["abcdef"], False, include=True) == 3   # never cut


def _decode(ids):
    return "".join(TEXTS[i] for i in ids)


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("tokens,stop,min_tokens", [c for c in CASES if c[2] == 0])
def test_tokens_handed_over_at_once_are_kept_up_to_the_match(tokens, stop, min_tokens,
                                                             include):
    """The engine hands the decode worker every token since it last looked: the output
    keeps those up to the one that completed the match, as one engine checking after
    every token does, and the same text."""
    want, n_want = colocated(tokens, stop, min_tokens, include)
    first = TEXTS[tokens[0]]
    sent = first_text_sent(first, stop, len(tokens) == 1, include)
    st = StopAcrossFirst(stop, first, sent, 0, include, tokens[0], _decode)
    rest = tokens[1:]
    out, hit, keep = st.step(_decode(rest), rest, True)
    assert first[:sent] + out == "".join(want)
    assert 1 + keep == n_want


def test_without_a_tokenizer_every_token_handed_over_is_kept():
    st = StopAcrossFirst(["fox dog"], "fox", 0, 0)
    assert st.step(" dog lazy", [1, 2], False) == ("", True, 2)


def test_the_stop_reason_crosses_the_wire_as_vllm_gives_it():
    from pdserve.rpc import pd_pb2
    from pdserve.sampling import stop_reason_from_wire, stop_reason_to_wire
    for reason in ("fox dog", 7, 0):
        msg = pd_pb2.GenerateResponse(stop_reason=stop_reason_to_wire(reason))
        got = stop_reason_from_wire(pd_pb2.GenerateResponse.FromString(
            msg.SerializeToString()))
        assert got == reason and type(got) is type(reason)
    assert stop_reason_to_wire(None) is None and stop_reason_to_wire(-1) is None
    assert stop_reason_from_wire(pd_pb2.GenerateResponse()) is None
    # the decode worker's own check names the string it matched
    st = StopAcrossFirst(["cat", "fox dog"], "fox", 0, 0)
    assert st.step(" dog", [1], False)[1] and st.matched == "fox dog"
