"""The v1 answers the v2 front-ends' tests compare against (HTTP v2 and gRPC alike)."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np


def v1_predict(server: str, model: str, x: np.ndarray, **body: Any) -> dict[str, Any]:
    r = httpx.post(
        f"http://{server}/v1/models/{model}/predict", json={"inputs": x.tolist(), **body}
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def v1_session_outputs(server: str, model: str, steps: np.ndarray) -> np.ndarray:
    """Outputs of a v1 session fed ``steps`` (T, ...) one timestep per request."""
    base = f"http://{server}/v1"
    sid = httpx.post(f"{base}/models/{model}/sessions", json={}).json()["session_id"]
    outs = [
        httpx.post(f"{base}/sessions/{sid}/step", json={"inputs": [s.tolist()]}).json()["outputs"]
        for s in steps
    ]
    assert httpx.delete(f"{base}/sessions/{sid}").status_code == 204
    return np.concatenate(outs)
