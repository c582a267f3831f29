"""Open a legacy HDF5 model file (``model.save("x.h5")``) without Keras.

Keras 3's legacy writer and tf-keras / Keras 2 share one layout: the root
attributes ``model_config`` (JSON), ``keras_version`` and ``backend``, and a
``model_weights`` group with one subgroup per layer. That subgroup's
``weight_names`` attribute lists the layer's variables in Keras's order, each
name being a path to its dataset relative to the subgroup (tf-keras appends
``:0``). This module reads those attributes; it never guesses dataset paths.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gruserve.errors import ModelFileError


@dataclass
class LegacyContents:
    """Config and weights group of a legacy ``.h5`` model; open only inside :func:`open_h5`."""

    config: dict[str, Any]
    keras_version: str | None
    backend: str | None
    model_weights: h5py.Group


def text_attr(value: Any) -> str:
    """h5py returns attributes as ``str``, ``bytes`` or 0-d arrays depending on the writer."""
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def text_list_attr(group: h5py.Group, name: str) -> list[str] | None:
    """A list-of-names attribute such as ``layer_names``; empty lists come back as float arrays."""
    if name not in group.attrs:
        return None
    value = group.attrs[name]
    return [text_attr(item) for item in np.asarray(value).ravel()]


@contextmanager
def open_h5(path: Path) -> Iterator[LegacyContents]:
    """Yield the model config and the ``model_weights`` group of a legacy ``.h5`` file."""
    try:
        handle = h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise ModelFileError(
            path, f"is not a readable HDF5 file: {exc}. The file is corrupt or truncated"
        ) from exc
    with handle:
        if "model_config" not in handle.attrs:
            raise ModelFileError(
                path,
                "has no `model_config` attribute: it holds weights only (written by "
                "model.save_weights), not a model. Save the whole model with "
                "model.save('model.keras')",
            )
        try:
            config = json.loads(text_attr(handle.attrs["model_config"]))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelFileError(
                path, f"its `model_config` attribute is not valid JSON: {exc}"
            ) from exc
        if not isinstance(config, dict):
            raise ModelFileError(path, "its `model_config` attribute must hold a JSON object")
        weights = handle.get("model_weights")
        if not isinstance(weights, h5py.Group):
            raise ModelFileError(
                path, "has no `model_weights` group: the model's weights are missing"
            )
        version = handle.attrs.get("keras_version", weights.attrs.get("keras_version"))
        backend = handle.attrs.get("backend", weights.attrs.get("backend"))
        yield LegacyContents(
            config=config,
            keras_version=None if version is None else text_attr(version),
            backend=None if backend is None else text_attr(backend),
            model_weights=weights,
        )
