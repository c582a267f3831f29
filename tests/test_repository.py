"""What the server agrees to load: names, folders and files inside the models directory,
the hash checked on the very bytes loaded, and nothing that can execute code."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gruserve.errors import RepositoryError
from gruserve.repository import ModelRepository, validate_model_name
from gruserve.runtime.model import LoadedModel
from gruserve.runtime.registry import ModelRegistry

CPU = ["CPUExecutionProvider"]
SERVICE = Path(__file__).resolve().parents[1] / "service"


@pytest.fixture
def repo(tmp_path: Path, models_dir: Path, tiny_models: dict[str, Any]) -> Path:
    """A models directory with one good model, ``simple``, and room around it."""
    root = tmp_path / "models"
    shutil.copytree(models_dir / "simple" / "1", root / "simple" / "1")
    return root


def _failure(root: Path, name: str) -> str:
    registry = ModelRegistry.load(root, CPU)
    status = next(s for s in registry.statuses() if s.name == name)
    assert not status.ready, f"{name} was loaded"
    return status.error or ""


def _manifest(path: Path, **changes: Any) -> None:
    data = json.loads((path / "model.json").read_text())
    data.update(changes)
    (path / "model.json").write_text(json.dumps(data))


@pytest.mark.parametrize(
    "name", ["..", "a/../b", "../simple", "demo\n", "d\u00e9mo", "", ".hidden", "a" * 65, "a b"]
)
def test_names_that_could_leave_the_folder_are_refused(name: str) -> None:
    with pytest.raises(RepositoryError, match="invalid model name"):
        validate_model_name(name)


def test_plain_names_pass() -> None:
    for name in ("demo", "demo-2", "a.b_c", "A" * 64):
        assert validate_model_name(name) == name


def test_a_symlink_out_of_the_models_dir_is_refused(repo: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    shutil.copytree(repo / "simple" / "1", outside / "1")
    shutil.copytree(repo / "simple" / "1", outside / "model" / "1")
    _manifest(outside / "1", name="escape")
    _manifest(outside / "model" / "1", name="whole")
    (repo / "escape").mkdir()
    (repo / "escape" / "1").symlink_to(outside / "1")  # a version folder
    (repo / "whole").symlink_to(outside / "model")  # a model folder
    (repo / "simple" / "2").mkdir()  # a file inside a real folder
    for file in ("model.json", "model.onnx"):
        (repo / "simple" / "2" / file).symlink_to(outside / "1" / file)
    for name in ("escape", "whole"):
        assert "outside" in _failure(repo, name)
    assert "outside" in _failure(repo, "simple")  # latest = 2, refused; 1 is not tried instead
    registry = ModelRegistry.load(repo, CPU, pinned={"simple": 1})
    assert [m.name for m in registry.models()] == ["simple"]


def test_a_symlink_within_the_models_dir_is_followed(repo: Path) -> None:
    store = repo / ".versions" / "simple-1"  # hidden: not a model name of its own
    store.parent.mkdir()
    (repo / "simple" / "1").rename(store)
    (repo / "simple" / "1").symlink_to(Path("..") / ".versions" / "simple-1")
    registry = ModelRegistry.load(repo, CPU)
    assert [m.name for m in registry.models()] == ["simple"]
    assert [s.name for s in registry.statuses()] == ["simple"]


@pytest.mark.parametrize(
    "onnx_file", ["../model.onnx", "/etc/passwd", "..", ".", "model.pkl", "sub/model.onnx", ""]
)
def test_onnx_file_must_be_a_plain_onnx_name(repo: Path, onnx_file: str) -> None:
    (repo / "model.onnx").write_bytes((repo / "simple" / "1" / "model.onnx").read_bytes())
    _manifest(repo / "simple" / "1", onnx_file=onnx_file)
    assert "onnx_file must be a plain *.onnx file name" in _failure(repo, "simple")


def test_the_manifest_must_describe_its_folder(repo: Path) -> None:
    _manifest(repo / "simple" / "1", name="other")
    assert "describes 'other' version 1" in _failure(repo, "simple")
    _manifest(repo / "simple" / "1", name="simple", version=3)
    assert "not the folder's 'simple' version 1" in _failure(repo, "simple")


def test_the_hash_is_checked_on_the_bytes_that_are_loaded(repo: Path) -> None:
    version = ModelRepository(repo).resolve("simple")
    onnx = repo / "simple" / "1" / "model.onnx"
    onnx.write_bytes(b"swapped after the check")  # the loader must not read the file again
    model = LoadedModel(version, CPU)
    model.warm_up()
    assert model.name == "simple"
    with pytest.raises(RepositoryError, match="does not match the manifest"):
        ModelRepository(repo).resolve("simple")


SERVING_IMPORTS = """
import json, sys
from gruserve.server import create_app, run_server
import gruserve.cli
print(json.dumps(sorted(m for m in sys.modules if m == "gruserve" or m.startswith("gruserve."))))
"""
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
FORBIDDEN_CALLS = {"eval", "exec", "__import__"}


def _modules_serving_imports() -> list[Path]:
    result = subprocess.run(
        [sys.executable, "-c", SERVING_IMPORTS],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(SERVICE)},
    )
    assert result.returncode == 0, result.stderr
    files = []
    for name in json.loads(result.stdout.splitlines()[-1]):
        path = SERVICE.joinpath(*name.split("."))
        files.append(path / "__init__.py" if path.is_dir() else path.with_suffix(".py"))
    return files


def test_nothing_the_server_runs_can_load_code_from_data() -> None:
    """No pickle (or marshal, dill, joblib...), no eval/exec, np.load only without pickles,
    yaml only safe_load: in every gruserve module a serving process imports."""
    files = _modules_serving_imports()
    assert len(files) > 20 and any(f.name == "repository.py" for f in files)
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names]
                module = getattr(node, "module", None) or ""
                for imported in [module, *names]:
                    assert imported.split(".")[0] not in FORBIDDEN_MODULES, (path, imported)
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                where = f"{path}:{node.lineno}"
                assert called not in FORBIDDEN_CALLS, where
                assert called not in ("unsafe_load", "full_load"), where
                if called == "load" and isinstance(func, ast.Attribute):
                    owner = ast.unparse(func.value)
                    assert owner not in ("torch", "yaml", "pickle"), where
                    if owner in ("np", "numpy"):
                        keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                        assert keywords.get("allow_pickle") == "False", where
