"""The frontend's HTTP locks on a real uvicorn server on loopback: HTTPS with a certificate,
API keys, and CORS. No cluster behind it: /v1/models needs none."""

import shutil
import ssl
import subprocess

import httpx
import pytest

from frontend.app import create_app
from tests.component.loopback import serve, stop
from pdserve.config import FrontendConfig

KEY = "sk-" + "t" * 30
ORIGIN = "https://app.example"


class NoCluster:
    async def close(self):
        pass


def self_signed(cert, key) -> None:
    """A certificate for 127.0.0.1: openssl's CLI, or the cryptography package without it."""
    if shutil.which("openssl"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                        "1", "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True,
                       capture_output=True, timeout=60)
        return
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    c = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
         .public_key(k.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.SubjectAlternativeName(
             [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
         .sign(k, hashes.SHA256()))
    cert.write_bytes(c.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(k.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption()))


@pytest.fixture(scope="module")
def https(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    self_signed(cert, key)
    app = create_app(FrontendConfig(model="unused", served_model_name="m", api_keys=(KEY,),
                                    allowed_origins=(ORIGIN,)),
                     client=NoCluster(), tokenizer=object())
    server, t, port = serve(app, ssl_certfile=str(cert), ssl_keyfile=str(key))
    yield f"https://127.0.0.1:{port}", ssl.create_default_context(cafile=str(cert))
    stop(server, t)


def test_https_with_an_api_key(https):
    url, cert = https
    ok = httpx.get(f"{url}/v1/models", verify=cert, timeout=10,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "m"
    r = httpx.get(f"{url}/v1/models", verify=cert, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(httpx.HTTPError):       # plain HTTP on the TLS port gets nowhere
        httpx.get(url.replace("https", "http") + "/v1/models", timeout=10)


def test_cors_for_allowed_origins_only(https):
    url, cert = https
    pre = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(f"{url}/v1/completions", headers=pre, verify=cert, timeout=10)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.options(f"{url}/v1/completions", verify=cert, timeout=10,
                      headers={**pre, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(f"{url}/v1/models", verify=cert, timeout=10,
                  headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"})
    assert r.headers["access-control-allow-origin"] == ORIGIN
