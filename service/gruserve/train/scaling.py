"""Per-column affine scaling, fitted on the training split and shipped in the manifest.

The server applies exactly ``model_input = (raw - mean) / scale`` and
``raw_output = model_output * scale + mean`` (manifest ``preprocessing``), so
every method here is expressed as a (mean, scale) pair: ``standard`` is the
mean and population standard deviation, ``minmax`` maps [min, max] to [0, 1],
``none`` is (0, 1). A constant column gets scale 1 so nothing divides by 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

METHODS = ("standard", "minmax", "none")


@dataclass(frozen=True)
class Scaling:
    """The (mean, scale) of each named column."""

    names: list[str]
    mean: np.ndarray
    scale: np.ndarray
    method: str = "none"

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """Raw units -> model units."""
        return ((raw - self.mean) / self.scale).astype(np.float32)

    def invert(self, values: np.ndarray) -> np.ndarray:
        """Model units -> raw units."""
        return np.asarray(values, np.float64) * self.scale + self.mean

    def to_manifest(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "mean": [float(v) for v in self.mean],
            "scale": [float(v) for v in self.scale],
        }


def fit_scaling(values: np.ndarray, names: list[str], method: str) -> Scaling:
    """Statistics of ``values`` (rows, columns), normally the training rows only."""
    columns = values.shape[1]
    if method == "none" or len(values) == 0:
        return Scaling(list(names), np.zeros(columns), np.ones(columns), "none")
    if method == "standard":
        mean, scale = values.mean(axis=0), values.std(axis=0)
    elif method == "minmax":
        mean, scale = values.min(axis=0), values.max(axis=0) - values.min(axis=0)
    else:  # pragma: no cover - the config rejects other names
        raise KeyError(method)
    scale = np.where(scale > 0, scale, 1.0)
    return Scaling(list(names), mean.astype(np.float64), scale.astype(np.float64), method)
