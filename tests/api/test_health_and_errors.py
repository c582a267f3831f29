"""Health, readiness, metrics; one error shape for every failure, never a 5xx for bad input."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from conftest import free_port, serve
from gruserve.api.v1.schemas import ErrorResponse


async def test_health_ready_metrics(
    models_dir: Path, tiny_models: dict[str, Any], store_url: str
) -> None:
    async for s in serve(models_dir, store_url):
        assert (await s.client.get("/healthz")).json() == {"status": "ok"}
        r = await s.client.get("/readyz")
        assert r.status_code == 200 and r.json()["status"] == "ready"
        assert r.json()["store"] == {"kind": store_url.split(":")[0], "reachable": True}
        sid = (await s.client.post("/v1/models/simple/sessions", json={})).json()["session_id"]
        await s.client.post(f"/v1/sessions/{sid}/step", json={"inputs": [1, 2, 3]})
        text = (await s.client.get("/metrics")).text
        assert 'gruserve_batch_size_count{model="simple"} 1.0' in text
        assert "gruserve_sessions 1.0" in text
        assert 'route="/v1/sessions/{session_id}/step",status="200"' in text
        assert 'gruserve_model_loaded{model="simple",provider="cpu",version="1"} 1.0' in text


async def test_error_shape_for_framework_errors(
    models_dir: Path, tiny_models: dict[str, Any]
) -> None:
    async for s in serve(models_dir):
        r = await s.client.get("/v3/nothing")  # (/v2 is the KServe v2 protocol, its own shape)
        assert (
            r.status_code == 404 and ErrorResponse.model_validate(r.json()).error.type == "NotFound"
        )
        r = await s.client.put("/v1/models/simple/predict")
        assert r.status_code == 405 and r.json()["error"]["type"] == "MethodNotAllowed"
        sid = (await s.client.post("/v1/models/simple/sessions", json={})).json()["session_id"]
        r = await s.client.get(f"/v1/sessions/{sid}", params={"include_state": "perhaps"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "include_state"
        r = await s.client.get("/openapi.json")
        paths = r.json()["paths"]
        assert "/v1/sessions/{session_id}/step" in paths and "/v1/models/{model}/predict" in paths
        assert "requestBody" in paths["/v1/sessions/{session_id}/step"]["post"]


async def test_broken_model_is_reported_and_skipped(
    tmp_path: Path, models_dir: Path, tiny_models: dict[str, Any]
) -> None:
    shutil.copytree(models_dir / "simple", tmp_path / "simple")
    shutil.copytree(models_dir / "simple", tmp_path / "tampered")
    with open(tmp_path / "tampered" / "1" / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    (tmp_path / "garbage" / "1").mkdir(parents=True)
    (tmp_path / "garbage" / "1" / "model.json").write_text("{not json")
    async for s in serve(tmp_path):
        listed = {m["name"]: m for m in (await s.client.get("/v1/models")).json()["models"]}
        assert listed["simple"]["ready"] and not listed["tampered"]["ready"]
        assert (
            "sha256" in listed["tampered"]["error"]
            and "cannot read manifest" in listed["garbage"]["error"]
        )
        ready = await s.client.get("/readyz")
        assert ready.status_code == 200 and len(ready.json()["models"]) == 3
        r = await s.client.post("/v1/models/tampered/sessions", json={})
        assert r.status_code == 503 and r.json()["error"]["type"] == "ModelUnavailable"
        r = await s.client.post("/v1/models/simple/predict", json={"inputs": [[[1, 2, 3]]]})
        assert r.status_code == 200


async def test_no_models_is_not_ready(tmp_path: Path) -> None:
    async for s in serve(tmp_path):
        r = await s.client.get("/readyz")
        assert r.status_code == 503 and "no model loaded" in r.json()["reason"]


async def test_unreachable_store_answers_503(models_dir: Path, tiny_models: dict[str, Any]) -> None:
    async for s in serve(models_dir, f"redis://127.0.0.1:{free_port()}/0"):
        r = await s.client.post("/v1/models/simple/sessions", json={})
        assert r.status_code == 503 and r.json()["error"]["type"] == "StoreUnavailable"
        assert "retry" in r.json()["error"]["message"]
        for method, path in [("POST", "/v1/sessions/x/step"), ("GET", "/v1/sessions/x")]:
            r = await s.client.request(
                method, path, json={"inputs": [1, 2, 3]} if method == "POST" else None
            )
            assert r.status_code == 503, r.text
        ready = await s.client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["store"]["reachable"] is False
        r = await s.client.post(
            "/v1/models/simple/predict", json={"inputs": np.zeros((1, 1, 3)).tolist()}
        )
        assert r.status_code == 200  # stateless predict needs no store
        assert (await s.client.get("/metrics")).status_code == 200
