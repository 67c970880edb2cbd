"""Who may call what on the internal plane, and KV handles nobody else can make.

One cluster secret (`pdserve serve` makes 32 random bytes per cluster; a multi-host
deployment gives every pdserve process the same secret by file or environment) derives:
- one bearer token per role, HMAC-SHA256(secret, "pdserve-role:" + role), sent as
  `authorization: Bearer <role>.<hex>` on every internal gRPC call;
- the key that signs KV handles (a decode worker loads KV only with a handle a producer of
  this cluster signed, and only once).

Every gRPC service checks every call against ACL: only workers register, heartbeat, stream
KV events and use the KV agents; only the frontend routes, reports and drives the workers;
drain and role changes are admin actions. A process that needs no server and signs nothing
(the frontend) can be given its role token alone (PDSERVE_CLUSTER_TOKEN) instead of the
secret. The standard health service stays open: Kubernetes' probes carry no token, and it
says nothing but SERVING or NOT_SERVING.

Pure logic and grpc's interceptor types only; where the credential comes from (environment,
file) is read once per process by `from_env`.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import secrets
from array import array
from collections import namedtuple
from dataclasses import dataclass

import grpc

ENV_SECRET = "PDSERVE_CLUSTER_SECRET"
ENV_SECRET_FILE = "PDSERVE_CLUSTER_SECRET_FILE"
ENV_TOKEN = "PDSERVE_CLUSTER_TOKEN"           # one role's token, for clients without the secret
ENV_OFF = "PDSERVE_INTERNAL_AUTH"             # "off": no checks (explicit, never the default)

WORKER, FRONTEND, ADMIN = "worker", "frontend", "admin"
ROLES = (WORKER, FRONTEND, ADMIN)
HEADER = "authorization"

_W, _F, _A = frozenset({WORKER}), frozenset({FRONTEND}), frozenset({ADMIN})
_S, _P, _D, _K = ("/pdserve.v1.Scheduler/", "/pdserve.v1.PrefillWorker/",
                  "/pdserve.v1.DecodeWorker/", "/pdserve.v1.KVAgent/")
ACL: dict[str, frozenset[str]] = {
    _S + "Register": _W, _S + "Heartbeat": _W, _S + "Deregister": _W, _S + "KVEvents": _W,
    _S + "Route": _F, _S + "Report": _F,
    _S + "ListWorkers": _F | _A, _S + "IndexStats": _F | _A,
    _S + "Drain": _A, _S + "SetRole": _A,
    _P + "Prefill": _F, _P + "Status": _F | _A,
    _D + "Generate": _F, _D + "Abort": _F, _D + "Status": _F | _A,
    _K + "GetAgentInfo": _W, _K + "Acquire": _W, _K + "Offer": _W, _K + "Cancel": _W,
    _K + "Checksum": _W, _K + "Stats": _W | _A,
    # the frontend frees a prefill's blocks when its client went away before decode
    _K + "Release": _W | _F,
}
OPEN = ("/grpc.health.v1.Health/",)


def new_secret() -> str:
    return secrets.token_hex(32)


class Keyring:
    """What the cluster secret derives. Holders can act as any role: give it to the
    scheduler and workers; the frontend needs only its token."""

    def __init__(self, secret: str | bytes) -> None:
        key = secret.encode() if isinstance(secret, str) else secret
        if len(key) < 16:
            raise ValueError("the cluster secret must be at least 16 bytes")
        self._role_key = hmac.new(key, b"pdserve-roles", hashlib.sha256).digest()
        self._sign_key = hmac.new(key, b"pdserve-kv-handles", hashlib.sha256).digest()

    def token(self, role: str) -> str:
        mac = hmac.new(self._role_key, role.encode(), hashlib.sha256).hexdigest()
        return f"{role}.{mac}"

    def role_of(self, token: str) -> str | None:
        """The role a token was minted for, or None if it is not one of ours."""
        role = token.split(".", 1)[0]
        if role in ROLES and hmac.compare_digest(token, self.token(role)):
            return role
        return None

    def sign(self, payload: bytes) -> bytes:
        return hmac.new(self._sign_key, payload, hashlib.sha256).digest()

    def verify(self, payload: bytes, signature: bytes) -> bool:
        return hmac.compare_digest(self.sign(payload), signature)


@dataclass(frozen=True)
class Credentials:
    """This process's standing: the token it calls with, and the keyring if it holds the
    secret (to check callers and sign or verify KV handles)."""
    token: str
    keyring: Keyring | None = None


def off(environ=None) -> bool:
    """Internal auth turned off, explicitly (PDSERVE_INTERNAL_AUTH=off)."""
    env = os.environ if environ is None else environ
    return env.get(ENV_OFF, "").lower() == "off"


def from_env(role: str, required: bool = False, environ=None) -> Credentials | None:
    """Credentials from the environment; None when internal auth is off on purpose, or
    when none is configured and not `required`.

    The command-line entry points require one (they exit with this error otherwise), so a
    process never falls back to accepting anyone unless told to in so many words."""
    env = os.environ if environ is None else environ
    if off(env):
        return None
    secret = env.get(ENV_SECRET, "")
    if not secret and env.get(ENV_SECRET_FILE):
        with open(env[ENV_SECRET_FILE]) as f:
            secret = f.read().strip()
    if secret:
        ring = Keyring(secret)
        return Credentials(ring.token(role), ring)
    if env.get(ENV_TOKEN):
        return Credentials(env[ENV_TOKEN])
    if required:
        raise ValueError(f"no cluster credential: set {ENV_SECRET} or {ENV_SECRET_FILE} (or "
                         f"{ENV_TOKEN} for the frontend), or turn internal auth off "
                         f"explicitly with {ENV_OFF}=off")
    return None


def handle_payload(handle, prompt_ids, cache_salt: str = "") -> bytes:
    """What a KV handle's signature covers: its fields but the signature, the prompt and
    its cache salt."""
    h = type(handle)()
    h.CopyFrom(handle)
    h.ClearField("signature")
    ids = array("I", prompt_ids).tobytes()
    return (h.SerializeToString(deterministic=True) + hashlib.sha256(ids).digest()
            + hashlib.sha256(cache_salt.encode()).digest())


def sign_handle(creds: Credentials | None, handle, prompt_ids, cache_salt: str = "") -> None:
    if creds is not None and creds.keyring is not None:
        handle.signature = creds.keyring.sign(handle_payload(handle, prompt_ids, cache_salt))


def _ticket(transfer_id: str, agent_address: str) -> bytes:
    return b"push\0" + transfer_id.encode() + b"\0" + agent_address.encode()


def push_ticket(creds: Credentials | None, transfer_id: str, agent_address: str) -> bytes:
    """The scheduler's word that `agent_address` is a producer of this cluster, for one
    request: a push-mode decode worker contacts no other (it would hand its token over)."""
    if creds is None or creds.keyring is None:
        return b""
    return creds.keyring.sign(_ticket(transfer_id, agent_address))


def check_push(creds: Credentials | None, push) -> str:
    if creds is None:
        return ""
    if creds.keyring is None or not push.ticket or not creds.keyring.verify(
            _ticket(push.transfer_id, push.agent_address), push.ticket):
        return "push offer without a valid scheduler ticket for that producer"
    return ""


class OnceOnly:
    """Transfer ids already loaded, kept until their lease would have expired (a replayed
    handle after that finds no blocks to read)."""

    def __init__(self, max_ids: int = 100_000) -> None:
        self.seen: dict[str, float] = {}
        self.max_ids = max_ids

    def admit(self, transfer_id: str, expires: float, now: float) -> bool:
        if len(self.seen) >= self.max_ids:
            self.seen = {t: e for t, e in self.seen.items() if e > now}
        if transfer_id in self.seen:
            return False
        if len(self.seen) >= self.max_ids:     # all still live: refuse rather than forget
            return False
        self.seen[transfer_id] = max(expires, now) + 60.0
        return True


def check_handle(creds: Credentials | None, handle, prompt_ids, once: OnceOnly,
                 now: float, cache_salt: str = "") -> str:
    """Why this decode worker must not load from `handle` ("" when it may)."""
    if creds is None:
        return ""
    if creds.keyring is None or not handle.signature:
        return "KV handle is not signed"
    if not creds.keyring.verify(handle_payload(handle, prompt_ids, cache_salt),
                                handle.signature):
        return "KV handle signature does not match (forged, altered, or for another prompt)"
    if not once.admit(handle.transfer_id, handle.lease_expires_unix, now):
        return "KV handle was already used"
    return ""


def authorize(method: str, metadata, ring: Keyring) -> tuple[bool, str]:
    """(allowed, why not) for one call: a valid token of a role the method admits."""
    if method.startswith(OPEN):
        return True, ""
    token = ""
    for key, value in metadata or ():
        if key == HEADER and isinstance(value, str) and value.startswith("Bearer "):
            token = value[7:]
    if not token:
        return False, "no cluster credential"
    role = ring.role_of(token)
    if role is None:
        return False, "invalid cluster credential"
    if role not in ACL.get(method, frozenset()):
        return False, f"role {role} may not call {method}"
    return True, ""


def _denied(handler, code, why: str, aio: bool):
    if handler is None:
        return None
    if aio:
        async def unary(_req, ctx):
            await ctx.abort(code, why)

        async def stream(_req, ctx):
            await ctx.abort(code, why)
            yield  # pragma: no cover (an async generator that never yields)
    else:
        def unary(_req, ctx):
            ctx.abort(code, why)

        def stream(_req, ctx):
            ctx.abort(code, why)
            yield  # pragma: no cover
    kw = dict(request_deserializer=handler.request_deserializer,
              response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    return grpc.stream_stream_rpc_method_handler(stream, **kw)


def _code(why: str):
    return (grpc.StatusCode.PERMISSION_DENIED if why.startswith("role ")
            else grpc.StatusCode.UNAUTHENTICATED)


class AioServerAuth(grpc.aio.ServerInterceptor):
    def __init__(self, ring: Keyring) -> None:
        self.ring = ring

    async def intercept_service(self, continuation, details):
        ok, why = authorize(details.method, details.invocation_metadata, self.ring)
        handler = await continuation(details)
        return handler if ok else _denied(handler, _code(why), why, aio=True)


class ServerAuth(grpc.ServerInterceptor):
    def __init__(self, ring: Keyring) -> None:
        self.ring = ring

    def intercept_service(self, continuation, details):
        ok, why = authorize(details.method, details.invocation_metadata, self.ring)
        handler = continuation(details)
        return handler if ok else _denied(handler, _code(why), why, aio=False)


def server_interceptors(creds: Credentials | None, aio: bool = True) -> list:
    if creds is None:
        return []
    if creds.keyring is None:
        raise ValueError("a gRPC server needs the cluster secret, not only a token")
    return [AioServerAuth(creds.keyring) if aio else ServerAuth(creds.keyring)]


def _with_token(metadata, token: str) -> list:
    return [*(metadata or ()), (HEADER, f"Bearer {token}")]


class _AioToken:
    def __init__(self, token: str) -> None:
        self.token = token

    def _d(self, d):
        return grpc.aio.ClientCallDetails(d.method, d.timeout, _with_token(d.metadata, self.token),
                                          d.credentials, d.wait_for_ready)


# grpc.aio files each interceptor under the first kind it is an instance of: one class each
class _AioUU(_AioToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, d, request):
        return await continuation(self._d(d), request)


class _AioUS(_AioToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, d, request):
        return await continuation(self._d(d), request)


class _AioSU(_AioToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, d, request_iterator):
        return await continuation(self._d(d), request_iterator)


_Details = namedtuple("_Details", ("method", "timeout", "metadata", "credentials",
                                   "wait_for_ready", "compression"))


class _SyncDetails(_Details, grpc.ClientCallDetails):
    pass


class ClientAuth(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self.token = token

    def _d(self, d):
        return _SyncDetails(d.method, d.timeout, _with_token(d.metadata, self.token),
                            d.credentials, getattr(d, "wait_for_ready", None),
                            getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, d, request):
        return continuation(self._d(d), request)

    def intercept_unary_stream(self, continuation, d, request):
        return continuation(self._d(d), request)

    def intercept_stream_unary(self, continuation, d, request_iterator):
        return continuation(self._d(d), request_iterator)


def aio_channel(address: str, creds: Credentials | None, options=None):
    """An asyncio channel that attaches this process's token to every call."""
    icpt = ([k(creds.token) for k in (_AioUU, _AioUS, _AioSU)] if creds is not None
            else None)
    return grpc.aio.insecure_channel(address, options=options, interceptors=icpt)


def channel(address: str, creds: Credentials | None, options=None):
    """A blocking channel that attaches this process's token to every call."""
    ch = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(ch, ClientAuth(creds.token)) if creds is not None else ch


# ---------------------------------------------------------------- command line

def secret_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster-secret-file", default="",
                   help="the cluster secret that authenticates internal gRPC (default: "
                        "PDSERVE_CLUSTER_SECRET or PDSERVE_CLUSTER_SECRET_FILE; `serve` "
                        "makes one; see docs/security.md)")


# who each command calls the internal plane as, and whether it must hold the secret (it
# serves gRPC or signs KV handles); `serve` makes a secret itself
AUTH_ROLE = {"prefill": (WORKER, True), "decode": (WORKER, True), "mixed": (WORKER, True),
             "scheduler": (ADMIN, True), "frontend": (FRONTEND, False),
             "set-role": (ADMIN, False)}


def check_credentials(ns) -> str:
    """An error when a command that talks to the internal plane has no credential."""
    if getattr(ns, "cluster_secret_file", ""):
        os.environ[ENV_SECRET_FILE] = ns.cluster_secret_file    # children inherit it
    if ns.cmd not in AUTH_ROLE:
        return ""
    role, secret = AUTH_ROLE[ns.cmd]
    try:
        creds = from_env(role, required=True)
    except (ValueError, OSError) as e:
        return f"pdserve {ns.cmd}: {e}"
    if secret and creds is not None and creds.keyring is None:
        return f"pdserve {ns.cmd}: needs the cluster secret ({ENV_SECRET} or a file), not a token"
    return ""
