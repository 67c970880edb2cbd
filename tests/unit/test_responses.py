"""pdserve's answers through vLLM's response models (frontend/responses.py)."""

import logging

from frontend import responses

CMPL = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": "length",
                     "stop_reason": None}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}


def test_a_whole_answer_has_every_field_of_vllms_model():
    out = responses.whole(CMPL, chat=False)
    assert out["choices"][0]["text"] == "hi" and out["usage"]["total_tokens"] == 3
    # vLLM's fields pdserve does not set come as vLLM's server sends them: null
    assert out["system_fingerprint"] is None and out["kv_transfer_params"] is None
    assert "prompt_token_ids" in out["choices"][0]
    # pdserve's own extras (--expose-routing) ride along
    assert responses.whole({**CMPL, "kv_transfer": {"bytes": 1}}, False)["kv_transfer"] == {
        "bytes": 1}


def test_a_chunk_keeps_only_what_it_set():
    d = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": {"content": "x"}, "logprobs": None,
                      "finish_reason": None}]}
    out = responses.chunk(d, chat=True)
    assert out["choices"][0]["delta"] == {"content": "x"} and "usage" not in out


def test_a_shape_that_drifts_is_logged_and_still_sent(caplog):
    bad = {**CMPL, "choices": [{"index": "zero?", "text": 5}]}
    with caplog.at_level(logging.ERROR):
        assert responses.whole(bad, chat=False) is bad
    assert "does not fit vLLM's CompletionResponse" in caplog.text
