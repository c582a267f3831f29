"""Tiny real models for the serving tests, and the torch reference they are checked against.

Each builder makes a gruserve torch model with random (seeded, non-zero bias)
weights and exports it with the production exporter, so the server under test
loads exactly what ``gruserve import-keras`` / ``train`` would write.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gruserve.export.exporter import export_model
from gruserve.nn import GRU, Bidirectional, Dense, Embedding, InputLayer, Sequential

FEATURES = 3


@dataclass
class TinyModel:
    """A torch model and where its export lives."""

    name: str
    torch_model: Sequential
    features: int | None  # None: token ids

    def reference(
        self,
        x: np.ndarray,
        states: Mapping[str, np.ndarray] | None = None,
        mask: np.ndarray | None = None,
    ) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        """Outputs and final states of the torch model (batch-major), states by state key."""
        given = (
            None
            if states is None
            else {k: [torch.from_numpy(np.asarray(v, np.float32))] for k, v in states.items()}
        )
        with torch.no_grad():
            outputs, final = self.torch_model.forward_with_states(
                torch.from_numpy(np.asarray(x)),
                None if mask is None else torch.from_numpy(mask),
                given,
                training=False,
            )
        return [o.numpy() for o in outputs], {k: v[0].numpy() for k, v in final.items()}


def _randomize(model: Sequential, seed: int) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    weights = {
        layer: {k: (rng.normal(size=np.shape(v)) * 0.5).astype(np.float32) for k, v in w.items()}
        for layer, w in model.get_weights().items()
    }
    model.set_weights(weights)
    model.eval()
    return weights


def _export(
    models_dir: Path,
    name: str,
    model: Sequential,
    seed: int,
    features: int | None,
    preprocessing: dict[str, Any] | None = None,
) -> TinyModel:
    weights = _randomize(model, seed)
    export_model(
        model.to_spec(),
        weights,
        models_dir=models_dir,
        name=name,
        version=1,
        source={"kind": "test"},
        preprocessing=preprocessing,
    )
    return TinyModel(name, model, features)


def export_versions(
    root: Path, name: str, build: Callable[[int], Sequential], versions: Sequence[int]
) -> Path:
    """Export ``build(v)`` as version ``v`` of model ``name`` under ``root`` for each of
    ``versions``: one model's versions side by side, as a repository holds them during a
    rollout. Returns ``root``."""
    for version in versions:
        model = build(version)
        export_model(
            model.to_spec(),
            model.get_weights(),
            models_dir=root,
            name=name,
            version=version,
            source={"kind": "test"},
        )
    return root


def simple(models_dir: Path, name: str = "simple") -> TinyModel:
    """GRU(4) -> Dense(2), one output per timestep."""
    model = Sequential(
        [
            InputLayer((None, FEATURES)),
            GRU(4, return_sequences=True, name="gru"),
            Dense(2, name="head"),
        ],
        name=name,
    )
    return _export(models_dir, name, model, 1, FEATURES)


def stacked(models_dir: Path, name: str = "stacked") -> TinyModel:
    """GRU(6) -> GRU(5) -> Dense(2): two states."""
    model = Sequential(
        [
            InputLayer((None, FEATURES)),
            GRU(6, return_sequences=True, name="gru_a"),
            GRU(5, return_sequences=True, name="gru_b"),
            Dense(2, name="head"),
        ],
        name=name,
    )
    return _export(models_dir, name, model, 2, FEATURES)


def loop(models_dir: Path, name: str = "loop") -> TinyModel:
    """GRU(reset_after=False, activation=gelu): exported as a Scan loop."""
    model = Sequential(
        [
            InputLayer((None, FEATURES)),
            GRU(5, return_sequences=True, reset_after=False, activation="gelu", name="gru"),
            Dense(2, name="head"),
        ],
        name=name,
    )
    return _export(models_dir, name, model, 3, FEATURES)


def backwards(models_dir: Path, name: str = "backwards") -> TinyModel:
    """GRU(go_backwards=True) -> Dense: outputs in processing order, chunk-wise reversal."""
    model = Sequential(
        [
            InputLayer((None, FEATURES)),
            GRU(5, return_sequences=True, go_backwards=True, name="gru"),
            Dense(2, name="head"),
        ],
        name=name,
    )
    return _export(models_dir, name, model, 4, FEATURES)


def last_only(models_dir: Path, name: str = "last_only") -> TinyModel:
    """GRU(return_sequences=False) -> Dense(2): one output per sequence."""
    model = Sequential(
        [InputLayer((None, FEATURES)), GRU(4, name="gru"), Dense(2, name="head")], name=name
    )
    return _export(models_dir, name, model, 5, FEATURES)


def tokens(models_dir: Path, name: str = "tokens") -> TinyModel:
    """Embedding(10, mask_zero=True) -> GRU(5, return_sequences=True): integer inputs."""
    model = Sequential(
        [
            InputLayer((None,), dtype="int64"),
            Embedding(10, 4, mask_zero=True, name="emb"),
            GRU(5, return_sequences=True, name="gru"),
        ],
        name=name,
    )
    return _export(models_dir, name, model, 6, None)


def bidirectional(models_dir: Path, name: str = "bidi") -> TinyModel:
    """Bidirectional(GRU(4), merge_mode=None): two outputs, two states."""
    model = Sequential(
        [
            InputLayer((None, FEATURES)),
            Bidirectional(GRU(4, return_sequences=True), merge_mode=None, name="bi"),
        ],
        name=name,
    )
    return _export(models_dir, name, model, 7, FEATURES)


PREPROCESSING: dict[str, dict[str, Any]] = {
    "inputs": {"names": ["a", "b", "c"], "mean": [10.0, -2.0, 0.5], "scale": [4.0, 0.5, 2.0]},
    "outputs": {"names": ["y0", "y1"], "mean": [100.0, -1.0], "scale": [10.0, 0.1]},
}


def scaled(models_dir: Path, name: str = "scaled") -> TinyModel:
    """``simple`` with a hand-made preprocessing block: the API speaks raw units."""
    model = Sequential(
        [
            InputLayer((None, FEATURES)),
            GRU(4, return_sequences=True, name="gru"),
            Dense(2, name="head"),
        ],
        name=name,
    )
    return _export(models_dir, name, model, 8, FEATURES, preprocessing=PREPROCESSING)


BUILDERS: dict[str, Callable[[Path], TinyModel]] = {
    "simple": simple,
    "stacked": stacked,
    "loop": loop,
    "backwards": backwards,
    "last_only": last_only,
    "tokens": tokens,
    "bidi": bidirectional,
    "scaled": scaled,
}


def build_all(models_dir: Path, names: Sequence[str] | None = None) -> dict[str, TinyModel]:
    torch.manual_seed(0)
    return {name: BUILDERS[name](models_dir) for name in (names or BUILDERS)}
