"""What a served model accepts and returns, derived once from its manifest.

The server needs a handful of facts about a model on every request: features
per timestep (or the vocabulary of a token-id model), the state layout, how
outputs line up with right-padded inputs. :class:`ModelSignature` computes them
from ``model.json`` and refuses a manifest whose contract the server cannot
honour (for example preprocessing of the wrong width), so a broken model fails
at load time instead of on a request.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import numpy as np

from gruserve.errors import RepositoryError
from gruserve.manifest import Manifest

PadAlignment = Literal["start", "end"] | None
_RECURRENT = {"GRU", "RNN", "Bidirectional"}


@dataclass(frozen=True)
class Scaling:
    """``model = (raw - mean) / scale`` on the way in, the inverse on the way out."""

    mean: np.ndarray
    scale: np.ndarray


def pad_alignment(manifest: Manifest) -> PadAlignment:
    """Where a chunk's outputs sit when it is right-padded with ``mask=False`` steps.

    Masked steps carry the state, so right padding never changes final states.
    Outputs of a ``go_backwards`` layer come in processing order, so the padded
    (masked) steps come *first* and the chunk's outputs are the last ones
    (``"end"``). Keras passes the unreversed mask on to the next layer, so a
    recurrent layer after such a sequence would see a shifted mask: padding is
    not exact there (``None``), and such chunks are only batched with chunks of
    the same length.
    """
    reversed_sequence = False
    for layer in manifest.layers:
        if layer.class_name not in _RECURRENT:
            continue
        if reversed_sequence:
            return None
        config = layer.config
        if (
            config.get("go_backwards")
            and config.get("return_sequences")
            and layer.class_name != "Bidirectional"
        ):
            reversed_sequence = True
    return "end" if reversed_sequence else "start"


def _vocabulary(manifest: Manifest) -> int | None:
    for layer in manifest.layers:
        if layer.class_name == "Embedding":
            return int(layer.config["input_dim"])
    return None


def _scaling(manifest: Manifest, side: str, width: int | None) -> Scaling | None:
    pre = manifest.preprocessing
    if not pre or not pre.get(side):
        return None
    where = f"model {manifest.name!r} v{manifest.version}: preprocessing.{side}"
    try:
        mean = np.asarray(pre[side]["mean"], np.float32)
        scale = np.asarray(pre[side]["scale"], np.float32)
    except (KeyError, TypeError, ValueError) as exc:
        raise RepositoryError(f"{where} needs numeric 'mean' and 'scale' lists ({exc})") from exc
    if width is None:
        raise RepositoryError(f"{where}: a token-id model cannot scale its inputs")
    if mean.shape != (width,) or scale.shape != (width,):
        raise RepositoryError(
            f"{where}: mean and scale need {width} values each, got {mean.shape} and {scale.shape}"
        )
    if not (np.isfinite(mean).all() and np.isfinite(scale).all()) or (scale == 0).any():
        raise RepositoryError(f"{where}: mean and scale must be finite and scale non-zero")
    return Scaling(mean, scale)


class ModelSignature:
    """The request-facing contract of one model version.

    Attributes:
        features: values per timestep, or None for a token-id model.
        vocabulary: ``input_dim`` of the first Embedding for a token-id model.
        state_keys / state_units: manifest order; a session stores the states
            concatenated into one float32 vector of ``total_units``.
        output_names / output_width: graph outputs and their last dimension.
        pad_alignment: see :func:`pad_alignment`.
    """

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.name, self.version = manifest.name, manifest.version
        self.takes_token_ids = manifest.input.dtype == "int64"
        self.features = None if self.takes_token_ids else manifest.features
        if not self.takes_token_ids and self.features is None:
            raise RepositoryError(
                f"model {self.name!r}: input {manifest.input.shape} has no fixed feature count"
            )
        self.vocabulary = _vocabulary(manifest) if self.takes_token_ids else None
        self.state_keys = [s.key for s in manifest.states]
        self.state_units = [int(s.units) for s in manifest.states]
        bounds = np.cumsum([0, *self.state_units])
        self.state_slices = [slice(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
        self.total_units = int(bounds[-1])
        self.output_names = [t.name for t in manifest.outputs]
        widths = {t.shape[-1] for t in manifest.outputs}
        if len(widths) != 1 or not all(isinstance(w, int) for w in widths):
            raise RepositoryError(
                f"model {self.name!r}: outputs need one fixed width, got {widths}"
            )
        self.output_width = int(widths.pop())
        self.per_timestep = manifest.output_per_timestep
        self.time_major = manifest.time_major
        self.static_timesteps = manifest.static_timesteps
        self.pad_alignment = pad_alignment(manifest)
        self.input_scaling = _scaling(manifest, "inputs", self.features)
        self.output_scaling = _scaling(manifest, "outputs", self.output_width)

    def zero_state(self) -> np.ndarray:
        """A fresh session's state: zeros, as Keras's ``get_initial_state``."""
        return np.zeros(self.total_units, np.float32)

    def split_state(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """The flat session state as ``{state key: (units,)}``."""
        return {key: flat[s] for key, s in zip(self.state_keys, self.state_slices, strict=True)}

    def describe(self) -> dict[str, object]:
        """The JSON-ready description ``GET /v1/models/{model}`` returns."""
        m = self.manifest
        return {
            "name": self.name,
            "version": self.version,
            "inputs": [{"name": t.name, "dtype": t.dtype, "shape": t.shape} for t in m.inputs],
            "outputs": [{"name": t.name, "dtype": t.dtype, "shape": t.shape} for t in m.outputs],
            "features": self.features,
            "vocabulary": self.vocabulary,
            "states": [{"key": s.key, "layer": s.layer, "units": s.units} for s in m.states],
            "output_per_timestep": self.per_timestep,
            "time_major": self.time_major,
            "static_timesteps": self.static_timesteps,
            "layers": [
                {
                    "name": la.name,
                    "class_name": la.class_name,
                    "config": la.config,
                    "export": la.export,
                }
                for la in m.layers
            ],
            "preprocessing": m.preprocessing,
            "batching": m.batching,
            "keras_version": m.keras_version,
            "parity": {k: m.parity.get(k) for k in ("reference", "max_abs_diff", "passed")},
            "source": m.source,
            "metrics": m.metrics,
        }
