"""The frontend's tokenizer refuses with a 400 what a chat template refuses or cannot render,
and what cannot fit, before tokenizing (frontend/tokens.py), with the tiny model's real
Hugging Face tokenizer."""

import asyncio

import pytest

from frontend.tokens import Tokenizer
from pdserve.errors import ERROR_TABLE, ContextLengthExceeded, InvalidRequest
from pdserve.models import build_tiny_model


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(str(build_tiny_model(tmp_path_factory.mktemp("m") / "tiny")))


MSG = [{"role": "user", "content": "the fox"}]


@pytest.mark.parametrize("template,why", [
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),  # refuses
    ("{% for m in messages %}{{ m['content'] }", ""),                     # does not parse
    ("{{ messages[0]['content'] | no_such_filter }}", "no_such_filter"),  # unknown filter
    ("{{ messages[5]['content'] }}", ""),                                 # fails as it runs
])
def test_template_errors_are_a_400_not_a_500(tok, template, why):
    saved = tok.tok.chat_template
    tok.tok.chat_template = template
    try:
        with pytest.raises(InvalidRequest) as e:
            asyncio.run(tok.chat_async(MSG, 100))
        assert ERROR_TABLE[e.value.kind].http_status == 400 and "chat template" in str(e.value)
        assert why in str(e.value)
    finally:
        tok.tok.chat_template = saved
    assert asyncio.run(tok.chat_async(MSG, 100))          # the next request works


def test_no_template_is_a_400(tok):
    saved, tok.tok.chat_template = tok.tok.chat_template, None
    try:
        with pytest.raises(InvalidRequest, match="no chat template"):
            tok.chat(MSG)
    finally:
        tok.tok.chat_template = saved


def test_text_that_cannot_fit_is_refused_before_tokenizing(tok, monkeypatch):
    monkeypatch.setattr(tok, "encode", lambda text: pytest.fail("tokenized"))
    with pytest.raises(ContextLengthExceeded):
        asyncio.run(tok.encode_async("w1 " * 100_000, 512))
