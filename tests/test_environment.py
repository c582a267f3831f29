"""Settings that explain themselves: misspelt names warned about, bad values in one line.

The command-line checks run the real ``gruserve`` and ``uvicorn`` executables.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

import gruserve
from conftest import free_port
from gruserve.environment import accepts, known_variables, load_settings, unknown_variables
from gruserve.errors import SettingsError

BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRUSERVE_")}
    env.update({"GRUSERVE_PROVIDER": "cpu", **extra})
    return env


def test_a_misspelt_name_names_the_closest_setting(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("GRUSERVE_MAX_SESION=3\nGRUSERVE_PORT=9000\n")
    environ = {
        "GRUSERVE_SESION_TTL_S": "60",
        "gruserve_log_levle": "debug",  # names are case-insensitive, as pydantic reads them
        "GRUSERVE_SESSION_TTL_S": "60",
        "GRUSERVE_REPLICAS": "3",  # docker-compose.yml's, not the server's
        "PATH": "/bin",
    }
    assert unknown_variables(environ, tmp_path / ".env") == [
        "GRUSERVE_LOG_LEVLE is not a gruserve setting (ignored); did you mean GRUSERVE_LOG_LEVEL?",
        "GRUSERVE_MAX_SESION is not a gruserve setting (ignored); "
        "did you mean GRUSERVE_MAX_SESSIONS?",
        "GRUSERVE_SESION_TTL_S is not a gruserve setting (ignored); "
        "did you mean GRUSERVE_SESSION_TTL_S?",
    ]
    far = unknown_variables({"GRUSERVE_ZZZ": "1"}, None)
    assert len(far) == 1 and "did you mean" not in far[0] and "GRUSERVE_PORT" in far[0]
    assert unknown_variables(dict.fromkeys(known_variables(), "1"), None) == []


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("GRUSERVE_SESSION_TTL_S", "abc", "it accepts a number > 0"),
        ("GRUSERVE_MAX_SESSIONS", "0", "it accepts an integer >= 1"),
        ("GRUSERVE_PORT", "70000", "it accepts an integer >= 0 and <= 65535"),
        ("GRUSERVE_PROVIDER", "tpu", "it accepts one of 'auto', 'cpu', 'cuda'"),
        ("GRUSERVE_WS_COMPRESSION", "maybe", "it accepts true or false"),
        ("GRUSERVE_SESSION_STORE", "pg://x", "it accepts 'memory' or a redis://"),
        ("GRUSERVE_MODEL_VERSIONS", "demo=1", "JSON object of model names to version numbers"),
        ("GRUSERVE_MODEL_VERSIONS", '{"demo": "x"}', "JSON object of model names"),
        ("GRUSERVE_BATCH_MAX_SIZE", "0", "it accepts an integer >= 1 (unset: none)"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(
    variable: str, value: str, expected: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    (line,) = caught.value.problems
    assert line.startswith(f"{variable}") and expected in line and "\n" not in line


def test_an_api_key_is_never_echoed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError) as caught:
        load_settings(api_keys=["not-a-string-secret"])
    assert "not-a-string-secret" not in str(caught.value)
    assert "api_keys=(value not shown)" in str(caught.value)


def test_what_a_setting_accepts_in_words() -> None:
    assert accepts("snapshot_path") == "a path (unset: none)"
    assert accepts("log_format") == "one of 'text', 'json'"
    assert accepts("batch_max_delay_ms") == "a number >= 0 (unset: none)"
    assert accepts("metrics_public").startswith("true or false")


def test_serve_with_a_bad_value_exits_2_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "gruserve"), "serve", "--port", str(free_port())],
        env=_env(GRUSERVE_SESSION_TTL_S="abc"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "error: GRUSERVE_SESSION_TTL_S='abc' is not accepted (input should be a valid number, "
        "unable to parse string as a number); it accepts a number > 0"
    ]


def test_uvicorn_factory_with_a_bad_value_exits_2_without_a_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            str(BIN / "uvicorn"),
            "--factory",
            "gruserve.server:create_app",
            "--port",
            str(free_port()),
        ],
        env=_env(GRUSERVE_PROVIDER="tpu"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert (
        "error: GRUSERVE_PROVIDER='tpu' is not accepted (input should be 'auto', 'cpu' or "
        "'cuda'); it accepts one of 'auto', 'cpu', 'cuda'"
    ) in result.stderr.splitlines()


def test_a_misspelt_variable_is_warned_about_at_start_up(
    models_dir: Path, tiny_models: dict[str, Any], tmp_path: Path
) -> None:
    port = free_port()
    env = _env(GRUSERVE_MODELS_DIR=str(models_dir), GRUSERVE_SESION_TTL_S="60")
    proc = subprocess.Popen(
        [str(BIN / "gruserve"), "serve", "--port", str(port)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:  # until uvicorn says it listens
            lines.append(line)
            if "Uvicorn running on" in line:
                break
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert (
        "WARNING gruserve: GRUSERVE_SESION_TTL_S is not a gruserve setting (ignored); "
        "did you mean GRUSERVE_SESSION_TTL_S?\n"
    ) in lines


def test_version_and_help_show_defaults() -> None:
    version = subprocess.run(
        [str(BIN / "gruserve"), "--version"], capture_output=True, text=True, timeout=60
    )
    assert (version.returncode, version.stdout) == (0, f"gruserve {gruserve.__version__}\n")
    helped = subprocess.run(
        [str(BIN / "gruserve"), "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**_env(), "COLUMNS": "200", "TERM": "dumb"},
    )
    assert helped.returncode == 0
    text = " ".join(helped.stdout.split())
    assert "[default: GRUSERVE_PORT, else 8000]" in text
    assert "[default: GRUSERVE_HOST, else 127.0.0.1]" in text
    assert "[default: GRUSERVE_MODELS_DIR, else models]" in text


def test_every_setting_is_in_the_readme() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    missing = [name for name in known_variables() if f"`{name}`" not in readme]
    assert missing == []
