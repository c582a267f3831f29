"""The baseline: a hand-written FastAPI + torch server, one forward call per request.

This is what one would write without gruserve: sessions in a dict, a
pydantic body, ``torch.nn.GRU`` + ``nn.Linear`` run inline in the async
handler under ``torch.no_grad()`` (no thread hop), one thread for torch
(faster than the default for batch-1 steps on this machine). It serves the
same routes the load generator uses, and checks at start-up that its numbers
equal the exported ONNX model's.

    python -m bench.baseline_torch --models-dir /tmp/bench-models --port 8001
"""

from __future__ import annotations

import argparse
import uuid
from pathlib import Path

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from torch import nn


class StepRequest(BaseModel):
    inputs: list[float] | list[list[float]]


class StepResponse(BaseModel):
    outputs: list[float] | list[list[float]]
    step: int


class GruHead(nn.Module):
    """Keras GRU(reset_after=True) + Dense, with Keras weights mapped to torch's gate order."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        super().__init__()
        kernel, recurrent, bias = (
            weights["gru/kernel"],
            weights["gru/recurrent_kernel"],
            weights["gru/bias"],
        )
        units = recurrent.shape[0]
        self.gru = nn.GRU(kernel.shape[0], units, batch_first=True)
        self.head = nn.Linear(units, weights["head/kernel"].shape[1])

        def reorder(m: np.ndarray) -> np.ndarray:  # Keras [z | r | h] -> torch [r | z | n]
            z, r, h = np.split(m, 3, axis=-1)
            return np.concatenate([r, z, h], axis=-1)

        with torch.no_grad():
            gru = {
                "weight_ih_l0": reorder(kernel).T,
                "weight_hh_l0": reorder(recurrent).T,
                "bias_ih_l0": reorder(bias[0]),
                "bias_hh_l0": reorder(bias[1]),
            }
            for name, value in gru.items():
                self.gru.get_parameter(name).copy_(torch.from_numpy(value.copy()))
            self.head.weight.copy_(torch.from_numpy(weights["head/kernel"].T.copy()))
            self.head.bias.copy_(torch.from_numpy(weights["head/bias"]))

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, h = self.gru(x, h)
        return self.head(y), h


def create_app(weights_file: Path) -> FastAPI:
    torch.set_num_threads(1)
    model = GruHead(dict(np.load(weights_file))).eval()
    units = model.gru.hidden_size
    sessions: dict[str, tuple[torch.Tensor, int]] = {}
    app = FastAPI(title="baseline")

    @app.post("/v1/models/{model_name}/sessions", status_code=201)
    async def create(model_name: str) -> dict[str, object]:
        sid = uuid.uuid4().hex
        sessions[sid] = (torch.zeros(1, 1, units), 0)
        return {"session_id": sid, "step": 0}

    @app.post("/v1/sessions/{session_id}/step", response_model=StepResponse)
    async def step(session_id: str, body: StepRequest) -> StepResponse:
        if session_id not in sessions:
            raise HTTPException(404, "unknown session")
        h, n = sessions[session_id]
        single = not isinstance(body.inputs[0], list)
        x = torch.tensor([[body.inputs]] if single else [body.inputs], dtype=torch.float32)
        with torch.no_grad():
            y, h = model(x, h)
        sessions[session_id] = (h, n + 1)
        out = y[0, 0].tolist() if single else y[0].tolist()
        return StepResponse(outputs=out, step=n + 1)

    @app.delete("/v1/sessions/{session_id}", status_code=204)
    async def delete(session_id: str) -> None:
        if sessions.pop(session_id, None) is None:
            raise HTTPException(404, "unknown session")

    return app


def check_against_onnx(weights_file: Path, onnx_file: Path) -> float:
    """Max |difference| between this torch model and the exported ONNX graph on random steps."""
    import onnxruntime as ort

    model = GruHead(dict(np.load(weights_file))).eval()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, model.gru.input_size)).astype(np.float32)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    feeds = {
        "inputs": x,
        "mask": np.ones((2, 5), bool),
        "initial_state/gru": np.zeros((2, model.gru.hidden_size), np.float32),
    }
    expected = session.run(["outputs"], feeds)[0]
    with torch.no_grad():
        got, _ = model(torch.from_numpy(x), torch.zeros(1, 2, model.gru.hidden_size))
    return float(np.abs(got.numpy() - expected).max())


def main() -> None:
    parser = argparse.ArgumentParser(description="FastAPI + torch per-request baseline server")
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(create_app(args.weights), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
