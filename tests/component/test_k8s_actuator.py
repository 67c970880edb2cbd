"""The Kubernetes actuator against a local HTTP server that speaks the Deployment scale
subresource (apps/v1 .../deployments/NAME/scale). No real cluster: this checks the exact
requests the official kubernetes client sends for our reads and patches."""

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from kubernetes import client

from scheduler.actuators import KubernetesActuator, KubernetesTarget
from scheduler.state import Registry

NS = "serving"
DEPLOY = {"prefill": "pd-prefill", "decode": "pd-decode"}


class FakeAPIServer:
    def __init__(self) -> None:
        self.replicas = {DEPLOY["prefill"]: 1, DEPLOY["decode"]: 2}
        self.requests: list[dict] = []
        srv = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _scale(self, name):
                return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                        "metadata": {"name": name, "namespace": NS},
                        "spec": {"replicas": srv.replicas[name]},
                        "status": {"replicas": srv.replicas[name], "selector": f"app={name}"}}

            def _route(self):
                parts = self.path.split("?")[0].strip("/").split("/")
                # apis/apps/v1/namespaces/NS/deployments/NAME/scale
                if (len(parts) == 8 and parts[:3] == ["apis", "apps", "v1"]
                        and parts[3] == "namespaces" and parts[5] == "deployments"
                        and parts[7] == "scale" and parts[6] in srv.replicas):
                    return parts[4], parts[6]
                return None, None

            def _reply(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                srv.requests.append({"method": "GET", "path": self.path,
                                     "auth": self.headers.get("Authorization")})
                ns, name = self._route()
                if ns != NS:
                    return self._reply(404, {"kind": "Status", "code": 404})
                self._reply(200, self._scale(name))

            def do_PATCH(self):
                n = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(n))
                srv.requests.append({"method": "PATCH", "path": self.path, "body": body,
                                     "content_type": self.headers.get("Content-Type"),
                                     "auth": self.headers.get("Authorization")})
                ns, name = self._route()
                if ns != NS:
                    return self._reply(404, {"kind": "Status", "code": 404})
                for op in body:       # JSON Patch, as the API server applies it
                    assert op["op"] == "replace" and op["path"] == "/spec/replicas"
                    srv.replicas[name] = op["value"]
                self._reply(200, self._scale(name))

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def apiserver():
    s = FakeAPIServer()
    yield s
    s.close()


def actuator(port: int) -> KubernetesActuator:
    cfg = client.Configuration(host=f"http://127.0.0.1:{port}")
    cfg.api_key = {"BearerToken": "Bearer test-token"}
    return KubernetesActuator(KubernetesTarget(NS, DEPLOY),
                              client.AppsV1Api(client.ApiClient(cfg)))


def test_reads_and_patches_the_scale_subresource(apiserver):
    act = actuator(apiserver.port)
    reg = Registry(5.0)

    async def go():
        await act.refresh(reg, 0)
        assert act.current("prefill", reg) == 1 and act.current("decode", reg) == 2
        await act.apply("prefill", 3, "TTFT p90 over SLO", reg)
        await act.apply("decode", 2, "hold", reg)          # unchanged: no request
        await act.refresh(reg, 1)
        assert act.current("prefill", reg) == 3

    asyncio.run(go())
    base = f"/apis/apps/v1/namespaces/{NS}/deployments"
    assert [(r["method"], r["path"]) for r in apiserver.requests] == [
        ("GET", f"{base}/pd-prefill/scale"), ("GET", f"{base}/pd-decode/scale"),
        ("PATCH", f"{base}/pd-prefill/scale"),
        ("GET", f"{base}/pd-prefill/scale"), ("GET", f"{base}/pd-decode/scale")]
    patch = apiserver.requests[2]
    assert patch["content_type"] == "application/json-patch+json"
    assert patch["body"] == [{"op": "replace", "path": "/spec/replicas", "value": 3}]
    assert all(r["auth"] == "Bearer test-token" for r in apiserver.requests)
    assert apiserver.replicas == {"pd-prefill": 3, "pd-decode": 2}


def test_api_errors_are_logged_and_planning_goes_on(apiserver, caplog):
    act = KubernetesActuator(KubernetesTarget("elsewhere", DEPLOY), actuator(
        apiserver.port).api)
    reg = Registry(5.0)

    async def go():
        await act.refresh(reg, 0)                 # 404s
        assert act.current("prefill", reg) == 0   # falls back to what is registered
        await act.apply("prefill", 2, "x", reg)   # 404: logged, not raised

    asyncio.run(go())
    assert "reading the scale" in caplog.text and "scaling elsewhere/pd-prefill" in caplog.text
