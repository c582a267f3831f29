"""The model repository on disk: ``MODELS_DIR/NAME/VERSION/{model.onnx,model.json}``.

What the server loads is checked before it is served:

- names are validated (1-64 ASCII letters, digits, ``. _ -``, no ``..``: no path
  traversal), versions are positive integers, and the manifest must name the same
  model and version as its folder;
- every folder and file is resolved (symlinks followed) and must lie inside the
  models directory: a symlink may point elsewhere *within* it, never out of it;
- ``onnx_file`` must be a plain ``*.onnx`` file name in the version folder;
- the ONNX bytes are read once, hashed, compared with the manifest's sha256 and
  handed to onnxruntime from memory, so the file cannot change between the check
  and the load.

Only ONNX (a protobuf) and JSON are ever read: no pickle, no code.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from gruserve.errors import RepositoryError
from gruserve.manifest import MANIFEST_FILE, Manifest

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def validate_model_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
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


def contained(root: Path, path: Path) -> Path:
    """``path`` with every symlink resolved, checked to lie inside ``root`` (resolved).

    Raises:
        RepositoryError: it resolves outside ``root``.
    """
    real = path.resolve()
    if not real.is_relative_to(root.resolve()):
        raise RepositoryError(
            f"{path} resolves to {real}, outside {root.resolve()}: a model's folders and "
            "files (symlinks included) must stay inside the models directory"
        )
    return real


@dataclass(frozen=True)
class ModelVersion:
    """A verified model version ready to be loaded; ``onnx_bytes`` are the verified bytes."""

    name: str
    version: int
    path: Path
    manifest: Manifest
    onnx_bytes: bytes = field(default=b"", repr=False, compare=False)

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
            if p.is_dir() and _NAME.fullmatch(p.name) and ".." not in p.name and versions(p)
        )

    def resolve(self, name: str, version: int | None = None) -> ModelVersion:
        """Load and verify ``name`` at ``version`` (latest when None).

        Raises:
            RepositoryError: an invalid name, no such model or version, a folder or file
                outside the models directory, a manifest for another model or version, or
                the checks of :func:`load_version`.
        """
        validate_model_name(name)
        model_dir = self.root / name
        contained(self.root, model_dir)
        found = versions(model_dir)
        if not found:
            raise RepositoryError(f"no model named {name!r} in {self.root}")
        chosen = found[-1] if version is None else version
        if chosen not in found:
            raise RepositoryError(f"model {name!r} has no version {chosen}; versions: {found}")
        loaded = load_version(model_dir / str(chosen), self.root)
        if (loaded.name, loaded.version) != (name, chosen):
            raise RepositoryError(
                f"{model_dir / str(chosen)}: the manifest describes {loaded.name!r} version "
                f"{loaded.version}, not the folder's {name!r} version {chosen}"
            )
        return loaded


def load_version(path: Path, root: Path | None = None) -> ModelVersion:
    """Read one ``NAME/VERSION`` folder, checking the manifest and the ONNX hash.

    Args:
        path: the version folder.
        root: the models directory every file must resolve inside (the version folder
            itself when None).

    Raises:
        RepositoryError: unreadable or malformed manifest, a file outside ``root``, an
            ``onnx_file`` that is not a plain ``*.onnx`` name, a missing file, or bytes
            whose sha256 is not the manifest's.
    """
    path = Path(path)
    root = Path(root) if root is not None else path
    folder = contained(root, path)
    manifest = Manifest.read(contained(root, path / MANIFEST_FILE))
    name = manifest.onnx_file
    if not isinstance(name, str) or name != Path(name).name or not name.endswith(".onnx"):
        raise RepositoryError(
            f"{path}: onnx_file must be a plain *.onnx file name in the version folder, "
            f"got {name!r}"
        )
    onnx_path = contained(root, path / name)
    if onnx_path.parent != folder or not onnx_path.is_file():
        raise RepositoryError(f"{path}: {name} is missing (or not a file of this folder)")
    data = onnx_path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != manifest.onnx_sha256:
        raise RepositoryError(
            f"{path / name}: sha256 {actual[:12]}… does not match the manifest's "
            f"{str(manifest.onnx_sha256)[:12]}…; the file was modified or corrupted"
        )
    return ModelVersion(manifest.name, manifest.version, path, manifest, data)
