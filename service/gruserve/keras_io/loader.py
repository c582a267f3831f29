"""``load_keras_model``: a Keras file in, a validated spec and its weights out.

The file's content, not its name, picks the reader (a zip is a ``.keras``
archive, an HDF5 signature a legacy ``.h5``); the name only chooses which
error to explain when the content is neither. Every error raised here, or by
the specs it builds, names the file: the person reading it may have many.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gruserve.errors import GruServeError, ModelFileError
from gruserve.keras_io.archive import CONFIG, open_archive, open_model_directory
from gruserve.keras_io.h5 import open_h5
from gruserve.keras_io.topology import Topology, read_topology
from gruserve.keras_io.version import keras_major
from gruserve.keras_io.weights import Weights, archive_weights, legacy_weights
from gruserve.layers.model import ModelSpec

# What h5py, zipfile and zlib raise when damage is found only while reading (h5py opens
# lazily: a file can open fine and fail on the third dataset).
_DAMAGE = (
    OSError,
    RuntimeError,
    ValueError,
    KeyError,
    EOFError,
    NotImplementedError,
    zlib.error,
    zipfile.BadZipFile,
)
_ZIP_MAGIC = b"PK"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


@dataclass(frozen=True)
class KerasModel:
    """An imported model.

    ``weights`` has exactly the keys of ``spec.weight_shapes()``, as float32
    arrays of those shapes. ``source`` records where it came from: ``format``
    (``"keras"``, ``"keras_dir"``, ``"keras_h5"`` or ``"tf_keras_h5"``), ``keras_version`` (as
    recorded in the file, or None), ``path``, ``model_class`` and, when the
    file records them, ``backend`` and ``date_saved``.
    """

    spec: ModelSpec
    weights: dict[str, dict[str, np.ndarray]]
    source: dict[str, Any]


def load_keras_model(path: str | os.PathLike[str]) -> KerasModel:
    """Read a ``.keras`` archive (zipped or not) or a Keras 3 / tf-keras ``.h5`` model file."""
    path = Path(path)
    kind = _sniff(path)
    with _naming(path):
        if kind in ("archive", "directory"):
            opener = open_archive if kind == "archive" else open_model_directory
            with opener(path) as archive:
                version = archive.keras_version
                major = keras_major(path, version, archive.config)
                topology = read_topology(str(path), archive.config)
                spec = _spec(topology, major)
                weights = archive_weights(path, archive.weights, spec, topology.tracked)
                extra = {"date_saved": archive.metadata.get("date_saved")}
            file_format = "keras" if kind == "archive" else "keras_dir"
        else:
            with open_h5(path) as legacy:
                version = legacy.keras_version
                major = keras_major(path, version, legacy.config)
                topology = read_topology(str(path), legacy.config)
                spec = _spec(topology, major)
                weights = legacy_weights(path, legacy.model_weights, spec)
                extra = {"backend": legacy.backend}
            file_format = "tf_keras_h5" if major == 2 else "keras_h5"
    _check_complete(spec, weights)
    source: dict[str, Any] = {
        "format": file_format,
        "keras_version": version,
        "path": str(path),
        "model_class": topology.model_class,
        **{key: value for key, value in extra.items() if value is not None},
    }
    return KerasModel(spec=spec, weights=weights, source=source)


def _spec(topology: Topology, keras_version: int) -> ModelSpec:
    return ModelSpec.from_layer_configs(
        topology.name, list(topology.entries), keras_version=keras_version
    )


def _sniff(path: Path) -> str:
    """``"archive"``, ``"h5"`` or ``"directory"``, from the content; the suffix only breaks ties."""
    if not path.exists():
        raise ModelFileError(path, "no such file")
    if path.is_dir():
        return _sniff_directory(path)
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
        is_hdf5 = head == _HDF5_MAGIC or bool(h5py.is_hdf5(path))
    except OSError as exc:
        raise ModelFileError(path, f"cannot be read: {exc}") from exc
    if head.startswith(_ZIP_MAGIC):
        return "archive"
    if is_hdf5:
        return "h5"
    suffix = path.suffix.lower()
    if suffix == ".keras":
        return "archive"  # let the zip reader explain what is wrong
    if suffix in (".h5", ".hdf5"):
        return "h5"
    raise ModelFileError(
        path,
        "is neither a .keras archive (zip) nor an HDF5 .h5 model file; "
        "save the model with model.save('model.keras')",
    )


def _sniff_directory(path: Path) -> str:
    """A Keras 3 unzipped model has config.json; a TensorFlow SavedModel has saved_model.pb."""
    if (path / CONFIG).is_file():
        return "directory"
    if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
        raise ModelFileError(
            path,
            "is a TensorFlow SavedModel, which is not supported; "
            "save the model with model.save('model.keras') or model.save('model.h5')",
        )
    raise ModelFileError(
        path,
        f"is a directory but neither a Keras 3 model directory (no {CONFIG}; "
        "model.save(path, zipped=False) writes one) nor a TensorFlow SavedModel",
    )


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Name the file in every error raised while reading it.

    Errors from the specs know only layer names: they keep their class and
    attributes (callers catch ``UnsupportedLayer`` or ``ConfigError``) and only
    their message gains the path. Low-level errors from a damaged file become
    :class:`ModelFileError`.
    """
    try:
        yield
    except ModelFileError:
        raise
    except GruServeError as exc:
        message = str(exc)
        if str(path) not in message:
            exc.args = (f"{path}: {message}", *exc.args[1:])
        raise
    except _DAMAGE as exc:
        raise ModelFileError(
            path, f"is damaged and cannot be read ({type(exc).__name__}: {exc}); save it again"
        ) from exc


def _check_complete(spec: ModelSpec, weights: Weights) -> None:
    """The readers build exactly the spec's weight set; anything else is a gruserve bug."""
    expected = {layer: set(paths) for layer, paths in spec.weight_shapes().items()}
    actual = {layer: set(paths) for layer, paths in weights.items()}
    if expected != actual:
        raise AssertionError(f"imported weights {actual} do not match the spec's {expected}")
