"""/tokenize, /detokenize, /version and /ping (frontend/tokenize_api.py), in-process with the
tiny model's real tokenizer and a fake cluster: vLLM's shapes, the API key, the bounds."""

import httpx
import pytest

from frontend.app import create_app
from frontend.tokens import Tokenizer
from pdserve.config import FrontendConfig
from pdserve.models import build_tiny_model
from pdserve.rpc import pd_pb2


class Cluster:
    def __init__(self, roles=(pd_pb2.ROLE_PREFILL, pd_pb2.ROLE_DECODE)):
        self.roles = roles

    async def list_workers(self):
        return pd_pb2.ListWorkersResponse(workers=[
            pd_pb2.WorkerInfo(worker_id=f"w{i}", role=r) for i, r in enumerate(self.roles)])

    async def close(self):
        pass


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(str(build_tiny_model(tmp_path_factory.mktemp("m") / "tiny")))


def client(tok, cluster=None, **kw):
    app = create_app(FrontendConfig(model="unused", served_model_name="m", max_model_len=64,
                                    **kw), client=cluster or Cluster(), tokenizer=tok)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                             base_url="http://t")


async def test_tokenize_and_detokenize_round_trip(tok):
    async with client(tok) as c:
        r = await c.post("/tokenize", json={"model": "m", "prompt": "the fox",
                                            "return_token_strs": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tokens"] == tok.encode("the fox") and body["count"] == len(body["tokens"])
        assert body["max_model_len"] == 64 and len(body["token_strs"]) == body["count"]
        d = await c.post("/detokenize", json={"model": "m", "tokens": tok.encode(
            "the fox", add_special_tokens=False)})
        assert d.status_code == 200 and d.json() == {"prompt": "the fox"}


async def test_tokenize_chat_is_what_generation_sends(tok):
    msgs = [{"role": "user", "content": "the fox"}]
    async with client(tok) as c:
        r = await c.post("/tokenize", json={"messages": msgs})
        assert r.json()["tokens"] == tok.chat(msgs)
        r = await c.post("/tokenize", json={"messages": msgs, "add_generation_prompt": False})
        assert r.json()["tokens"] == tok.chat(msgs, add_generation_prompt=False) != tok.chat(msgs)


async def test_a_requests_own_chat_template_only_on_a_server_that_trusts_it(tok):
    """As vLLM's --trust-request-chat-template: a 400 with vLLM's words without it, the
    request's template with it, and the model's again on the next request."""
    msgs = [{"role": "user", "content": "the fox"}]
    own = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    async with client(tok) as c:
        r = await c.post("/tokenize", json={"messages": msgs, "chat_template": own})
        assert r.status_code == 400 and "--trust-request-chat-template" in r.text
    async with client(tok, trust_request_chat_template=True) as c:
        r = await c.post("/tokenize", json={"messages": msgs, "chat_template": own})
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == tok.encode("[user] the fox", add_special_tokens=False)
        r = await c.post("/tokenize", json={"messages": msgs})
        assert r.json()["tokens"] == tok.chat(msgs)


@pytest.mark.parametrize("path,body,status", [
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, 400),
    ("/tokenize", {}, 400),
    ("/tokenize", {"prompt": "a", "model": "other"}, 404),
    ("/tokenize", {"prompt": "w1 " * 10_000}, 400),          # 8 contexts of 64 cannot hold it
    ("/detokenize", {"tokens": [5, 10**6]}, 400),
    ("/detokenize", {"tokens": [-1]}, 400),
    ("/detokenize", {"tokens": "abc"}, 400),
])
async def test_bad_requests_get_openai_errors(tok, path, body, status):
    async with client(tok) as c:
        r = await c.post(path, json=body)
        assert r.status_code == status, r.text
        assert r.json()["error"]["message"]


async def test_version_and_ping(tok):
    async with client(tok) as c:
        v = (await c.get("/version")).json()
        assert v["version"] and "vllm_version" in v
        assert (await c.get("/ping")).status_code == 200
        assert (await c.post("/ping")).status_code == 200
        # unknown fields are ignored, as vLLM does
        assert (await c.post("/tokenize", json={"prompt": "a", "frobnicate": 1})).status_code == 200
    async with client(tok, Cluster(roles=(pd_pb2.ROLE_DECODE,))) as c:
        assert (await c.get("/ping")).status_code == 503    # as /health: no prefill worker


async def test_tokenize_needs_the_api_key_where_v1_does(tok):
    async with client(tok, api_keys=("k",)) as c:
        assert (await c.post("/tokenize", json={"prompt": "a"})).status_code == 401
        assert (await c.post("/detokenize", json={"tokens": [5]})).status_code == 401
        r = await c.post("/tokenize", json={"prompt": "a"}, headers={"Authorization": "Bearer k"})
        assert r.status_code == 200
        assert (await c.get("/version")).status_code == 200    # as vLLM: no key needed
