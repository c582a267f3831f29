"""Weights on disk as safetensors: no pickle, so loading a checkpoint runs no code.

Keys are ``"<layer>/<keras path>"`` (``gru/kernel``, ``bidirectional/forward/bias``),
values the Keras-layout float32 arrays. A file is written beside its target
and renamed over it, so a crash or Ctrl-C mid-write leaves the previous
checkpoint whole.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from gruserve.errors import ModelFileError

Weights = Mapping[str, Mapping[str, np.ndarray]]


def save_weights(path: Path, weights: Weights, metadata: Mapping[str, str] | None = None) -> None:
    """Atomically write ``weights`` ({layer: {path: array}}) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {}
    for layer, arrays in weights.items():
        if "/" in layer:
            raise ValueError(f"layer name {layer!r} contains '/'")
        for key, value in arrays.items():
            flat[f"{layer}/{key}"] = np.ascontiguousarray(value, np.float32)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        save_file(flat, temporary, metadata=dict(metadata or {}))
        os.chmod(temporary, 0o644)  # mkstemp makes it private; a checkpoint is not a secret
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_weights(path: Path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, str]]:
    """Read a checkpoint back: ({layer: {path: array}}, metadata).

    Raises:
        ModelFileError: missing or corrupt file.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            flat = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (OSError, SafetensorError, ValueError) as exc:
        raise ModelFileError(path, f"cannot read checkpoint: {exc}") from None
    weights: dict[str, dict[str, np.ndarray]] = {}
    for key, value in flat.items():
        layer, _, rest = key.partition("/")
        weights.setdefault(layer, {})[rest] = value
    return weights, dict(metadata)
