"""Loading the repository: latest or pinned versions, failures recorded, never fatal."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from gruserve.errors import ModelNotFound, ModelUnavailable
from gruserve.runtime.registry import ModelRegistry

CPU = ["CPUExecutionProvider"]


def test_latest_unless_pinned(
    tmp_path: Path, models_dir: Path, tiny_models: dict[str, Any]
) -> None:
    shutil.copytree(models_dir / "simple" / "1", tmp_path / "simple" / "1")
    shutil.copytree(models_dir / "simple" / "1", tmp_path / "simple" / "2")
    manifest = tmp_path / "simple" / "2" / "model.json"
    manifest.write_text(manifest.read_text().replace('"version": 1', '"version": 2'))
    assert ModelRegistry.load(tmp_path, CPU).get("simple").version == 2
    pinned = ModelRegistry.load(tmp_path, CPU, pinned={"simple": 1, "ghost": 3})
    assert pinned.get("simple").version == 1
    statuses = {s.name: s for s in pinned.statuses()}
    assert statuses["simple"].ready and statuses["simple"].provider == "cpu"
    assert not statuses["ghost"].ready and "pinned to version 3" in (statuses["ghost"].error or "")
    with pytest.raises(ModelUnavailable, match="ghost"):
        pinned.get("ghost")
    with pytest.raises(ModelNotFound, match="served models: simple"):
        pinned.get("other")


def test_an_unloadable_graph_is_skipped(
    tmp_path: Path, models_dir: Path, tiny_models: dict[str, Any]
) -> None:
    import hashlib

    shutil.copytree(models_dir / "simple" / "1", tmp_path / "simple" / "1")
    shutil.copytree(models_dir / "simple" / "1", tmp_path / "junk" / "1")
    onnx_file = tmp_path / "junk" / "1" / "model.onnx"
    onnx_file.write_bytes(b"not an onnx graph")
    manifest = tmp_path / "junk" / "1" / "model.json"
    text = manifest.read_text()
    old = text.split('"onnx_sha256": "')[1].split('"')[0]
    manifest.write_text(text.replace(old, hashlib.sha256(b"not an onnx graph").hexdigest()))
    registry = ModelRegistry.load(tmp_path, CPU)
    assert [m.name for m in registry.models()] == ["simple"]
    junk = next(s for s in registry.statuses() if s.name == "junk")
    assert not junk.ready and junk.error
