"""Keras weight initializers, applied to whole Keras-shaped matrices.

Keras initialises the GRU kernel as one (features, 3*units) matrix and the
recurrent kernel as one (units, 3*units) matrix; glorot limits and orthogonal
rows therefore span all three gates, unlike torch's per-gate defaults. The
draws come from numpy's generator (seeded when ``seed`` is set), so the
statistics match Keras while the exact numbers do not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gruserve.errors import InvalidArgument
from gruserve.layers._serialized import parse_serialized, to_keras

_TRUNCATED_STDDEV = 0.87962566103423978  # stddev of a unit normal truncated at 2 sigma
# Keras 3.12+ lets variance-scaling initializers name the fan axes explicitly.
_AXES = {"input_axes": None, "output_axes": None}
_VS = {"scale": 1.0, "mode": "fan_in", "distribution": "truncated_normal", "seed": None, **_AXES}
_KNOWN: dict[str, dict[str, Any]] = {
    "zeros": {},
    "ones": {},
    "constant": {"value": 0.0},
    "random_normal": {"mean": 0.0, "stddev": 0.05, "seed": None},
    "random_uniform": {"minval": -0.05, "maxval": 0.05, "seed": None},
    "truncated_normal": {"mean": 0.0, "stddev": 0.05, "seed": None},
    "variance_scaling": dict(_VS),
    "glorot_uniform": {"seed": None, **_AXES},
    "glorot_normal": {"seed": None, **_AXES},
    "he_uniform": {"seed": None, **_AXES},
    "he_normal": {"seed": None, **_AXES},
    "lecun_uniform": {"seed": None, **_AXES},
    "lecun_normal": {"seed": None, **_AXES},
    "orthogonal": {"gain": 1.0, "seed": None},
    "identity": {"gain": 1.0},
}
# Short names Keras's ``initializers.get`` also accepts.
_ALIASES = {"uniform": "random_uniform", "normal": "random_normal", "zero": "zeros", "one": "ones"}
# The named variance-scaling family: (scale, mode, distribution).
_FAMILY = {
    "glorot_uniform": (1.0, "fan_avg", "uniform"),
    "glorot_normal": (1.0, "fan_avg", "truncated_normal"),
    "he_uniform": (2.0, "fan_in", "uniform"),
    "he_normal": (2.0, "fan_in", "truncated_normal"),
    "lecun_uniform": (1.0, "fan_in", "uniform"),
    "lecun_normal": (1.0, "fan_in", "truncated_normal"),
}


def compute_fans(
    shape: tuple[int, ...],
    input_axes: list[int] | None = None,
    output_axes: list[int] | None = None,
) -> tuple[float, float]:
    """Keras's fan-in/fan-out: rows/columns of a matrix, the length of a vector."""
    if input_axes is not None or output_axes is not None:
        fan_in = math.prod(shape[a] for a in (input_axes if input_axes is not None else [-2]))
        fan_out = math.prod(shape[a] for a in (output_axes if output_axes is not None else [-1]))
        return float(fan_in), float(fan_out)
    if len(shape) == 0:
        return 1.0, 1.0
    if len(shape) == 1:
        return float(shape[0]), float(shape[0])
    if len(shape) == 2:
        return float(shape[0]), float(shape[1])
    receptive = math.prod(shape[:-2])
    return float(shape[-2] * receptive), float(shape[-1] * receptive)


@dataclass(frozen=True)
class Initializer:
    """A parsed Keras initializer; call it with a shape to draw weights."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)

    def __call__(
        self, shape: tuple[int, ...], rng: np.random.Generator | None = None
    ) -> np.ndarray:
        seed = self.config.get("seed")
        rng = rng if rng is not None and seed is None else np.random.default_rng(seed)
        return _draw(self.name, self.config, tuple(shape), rng).astype(np.float32)

    def to_keras(self) -> dict[str, Any]:
        return to_keras(self.name, self.config)


def get_initializer(identifier: Any, *, where: str, argument: str) -> Initializer:
    """An initializer from a name or a serialized dict.

    ``None`` is glorot_uniform: Keras's ``add_weight`` falls back to it for a
    float variable created without an initializer.
    """
    if identifier is None:
        identifier = "glorot_uniform"
    parsed = parse_serialized(
        identifier, where=where, argument=argument, known=_KNOWN, aliases=_ALIASES
    )
    if parsed is None:
        raise InvalidArgument(where, argument, identifier, "an initializer (not None)")
    name, config = parsed
    if name == "variance_scaling":
        if config["mode"] not in ("fan_in", "fan_out", "fan_avg"):
            raise InvalidArgument(
                where, f"{argument}.mode", config["mode"], ["fan_in", "fan_out", "fan_avg"]
            )
        if config["distribution"] not in (
            "truncated_normal",
            "untruncated_normal",
            "uniform",
            "normal",
        ):
            raise InvalidArgument(
                where,
                f"{argument}.distribution",
                config["distribution"],
                ["truncated_normal", "untruncated_normal", "uniform"],
            )
    return Initializer(name, config)


def _draw(
    name: str, config: dict[str, Any], shape: tuple[int, ...], rng: np.random.Generator
) -> np.ndarray:
    if name == "zeros":
        return np.zeros(shape)
    if name == "ones":
        return np.ones(shape)
    if name == "constant":
        return np.full(shape, float(config["value"]))
    if name == "random_normal":
        return rng.normal(config["mean"], config["stddev"], shape)
    if name == "random_uniform":
        return rng.uniform(config["minval"], config["maxval"], shape)
    if name == "truncated_normal":
        return config["mean"] + _truncated(rng, shape) * config["stddev"]
    if name == "orthogonal":
        return _orthogonal(shape, float(config["gain"]), rng)
    if name == "identity":
        if len(shape) != 2:
            raise InvalidArgument("identity initializer", "shape", shape, "a 2-D shape")
        return float(config["gain"]) * np.eye(*shape)
    # variance_scaling's own arguments as its config holds them; float()/str() convert them.
    given: tuple[Any, Any, Any] = (
        config.get("scale"),
        config.get("mode"),
        config.get("distribution"),
    )
    scale, mode, distribution = _FAMILY.get(name, given)
    fans = compute_fans(shape, config.get("input_axes"), config.get("output_axes"))
    return _variance_scaling(shape, fans, float(scale), str(mode), str(distribution), rng)


def _truncated(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Unit normal truncated to [-2, 2] by redrawing, as Keras's backends do."""
    out = rng.standard_normal(shape)
    bad = np.abs(out) > 2.0
    while bad.any():
        out[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(out) > 2.0
    return out


def _variance_scaling(
    shape: tuple[int, ...],
    fans: tuple[float, float],
    scale: float,
    mode: str,
    distribution: str,
    rng: np.random.Generator,
) -> np.ndarray:
    fan_in, fan_out = fans
    n = {"fan_in": fan_in, "fan_out": fan_out}.get(mode, (fan_in + fan_out) / 2.0)
    scale /= max(1.0, n)
    if distribution == "truncated_normal":
        return _truncated(rng, shape) * (math.sqrt(scale) / _TRUNCATED_STDDEV)
    if distribution in ("untruncated_normal", "normal"):
        return rng.standard_normal(shape) * math.sqrt(scale)
    limit = math.sqrt(3.0 * scale)
    return rng.uniform(-limit, limit, shape)


def _orthogonal(shape: tuple[int, ...], gain: float, rng: np.random.Generator) -> np.ndarray:
    """Keras's orthogonal: QR of a normal matrix, signs fixed by diag(R)."""
    if len(shape) < 2:
        raise InvalidArgument("orthogonal initializer", "shape", shape, "a shape of rank 2 or more")
    rows = math.prod(shape[:-1])
    cols = shape[-1]
    flat = (max(rows, cols), min(rows, cols))
    q, r = np.linalg.qr(rng.standard_normal(flat))
    q = q * np.sign(np.diag(r))
    if rows < cols:
        q = q.T
    return gain * q[:rows, :cols].reshape(shape)
