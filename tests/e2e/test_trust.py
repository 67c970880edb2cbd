"""Trust on both planes, on real clusters: every internal service refuses callers without
the cluster's credential; decode workers load KV only with a handle a producer signed, for
that prompt, once; a live worker id cannot be hijacked; client request ids are never
transfer ids; and a cluster with an API key refuses /v1 without it."""

import concurrent.futures as cf

import grpc
import httpx
import openai
import pytest

from pdserve import auth
from pdserve.rpc import pd_pb2, pd_pb2_grpc
from tests.e2e.cluster import channel, metric_value
from tests.e2e.conftest import KV, serving, words
from tests.e2e.cluster import assert_idle, by_role

KEY = "sk-test-" + "k" * 24


def refused(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def test_every_internal_service_refuses_callers_without_credentials(cluster):
    ws = cluster.workers()
    targets = [(cluster.scheduler, auth.ADMIN, lambda ch: pd_pb2_grpc.SchedulerStub(
        ch).ListWorkers(pd_pb2.ListWorkersRequest(), timeout=5))]
    for w in ws:
        stub = (pd_pb2_grpc.PrefillWorkerStub if w.role == pd_pb2.ROLE_PREFILL
                else pd_pb2_grpc.DecodeWorkerStub)
        targets.append((w.address, auth.ADMIN, lambda ch, s=stub: s(ch).Status(
            pd_pb2.WorkerStatusRequest(), timeout=5)))
        targets.append((w.agent_address, auth.WORKER, lambda ch: pd_pb2_grpc.KVAgentStub(
            ch).GetAgentInfo(pd_pb2.AgentInfoRequest(), timeout=5)))
    assert len(targets) == 1 + 2 * len(ws) >= 5
    for address, role, call in targets:
        with grpc.insecure_channel(address) as ch:
            code = refused(lambda call=call, ch=ch: call(ch))
            assert code == grpc.StatusCode.UNAUTHENTICATED, address
        with channel(address, role) as ch:      # the same calls with credentials work
            call(ch)
    # the frontend's token does not open a KV agent (the map of a KV cache)
    with channel(ws[0].agent_address, auth.FRONTEND) as ch:
        assert refused(lambda: pd_pb2_grpc.KVAgentStub(ch).GetAgentInfo(
            pd_pb2.AgentInfoRequest(), timeout=5)) == grpc.StatusCode.PERMISSION_DENIED


def test_a_hijacking_register_is_refused(cluster):
    (p,) = by_role(cluster, pd_pb2.ROLE_PREFILL)
    hijack = pd_pb2.RegisterRequest(worker_id=p.worker_id, role=pd_pb2.ROLE_PREFILL,
                                    address="127.0.0.1:9", agent_address="127.0.0.1:9",
                                    layout=p.layout)
    with grpc.insecure_channel(cluster.scheduler) as ch:
        assert refused(lambda: pd_pb2_grpc.SchedulerStub(ch).Register(hijack, timeout=5)) \
            == grpc.StatusCode.UNAUTHENTICATED
    with channel(cluster.scheduler, auth.WORKER) as ch:    # even with a worker's credential
        assert refused(lambda: pd_pb2_grpc.SchedulerStub(ch).Register(hijack, timeout=5)) \
            == grpc.StatusCode.ALREADY_EXISTS
    assert {w.worker_id: w.address for w in cluster.workers()}[p.worker_id] == p.address
    r = httpx.post(f"{cluster.url}/v1/completions", timeout=60, json={
        "model": cluster.model_name, "prompt": words(20, seed=5), "max_tokens": 4})
    assert r.status_code == 200, r.text


def test_forged_and_replayed_kv_handles_are_refused(cluster, tokenizer):
    (p,) = by_role(cluster, pd_pb2.ROLE_PREFILL)
    (d,) = by_role(cluster, pd_pb2.ROLE_DECODE)
    ids = tokenizer.encode(words(200, seed=77))
    sp = pd_pb2.SamplingParams(max_tokens=6, temperature=0, logprobs=-1)
    with channel(p.address, auth.FRONTEND) as pch, channel(d.address, auth.FRONTEND) as dch:
        pre = pd_pb2_grpc.PrefillWorkerStub(pch).Prefill(pd_pb2.PrefillRequest(
            request_id="trust-1", token_ids=ids, sampling=sp), timeout=60)
        assert pre.kv.signature

        def generate(kv, prompt=ids, rid="trust-2"):
            return list(pd_pb2_grpc.DecodeWorkerStub(dch).Generate(pd_pb2.GenerateRequest(
                request_id=rid, prompt_token_ids=prompt, first_token_id=pre.first_token_id,
                kv=kv, sampling=sp), timeout=60))

        forged = pd_pb2.KVHandle()
        forged.CopyFrom(pre.kv)
        forged.block_ids[0] += 1                          # someone else's block
        for bad, prompt in ((forged, ids),
                            (pre.kv, ids[:-1] + [ids[-1] ^ 1]),  # the handle, another prompt
                            (pd_pb2.KVHandle(transfer_id="x", agent_address="127.0.0.1:9",
                                             engine_id="e", block_ids=[1], num_tokens=16),
                             ids)):
            with pytest.raises(grpc.RpcError) as e:
                generate(bad, prompt)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, e.value.details()
        out = generate(pre.kv)                             # the real one, once
        assert sum(len(m.token_ids) for m in out) == 5 and out[-1].kv_transfer.status == "ok"
        with pytest.raises(grpc.RpcError) as e:             # and never again
            generate(pre.kv, rid="trust-3")
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "already used" in e.value.details()
    assert metric_value(cluster.metrics(d), "pdserve_worker_requests_total",
                        role="decode", outcome="refused") >= 4
    assert_idle(cluster, [p, d])                           # nothing held on either side


def same_request_id(c, auth_headers: dict, n=4):
    """n concurrent requests with one x-request-id: each gets its own prompt's output."""
    prompts = [words(60 + 20 * i, seed=300 + i) for i in range(n)]

    def one(prompt, rid=None):
        r = httpx.post(f"{c.url}/v1/completions", timeout=120,
                       headers={"x-request-id": rid, **auth_headers} if rid else auth_headers,
                       json={
                           "model": c.model_name, "prompt": prompt, "max_tokens": 8,
                           "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"], r.headers["x-request-id"]

    alone = [one(p)[0] for p in prompts]
    with cf.ThreadPoolExecutor(n) as ex:
        together = list(ex.map(lambda p: one(p, "same-id"), prompts))
    assert [t for t, _ in together] == alone
    assert {h for _, h in together} == {"same-id"}          # echoed, as clients expect


def test_one_client_request_id_for_concurrent_requests_pull(cluster):
    same_request_id(cluster, {})
    assert_idle(cluster, cluster.workers())


def test_cache_salt_keeps_a_tenants_prefix_cache_to_itself(cluster):
    prompt = words(300, seed=4242)

    def run(salt=None):
        r = httpx.post(f"{cluster.url}/v1/completions", timeout=120, json={
            "model": cluster.model_name, "prompt": prompt, "max_tokens": 6, "temperature": 0,
            **({"cache_salt": salt} if salt else {})})
        assert r.status_code == 200, r.text
        b = r.json()
        return b["choices"][0]["text"], b["usage"]["prompt_tokens_details"]["cached_tokens"]

    text, cached = run("tenant-a")
    assert cached == 0
    assert run("tenant-b") == (text, 0)             # another tenant: no hit, same output
    assert run() == (text, 0)                       # no salt: no hit either
    again, hit = run("tenant-a")                     # the same tenant hits its own prefix
    assert again == text and hit >= 256
    r = httpx.post(f"{cluster.url}/v1/completions", timeout=60, json={
        "model": cluster.model_name, "prompt": prompt, "max_tokens": 2, "cache_salt": ""})
    assert r.status_code == 400, r.text


@pytest.fixture(scope="module")
def keyed(tiny_model, tmp_path_factory):
    yield from serving(tiny_model, tmp_path_factory, "keyed",
                       extra=["--kv-mode", "push", "--api-key", KEY, "--protect-metrics", *KV])


def test_api_key_guards_every_v1_route_and_the_openai_client_works_with_it(keyed):
    c = keyed
    routes = [("GET", "/v1/models", None),
              ("POST", "/v1/completions", {"model": c.model_name, "prompt": "w1 w2",
                                           "max_tokens": 2}),
              ("POST", "/v1/chat/completions", {"model": c.model_name, "max_tokens": 2,
                                                "messages": [{"role": "user",
                                                              "content": "w1"}]}),
              ("GET", "/metrics", None), ("GET", "/sd/targets", None)]
    for method, path, body in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request(method, f"{c.url}{path}", json=body, headers=headers, timeout=60)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.request(method, f"{c.url}{path}", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200, (path, r.text)
    assert httpx.get(f"{c.url}/health", timeout=10).status_code == 200     # probes: open
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{c.url}/v1", api_key="wrong").models.list()
    client = openai.OpenAI(base_url=f"{c.url}/v1", api_key=KEY)
    out = client.completions.create(model=c.model_name, prompt=words(30, seed=9),
                                    max_tokens=4, temperature=0)
    assert out.usage.completion_tokens == 4


def test_one_client_request_id_for_concurrent_requests_push(keyed):
    same_request_id(keyed, {"Authorization": f"Bearer {KEY}"})
    # a push offer goes only where the scheduler's ticket says: never to a caller's address
    (d,) = by_role(keyed, pd_pb2.ROLE_DECODE)
    with channel(d.address, auth.FRONTEND) as ch:
        for ticket in (b"", b"x" * 32):
            with pytest.raises(grpc.RpcError) as e:
                list(pd_pb2_grpc.DecodeWorkerStub(ch).Generate(pd_pb2.GenerateRequest(
                    request_id="p1", prompt_token_ids=[5, 6, 7],
                    sampling=pd_pb2.SamplingParams(max_tokens=4, logprobs=-1),
                    push=pd_pb2.KVPush(transfer_id="p1", agent_address="127.0.0.1:9",
                                       ticket=ticket)), timeout=30))
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert_idle(keyed, keyed.workers())
