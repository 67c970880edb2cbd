"""The internal plane's credentials, ACL and KV handle signatures, and the HTTP API keys,
without a network."""

import pytest

from frontend import security
from pdserve import auth
from pdserve.rpc import pd_pb2

SECRET = "s" * 32


def md(token):
    return ((auth.HEADER, f"Bearer {token}"),)


def test_role_tokens_come_from_the_secret_and_name_their_role():
    ring = auth.Keyring(SECRET)
    for role in auth.ROLES:
        assert ring.role_of(ring.token(role)) == role
    other = auth.Keyring("t" * 32)
    assert ring.role_of(other.token(auth.WORKER)) is None        # another cluster's
    forged = "admin." + ring.token(auth.WORKER).split(".", 1)[1]  # a worker's mac as admin
    assert ring.role_of(forged) is None
    assert ring.role_of("") is None and ring.role_of("worker") is None
    with pytest.raises(ValueError):
        auth.Keyring("short")


@pytest.mark.parametrize("method,role,ok", [
    ("/pdserve.v1.Scheduler/Register", auth.WORKER, True),
    ("/pdserve.v1.Scheduler/Register", auth.FRONTEND, False),     # no hijacking from HTTP
    ("/pdserve.v1.Scheduler/Route", auth.FRONTEND, True),
    ("/pdserve.v1.Scheduler/Route", auth.WORKER, False),
    ("/pdserve.v1.Scheduler/Drain", auth.FRONTEND, False),        # drain is an admin action
    ("/pdserve.v1.Scheduler/SetRole", auth.ADMIN, True),
    ("/pdserve.v1.Scheduler/KVEvents", auth.FRONTEND, False),
    ("/pdserve.v1.Scheduler/Report", auth.WORKER, False),
    ("/pdserve.v1.DecodeWorker/Generate", auth.FRONTEND, True),
    ("/pdserve.v1.DecodeWorker/Generate", auth.WORKER, False),
    ("/pdserve.v1.KVAgent/GetAgentInfo", auth.FRONTEND, False),  # the KV cache's map
    ("/pdserve.v1.KVAgent/GetAgentInfo", auth.WORKER, True),
    ("/pdserve.v1.KVAgent/Release", auth.FRONTEND, True),
    ("/pdserve.v1.Unknown/Method", auth.ADMIN, False),           # not listed: nobody
])
def test_acl(method, role, ok):
    ring = auth.Keyring(SECRET)
    allowed, why = auth.authorize(method, md(ring.token(role)), ring)
    assert allowed is ok
    assert ok or why.startswith("role ")


def test_calls_without_a_valid_token_are_unauthenticated_but_health_is_open():
    ring = auth.Keyring(SECRET)
    m = "/pdserve.v1.Scheduler/ListWorkers"
    assert auth.authorize(m, (), ring) == (False, "no cluster credential")
    assert auth.authorize(m, (("authorization", "Basic x"),), ring)[0] is False
    assert auth.authorize(m, md("admin.00"), ring) == (False, "invalid cluster credential")
    assert auth.authorize("/grpc.health.v1.Health/Check", (), ring) == (True, "")
    # every listed method names at least one role, and only known ones
    assert all(roles and roles <= set(auth.ROLES) for roles in auth.ACL.values())


def test_every_rpc_of_our_services_is_in_the_acl():
    services = pd_pb2.DESCRIPTOR.services_by_name
    listed = {f"/pdserve.v1.{s}/{m.name}" for s in services
              for m in services[s].methods}
    assert listed == set(auth.ACL)


def test_credentials_from_the_environment(tmp_path):
    c = auth.from_env(auth.WORKER, environ={auth.ENV_SECRET: SECRET})
    assert c.keyring is not None and c.keyring.role_of(c.token) == auth.WORKER
    f = tmp_path / "secret"
    f.write_text(SECRET + "\n")
    c2 = auth.from_env(auth.WORKER, environ={auth.ENV_SECRET_FILE: str(f)})
    assert c2.token == c.token
    t = auth.from_env(auth.FRONTEND, environ={auth.ENV_TOKEN: "frontend.abc"})
    assert t.token == "frontend.abc" and t.keyring is None
    assert auth.from_env(auth.WORKER, environ={}) is None
    with pytest.raises(ValueError, match="no cluster credential"):
        auth.from_env(auth.WORKER, required=True, environ={})
    assert auth.from_env(auth.WORKER, required=True, environ={auth.ENV_OFF: "off"}) is None
    with pytest.raises(ValueError):            # a token cannot check callers
        auth.server_interceptors(t)


def handle():
    return pd_pb2.KVHandle(transfer_id="t1", engine_id="e", agent_address="127.0.0.1:1",
                           block_ids=[1, 2, 3], num_tokens=40, compat_hash="h",
                           lease_expires_unix=1000.0, block_size=16)


def test_signed_handles_verify_once_and_only_for_their_prompt():
    creds = auth.Credentials("worker.x", auth.Keyring(SECRET))
    prompt = list(range(40))
    h = handle()
    assert auth.check_handle(creds, h, prompt, auth.OnceOnly(), 900.0) == "KV handle is not signed"
    auth.sign_handle(creds, h, prompt)
    once = auth.OnceOnly()
    assert auth.check_handle(creds, h, prompt, once, 900.0) == ""
    assert "already used" in auth.check_handle(creds, h, prompt, once, 901.0)   # replay
    for change in (lambda x: x.block_ids.append(4), lambda x: setattr(x, "agent_address",
                                                                      "10.0.0.1:1"),
                   lambda x: setattr(x, "engine_id", "other"),
                   lambda x: setattr(x, "num_tokens", 41)):
        forged = handle()
        forged.signature = h.signature
        change(forged)
        assert "does not match" in auth.check_handle(creds, forged, prompt, auth.OnceOnly(), 0)
    # the right handle for another prompt (its blocks would enter that prompt's cache)
    assert "does not match" in auth.check_handle(creds, h, prompt[:-1] + [7], auth.OnceOnly(),
                                                 0)
    # the right handle under another tenant's cache salt
    salted = handle()
    auth.sign_handle(creds, salted, prompt, "tenant-a")
    assert auth.check_handle(creds, salted, prompt, auth.OnceOnly(), 0, "tenant-a") == ""
    assert "does not match" in auth.check_handle(creds, salted, prompt, auth.OnceOnly(), 0,
                                                 "tenant-b")
    other = auth.Credentials("worker.y", auth.Keyring("u" * 32))
    assert "does not match" in auth.check_handle(other, h, prompt, auth.OnceOnly(), 0)
    assert auth.check_handle(None, pd_pb2.KVHandle(), prompt, once, 0) == ""    # auth off


def test_push_tickets_bind_a_request_to_its_producer():
    sched = auth.Credentials("admin.x", auth.Keyring(SECRET))
    worker = auth.Credentials("worker.x", auth.Keyring(SECRET))
    t = auth.push_ticket(sched, "r1", "10.0.0.1:5")
    ok = pd_pb2.KVPush(transfer_id="r1", agent_address="10.0.0.1:5", ticket=t)
    assert auth.check_push(worker, ok) == ""
    for bad in (pd_pb2.KVPush(transfer_id="r1", agent_address="10.6.6.6:5", ticket=t),
                pd_pb2.KVPush(transfer_id="r2", agent_address="10.0.0.1:5", ticket=t),
                pd_pb2.KVPush(transfer_id="r1", agent_address="10.0.0.1:5")):
        assert "ticket" in auth.check_push(worker, bad)
    assert auth.push_ticket(None, "r1", "a") == b"" and auth.check_push(None, ok) == ""


def test_once_only_forgets_expired_ids_and_refuses_when_full_of_live_ones():
    once = auth.OnceOnly(max_ids=2)
    assert once.admit("a", 10.0, 0.0) and once.admit("b", 10.0, 0.0)
    assert not once.admit("c", 10.0, 1.0)            # full of live ids: refuse, never forget
    assert once.admit("c", 10.0, 100.0)              # a and b long expired
    assert not once.admit("c", 10.0, 100.0)


def test_api_keys():
    keys = security.load_keys(["k1"], environ={security.ENV_KEY: "k2, k3"})
    assert keys == ("k1", "k2", "k3")
    assert security.key_ok("Bearer k2", keys)
    for bad in (None, "", "k2", "Bearer", "Bearer k4", "bearer k2", "Bearer k2x"):
        assert not security.key_ok(bad, keys)
    assert security.guarded("/v1/completions", False) and security.guarded("/v1/models", False)
    assert not security.guarded("/health", True)
    assert not security.guarded("/metrics", False) and security.guarded("/metrics", True)
    assert security.parse_origins('["https://a.example"]') == ("https://a.example",)
    assert security.parse_origins("a,b") == ("a", "b") and security.parse_origins("") == ()


def test_serve_makes_a_secret_and_gives_the_frontend_only_its_token(monkeypatch):
    from pdserve.launcher import cluster_credentials
    for var in (auth.ENV_SECRET, auth.ENV_SECRET_FILE, auth.ENV_TOKEN, auth.ENV_OFF):
        monkeypatch.setenv(var, "x")      # recorded: whatever the test sets is undone after
        monkeypatch.delenv(var)
    fe = cluster_credentials()
    import os
    secret = os.environ[auth.ENV_SECRET]            # the children inherit it
    assert len(secret) == 64
    ring = auth.Keyring(secret)
    assert fe == {auth.ENV_SECRET: None, auth.ENV_SECRET_FILE: None,
                  auth.ENV_TOKEN: ring.token(auth.FRONTEND)}
    assert cluster_credentials()[auth.ENV_TOKEN] == fe[auth.ENV_TOKEN]   # a given one stays
    monkeypatch.delenv(auth.ENV_SECRET)
    monkeypatch.setenv(auth.ENV_OFF, "off")
    assert cluster_credentials() == {} and auth.ENV_SECRET not in os.environ


def test_commands_without_a_credential_refuse_to_start(monkeypatch, tmp_path):
    from types import SimpleNamespace as NS
    for var in (auth.ENV_SECRET, auth.ENV_SECRET_FILE, auth.ENV_TOKEN, auth.ENV_OFF):
        monkeypatch.setenv(var, "x")      # recorded: whatever the test sets is undone after
        monkeypatch.delenv(var)
    assert "no cluster credential" in auth.check_credentials(NS(cmd="scheduler"))
    assert auth.check_credentials(NS(cmd="planner-dryrun")) == ""
    monkeypatch.setenv(auth.ENV_TOKEN, "frontend.x")
    assert auth.check_credentials(NS(cmd="frontend")) == ""
    assert "needs the cluster secret" in auth.check_credentials(NS(cmd="decode"))
    f = tmp_path / "s"
    f.write_text(SECRET)
    assert auth.check_credentials(NS(cmd="decode", cluster_secret_file=str(f))) == ""
