"""The frontend's tokenizer refuses with a 400 what a chat template refuses or cannot render,
and what cannot fit, before tokenizing (frontend/tokens.py), with the tiny model's real
Hugging Face tokenizer."""

import asyncio

import pytest

from frontend.tokens import ChatOptions, Tokenizer, Truncation, load_chat_template, merge_kwargs
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


def test_chat_template_options_reach_the_template_as_vllm_passes_them(tok):
    """chat_template_kwargs: only variables the template reads, never one the request sets
    itself; continue_final_message leaves the last message open (Hugging Face cuts the
    text after its content); documents reach it."""
    saved = tok.tok.chat_template
    tok.tok.chat_template = (
        "{% if enable_thinking is defined and not enable_thinking %}[nothink]{% endif %}"
        "{% for d in documents or [] %}[doc {{ d['title'] }}]{% endfor %}"
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>"
        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    try:
        def text(**kw):
            return tok.chat_text(MSG + [{"role": "assistant", "content": "the"}], **kw)
        assert text() == "<user>the fox</user><assistant>the</assistant><assistant>"
        opts = ChatOptions(continue_final_message=True, kwargs={
            "enable_thinking": False, "add_generation_prompt": True, "other": 1},
            documents=[{"title": "a", "text": "b"}])
        assert text(add_generation_prompt=False, opts=opts) == \
            "[nothink][doc a]<user>the fox</user><assistant>the"
        assert tok.template_kwargs({"enable_thinking": True, "messages": [],
                                    "other": 1}) == {"enable_thinking": True}
    finally:
        tok.tok.chat_template = saved


OWN = ("{% if lang is defined %}[{{ lang }}]{% endif %}"
       "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"
       "{% if add_generation_prompt %}<<assistant>>{% endif %}")


def test_a_requests_own_template_renders_with_the_kwargs_it_reads(tok):
    """A trusted request's template (ChatOptions.template) replaces the model's, and its
    kwargs are kept by what *that* template reads."""
    model = tok.chat_text(MSG)
    opts = ChatOptions(kwargs={"lang": "en", "enable_thinking": False}, template=OWN)
    assert tok.chat_text(MSG, opts=opts) == "[en]<<user>> the fox\n<<assistant>>"
    assert tok.chat_text(MSG) == model                  # the next request: the model's again
    assert tok.template_kwargs({"lang": "en", "enable_thinking": False}, OWN) == {"lang": "en"}


def test_the_servers_template_and_default_kwargs(tmp_path_factory):
    """--chat-template replaces the model's for every request; --default-chat-template-kwargs
    sit under each request's, whose None and "auto" leave them (vLLM's merge)."""
    d = build_tiny_model(tmp_path_factory.mktemp("m2") / "tiny")
    tok = Tokenizer(str(d), OWN, {"lang": "fr"})
    assert tok.chat_text(MSG) == "[fr]<<user>> the fox\n<<assistant>>"
    assert tok.chat_text(MSG, opts=ChatOptions(kwargs={"lang": "de"})).startswith("[de]")
    assert tok.chat_text(MSG, opts=ChatOptions(kwargs={"lang": "auto"})).startswith("[fr]")
    assert merge_kwargs({"a": 1, "b": 2}, {"a": None, "b": 3, "c": "auto"}) == {"a": 1, "b": 3}
    assert merge_kwargs(None, {"a": None}) == {"a": None}      # no defaults: kept as sent


def test_chat_template_flag_is_a_path_or_the_template(tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text(OWN)
    assert load_chat_template(str(f)) == OWN
    assert load_chat_template(OWN) == OWN
    with pytest.raises(SystemExit, match="looks like a file path"):
        load_chat_template(str(tmp_path / "missing.jinja"))


def test_truncation_as_vllm_truncates(tok):
    ids = tok.encode(" ".join(f"w{i}" for i in range(1, 21)))
    assert len(ids) == 20
    assert tok.encode(tok.decode(ids), trunc=Truncation(5)) == ids[-5:]      # left default
    assert tok.truncate(ids, Truncation(5, "right")) == ids[:5]
    assert tok.truncate(ids, Truncation(5)) == ids[-5:]
    assert tok.truncate(ids, Truncation(50)) == ids and tok.truncate(ids, None) == ids
    assert tok.truncate(ids, Truncation(0)) == []
    assert Truncation.of(-1, None, 2048) == Truncation(2047)
    assert Truncation.of(None, "left", 2048) is None
    with pytest.raises(InvalidRequest) as e:
        Truncation.of(2049, None, 2048)
    assert e.value.param == "truncate_prompt_tokens"
    # a text too long for the context is tokenized and truncated, not refused
    long = " ".join(f"w{i % 50 + 1}" for i in range(3000))
    got = asyncio.run(tok.encode_async(long, 512, trunc=Truncation(100, "left")))
    assert got == tok.encode(long)[-100:]


def test_developer_messages_become_system_as_vllm_renders_them():
    """For a template that does not name the role, `developer` becomes `system` and every
    system message is merged into one at the start (vLLM's renderer); a template that
    names it gets it as sent."""
    from frontend.tokens import developer_as_system
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "developer", "content": "answer in French"}]
    out = developer_as_system(msgs, "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert [m["role"] for m in out] == ["system", "user"]
    assert "be brief" in out[0]["content"] and "answer in French" in out[0]["content"]
    knows = "{% if m.role == 'developer' %}D{% endif %}"
    assert developer_as_system(msgs, knows) == msgs
    plain = msgs[:2]
    assert developer_as_system(plain, "") is plain
