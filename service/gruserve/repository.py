"""The model repository on disk: ``MODELS_DIR/NAME/VERSION/{model.onnx,model.json}``.

Names are validated (no path traversal), versions are positive integers,
and a model is only handed out after its ``model.onnx`` hashes to the
manifest's sha256. Only ONNX and JSON are ever read: no pickle, no code.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from gruserve.errors import RepositoryError
from gruserve.manifest import MANIFEST_FILE, Manifest

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def validate_model_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise RepositoryError(
            f"invalid model name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def versions(model_dir: Path) -> list[int]:
    """The version folders present (ignoring hidden staging folders)."""
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and int(p.name) > 0
    )


def next_version(model_dir: Path) -> int:
    found = versions(model_dir)
    return (found[-1] + 1) if found else 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelVersion:
    """A verified model version ready to be loaded."""

    name: str
    version: int
    path: Path
    manifest: Manifest

    @property
    def onnx_path(self) -> Path:
        return self.path / self.manifest.onnx_file


class ModelRepository:
    """Finds and verifies model versions under one folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            raise RepositoryError(f"models directory {self.root} does not exist")
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and _NAME.match(p.name) and versions(p)
        )

    def resolve(self, name: str, version: int | None = None) -> ModelVersion:
        """Load and verify ``name`` at ``version`` (latest when None)."""
        validate_model_name(name)
        model_dir = self.root / name
        found = versions(model_dir)
        if not found:
            raise RepositoryError(f"no model named {name!r} in {self.root}")
        chosen = found[-1] if version is None else version
        if chosen not in found:
            raise RepositoryError(f"model {name!r} has no version {chosen}; versions: {found}")
        return load_version(model_dir / str(chosen))


def load_version(path: Path) -> ModelVersion:
    """Read one ``NAME/VERSION`` folder, checking the manifest and the ONNX hash."""
    path = Path(path)
    manifest = Manifest.read(path / MANIFEST_FILE)
    if manifest.onnx_file != Path(manifest.onnx_file).name:
        raise RepositoryError(
            f"{path}: onnx_file must be a plain file name, got {manifest.onnx_file!r}"
        )
    onnx_path = path / manifest.onnx_file
    if not onnx_path.is_file():
        raise RepositoryError(f"{path}: {manifest.onnx_file} is missing")
    actual = sha256_file(onnx_path)
    if actual != manifest.onnx_sha256:
        raise RepositoryError(
            f"{onnx_path}: sha256 {actual[:12]}… does not match the manifest's "
            f"{manifest.onnx_sha256[:12]}…; the file was modified or corrupted"
        )
    return ModelVersion(manifest.name, manifest.version, path, manifest)
