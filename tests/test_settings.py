"""Settings come from GRUSERVE_* variables and .env, are validated, and are all documented."""

from __future__ import annotations

import ast
import inspect
import itertools
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from gruserve import settings as settings_module
from gruserve.settings import Settings


def test_environment_and_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("GRUSERVE_PORT=9001\nGRUSERVE_SESSION_TTL_S=12\n")
    monkeypatch.setenv("GRUSERVE_SESSION_STORE", "redis://cache:6379/2")
    monkeypatch.setenv("GRUSERVE_MODEL_VERSIONS", '{"demo": 3}')
    monkeypatch.setenv("GRUSERVE_LOG_LEVEL", "WARNING")
    s = Settings()
    assert (s.port, s.session_ttl_s, s.session_store) == (9001, 12.0, "redis://cache:6379/2")
    assert s.model_versions == {"demo": 3} and s.log_level == "warning"
    assert Settings(port=1).port == 1  # explicit arguments win (what `gruserve serve --port` does)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("session_store", "postgres://x"),
        ("provider", "tpu"),
        ("max_sessions", 0),
        ("session_ttl_s", 0),
        ("session_max_lifetime_s", -1),
        ("session_eviction", "fifo"),
        ("store_timeout_s", 0),
        ("keepalive_s", 0),
        ("shutdown_grace_s", -1),
    ],
)
def test_invalid_values_are_rejected(field: str, value: Any) -> None:
    with pytest.raises(ValidationError, match=field):
        Settings(_env_file=None, **{field: value})


def test_every_field_has_a_docstring() -> None:
    tree = ast.parse(inspect.getsource(settings_module))
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings").body
    documented = {
        stmt.target.id
        for stmt, following in itertools.pairwise(body)
        if isinstance(stmt, ast.AnnAssign)
        and isinstance(stmt.target, ast.Name)
        and isinstance(following, ast.Expr)
        and isinstance(following.value, ast.Constant)
    }
    assert set(Settings.model_fields) == documented


def test_a_snapshot_is_for_the_memory_store_only(tmp_path: Path) -> None:
    path = tmp_path / "sessions.snapshot"
    assert Settings(_env_file=None, snapshot_path=path).snapshot_path == path
    with pytest.raises(ValidationError, match="snapshot_path is for the memory store"):
        Settings(_env_file=None, snapshot_path=path, session_store="redis://cache:6379/0")


def test_api_keys_are_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRUSERVE_API_KEYS", "k-1,k-2")
    settings = Settings(_env_file=None)
    assert settings.api_keys is not None
    assert settings.api_keys.get_secret_value() == "k-1,k-2"
    assert "k-1" not in repr(settings) and "k-1" not in str(settings.model_dump())
