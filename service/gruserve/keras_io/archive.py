"""Open a ``.keras`` archive without Keras: a zip of JSON plus one HDF5 file.

Keras 3 (and tf-keras >= 2.13) write ``metadata.json`` (Keras version, save
date), ``config.json`` (the serialized model) and ``model.weights.h5``; with
``model.save(path, zipped=False)`` Keras 3 writes the same three files into a
directory, which :func:`open_model_directory` reads. This
module only unpacks those three members and turns every way a zip can be
broken (garbage bytes, truncation, a bad CRC, a missing member) into a
:class:`~gruserve.errors.ModelFileError` that names the file, so callers never
see ``zipfile.BadZipFile`` or a raw ``KeyError``.
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py

from gruserve.errors import ModelFileError

CONFIG = "config.json"
METADATA = "metadata.json"
WEIGHTS = "model.weights.h5"
# Errors zipfile/zlib raise for damaged archives or members.
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    EOFError,
    OSError,
    ValueError,
    NotImplementedError,  # a member compressed with a method zipfile lacks
)


@dataclass
class ArchiveContents:
    """What a ``.keras`` file holds; ``weights`` is open only inside :func:`open_archive`."""

    config: dict[str, Any]
    metadata: dict[str, Any]
    weights: h5py.File

    @property
    def keras_version(self) -> str | None:
        version = self.metadata.get("keras_version")
        return str(version) if version is not None else None


@contextmanager
def open_archive(path: Path) -> Iterator[ArchiveContents]:
    """Yield the archive's config, metadata and open weights file."""
    try:
        archive = zipfile.ZipFile(path)
    except _ZIP_ERRORS as exc:
        raise ModelFileError(
            path,
            f"is not a valid .keras archive (a zip file): {exc}. The file is corrupt or "
            "truncated; save it again with model.save('model.keras')",
        ) from exc
    with archive:
        names = set(archive.namelist())
        config = _read_json(archive, path, CONFIG, required=True)
        metadata = _read_json(archive, path, METADATA, required=False)
        if WEIGHTS not in names:
            raise ModelFileError(path, _missing_weights_message(names))
        data = _read_member(archive, path, WEIGHTS)
    try:
        weights = h5py.File(io.BytesIO(data), "r")
    except (OSError, ValueError) as exc:
        raise ModelFileError(
            path, f"{WEIGHTS} inside the archive is not a readable HDF5 file: {exc}"
        ) from exc
    with weights:
        yield ArchiveContents(config=config, metadata=metadata, weights=weights)


@contextmanager
def open_model_directory(path: Path) -> Iterator[ArchiveContents]:
    """Yield the contents of an unzipped Keras 3 model (``model.save(path, zipped=False)``)."""
    names = {p.name for p in path.iterdir()}
    config = _read_json_file(path, CONFIG, required=True)
    metadata = _read_json_file(path, METADATA, required=False)
    if WEIGHTS not in names:
        raise ModelFileError(path, _missing_weights_message(names))
    try:
        weights = h5py.File(path / WEIGHTS, "r")
    except (OSError, ValueError) as exc:
        raise ModelFileError(path, f"{WEIGHTS} is not a readable HDF5 file: {exc}") from exc
    with weights:
        yield ArchiveContents(config=config, metadata=metadata, weights=weights)


def _read_json_file(folder: Path, member: str, *, required: bool) -> dict[str, Any]:
    if not (folder / member).is_file():
        if required:
            raise ModelFileError(folder, f"has no {member}; it is not a Keras model directory")
        return {}
    try:
        return _parse_json(folder, member, (folder / member).read_bytes())
    except OSError as exc:
        raise ModelFileError(folder, f"cannot read {member}: {exc}") from exc


def _parse_json(path: Path, member: str, raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(path, f"{member} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ModelFileError(path, f"{member} must hold a JSON object, got {type(value).__name__}")
    return value


def _missing_weights_message(names: set[str]) -> str:
    if any(name.startswith("model.weights") and name.endswith(".json") for name in names):
        return (
            f"holds sharded weights ({sorted(n for n in names if n.startswith('model.weights'))}); "
            f"only a single {WEIGHTS} is supported: save without max_shard_size"
        )
    return (
        f"has no {WEIGHTS} (members: {sorted(names)}); a .keras file written by "
        "model.save() always has one, so this archive is incomplete"
    )


def _read_member(archive: zipfile.ZipFile, path: Path, member: str) -> bytes:
    try:
        return archive.read(member)
    except _ZIP_ERRORS as exc:
        raise ModelFileError(path, f"cannot read {member} from the archive: {exc}") from exc


def _read_json(
    archive: zipfile.ZipFile, path: Path, member: str, *, required: bool
) -> dict[str, Any]:
    if member not in archive.namelist():
        if required:
            raise ModelFileError(
                path,
                f"has no {member}; it is not a Keras model archive "
                f"(members: {sorted(archive.namelist())})",
            )
        return {}
    return _parse_json(path, member, _read_member(archive, path, member))
