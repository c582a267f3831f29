"""The models the benchmark serves, exported into a throwaway repository.

``demo``: GRU(128) over 32 features with a Dense(1) head, one output per
timestep (the size the targets are stated for). ``large``: two stacked
GRU(512) layers, for the batching-versus-batch-size-1 comparison. Weights are
random (seeded): speed does not depend on their values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

FEATURES = 32


def build(models_dir: Path) -> Path:
    """Export ``demo`` and ``large`` into ``models_dir``; returns the demo weights file (.npz)
    that the torch baseline loads (keys ``layer/weight``, Keras layout)."""
    import torch

    from gruserve.export.exporter import export_model
    from gruserve.nn import GRU, Dense, InputLayer, Sequential

    torch.manual_seed(0)
    demo = Sequential(
        [
            InputLayer((None, FEATURES)),
            GRU(128, return_sequences=True, name="gru"),
            Dense(1, name="head"),
        ],
        name="demo",
    )
    large = large_model("large")
    rng = np.random.default_rng(0)
    for name, model in (("demo", demo), ("large", large)):
        weights = {
            layer: {k: (rng.normal(size=v.shape) * 0.1).astype(np.float32) for k, v in w.items()}
            for layer, w in model.get_weights().items()
        }
        model.set_weights(weights)
        export_model(
            model.to_spec(),
            weights,
            models_dir=models_dir,
            name=name,
            version=1,
            source={"kind": "benchmark", "note": "random weights"},
        )
        if name == "demo":
            flat: dict[str, Any] = {
                f"{layer}/{key}": value for layer, w in weights.items() for key, value in w.items()
            }
            np.savez(models_dir / "demo-weights.npz", **flat)
    return models_dir / "demo-weights.npz"


def large_model(name: str) -> Any:
    """Two stacked GRU(512) layers over :data:`FEATURES` features and a Dense(1) head (a
    :class:`gruserve.nn.Sequential`, weights not yet set)."""
    from gruserve.nn import GRU, Dense, InputLayer, Sequential

    return Sequential(
        [
            InputLayer((None, FEATURES)),
            GRU(512, return_sequences=True, name="gru_1"),
            GRU(512, return_sequences=True, name="gru_2"),
            Dense(1, name="head"),
        ],
        name=name,
    )


def export_large(models_dir: Path, name: str, version: int, seed: int = 1) -> Path:
    """Export :func:`large_model` as ``name`` at ``version`` (random seeded weights, through
    the production exporter); returns the version folder."""
    from gruserve.export.exporter import export_model

    model = large_model(name)
    rng = np.random.default_rng(seed)
    weights = {
        layer: {k: (rng.normal(size=v.shape) * 0.1).astype(np.float32) for k, v in w.items()}
        for layer, w in model.get_weights().items()
    }
    export_model(
        model.to_spec(),
        weights,
        models_dir=models_dir,
        name=name,
        version=version,
        source={"kind": "benchmark", "note": "random weights"},
    )
    return models_dir / name / str(version)
