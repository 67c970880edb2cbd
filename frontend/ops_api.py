"""The operational endpoints: /health (a prefill and a decode worker are registered),
/metrics, /sd/targets (Prometheus HTTP service discovery of the workers) and /v1/models."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from frontend import tokenize_api
from pdserve.rpc import pd_pb2


def install(app: FastAPI, cfg, state: dict) -> None:
    @app.get("/health")
    async def health():
        try:
            ws = await state["client"].list_workers()
        except Exception as e:  # noqa: BLE001
            return JSONResponse({"status": "unhealthy", "reason": f"scheduler: {e}"}, 503)
        roles = [w.role for w in ws.workers]
        mixed = roles.count(pd_pb2.ROLE_MIXED)          # a mixed worker does both
        prefill, decode = roles.count(pd_pb2.ROLE_PREFILL) + mixed, \
            roles.count(pd_pb2.ROLE_DECODE) + mixed
        ok = prefill > 0 and decode > 0
        body = {"status": "ok" if ok else "unhealthy", "prefill_workers": prefill,
                "decode_workers": decode, "mixed_workers": mixed}
        return JSONResponse(body, 200 if ok else 503)

    tokenize_api.install(app, cfg, state, health)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/sd/targets")
    async def sd_targets():
        """Prometheus HTTP service discovery (http_sd_configs): every registered worker's
        metrics endpoint, from the scheduler, labelled by role and worker id."""
        try:
            ws = await state["client"].list_workers()
        except Exception as e:  # noqa: BLE001
            return JSONResponse({"error": f"scheduler: {e}"}, 503)
        roles = {pd_pb2.ROLE_PREFILL: "prefill", pd_pb2.ROLE_DECODE: "decode",
                 pd_pb2.ROLE_MIXED: "mixed"}
        return [{"targets": [w.metrics_address],
                 "labels": {"pdserve_role": roles.get(w.role, "unknown"),
                            "pdserve_worker": w.worker_id}}
                for w in ws.workers if w.metrics_address]

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": cfg.served_model_name, "object": "model", "created": 0, "owned_by": "pdserve",
            "max_model_len": cfg.max_model_len}]}

