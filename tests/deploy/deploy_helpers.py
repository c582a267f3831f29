"""Shared by tests/deploy: the repository's deployment files, real servers and a real nginx."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from dockerfile_parse import DockerfileParser

from conftest import free_port

REPO = Path(__file__).resolve().parents[2]
NGINX_DIR = REPO / "deploy" / "nginx"
K8S_DIR = REPO / "deploy" / "k8s"
BIN = Path(sys.executable).parent


# -- Dockerfile ------------------------------------------------------------------------------
class Stage:
    """One ``FROM`` stage of the Dockerfile: its base, name and instructions in order."""

    def __init__(self, base: str, name: str | None) -> None:
        self.base, self.name = base, name
        self.instructions: list[tuple[str, str]] = []

    def values(self, instruction: str) -> list[str]:
        return [v for i, v in self.instructions if i == instruction]

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for value in self.values("ENV"):
            for item in shlex.split(value):
                key, _, val = item.partition("=")
                env[key] = val
        return env


def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    """The global ``ARG`` defaults and the stages of the repository's Dockerfile."""
    parser = DockerfileParser(fileobj=io.BytesIO((REPO / "Dockerfile").read_bytes()))
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for item in parser.structure:
        instruction, value = item["instruction"], item["value"]
        if instruction == "COMMENT":
            continue
        if instruction == "FROM":
            words = value.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            if instruction == "ARG":
                key, _, default = value.partition("=")
                args[key] = default
        else:
            stages[-1].instructions.append((instruction, value))
    return args, stages


def stage(name: str) -> Stage:
    for candidate in dockerfile()[1]:
        if candidate.name == name:
            return candidate
    raise AssertionError(f"the Dockerfile has no stage {name!r}")


def exec_form(value: str) -> list[str]:
    """A JSON-array (exec form) CMD/ENTRYPOINT/HEALTHCHECK CMD argument list."""
    argv = json.loads(value)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), value
    return argv


# -- nginx configuration ---------------------------------------------------------------------
def directive(text: str, name: str) -> list[str]:
    """Values of every ``name ...;`` directive in an nginx configuration text."""
    return [m.group(1).strip() for m in re.finditer(rf"(?m)^\s*{name}\s+([^;]*);", text)]


def location(text: str, pattern: str) -> str:
    """The body of ``location <pattern> { ... }`` (locations here nest no blocks)."""
    match = re.search(r"location\s+" + re.escape(pattern) + r"\s*\{([^}]*)\}", text)
    assert match, f"no location {pattern} in the nginx configuration"
    return match.group(1)


def nginx_size(value: str) -> int:
    units = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    assert match, value
    return int(match.group(1)) * units[match.group(2).lower()]


def find_nginx() -> str:
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if binary is None:
        pytest.skip(
            "nginx is not installed (Debian: apt-get install nginx-light; .ci/run does it): "
            "the multi-replica tests put the repository's nginx configuration in front of "
            "real servers"
        )
    return binary


@contextlib.contextmanager
def nginx(
    upstream_ports: list[int], workdir: Path, grpc: tuple[int, list[int]] | None = None
) -> Iterator[tuple[str, Path]]:
    """A private, unprivileged nginx on a free port serving deploy/nginx/gruserve.conf.

    Its upstream file (the environment's part) lists ``upstream_ports`` on 127.0.0.1. The
    access log (``$uri $upstream_addr $status`` per line) shows which replica served what.
    Yields the ``host:port`` nginx listens on and the access log's path. With ``grpc``
    (``(listen port, upstream gRPC ports)``) it serves deploy/nginx/gruserve-grpc.conf too.
    """
    binary = find_nginx()
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    server = (NGINX_DIR / "gruserve.conf").read_text()
    # the one change: where to listen (nginx takes no variables in `listen`)
    server, count = re.subn(r"(?m)^(\s*)listen\s+8080;", rf"\1listen 127.0.0.1:{port};", server)
    assert count == 1, "deploy/nginx/gruserve.conf should have one `listen 8080;`"
    (workdir / "gruserve.conf").write_text(server)
    upstream = (NGINX_DIR / "upstream-compose.conf").read_text()
    servers = "".join(f"    server 127.0.0.1:{p};\n" for p in upstream_ports)
    upstream, count = re.subn(r"(?m)^\s*server\s+[^;]*;\n", "", upstream)
    assert count >= 1, upstream
    upstream = upstream.replace("upstream gruserve {\n", "upstream gruserve {\n" + servers)
    if grpc is None:  # an upstream without servers is an error to nginx
        upstream = re.sub(r"(?ms)^upstream gruserve_grpc \{.*?^\}\n", "", upstream)
    (workdir / "upstream.conf").write_text(upstream)
    includes = f"    include {workdir}/upstream.conf;\n    include {workdir}/gruserve.conf;\n"
    if grpc is not None:
        listen, grpc_ports = grpc
        block = (NGINX_DIR / "gruserve-grpc.conf").read_text()
        block, count = re.subn(
            r"(?m)^(\s*)listen\s+8081\s+http2;", rf"\1listen 127.0.0.1:{listen} http2;", block
        )
        assert count == 1, "deploy/nginx/gruserve-grpc.conf should have one `listen 8081 http2;`"
        (workdir / "gruserve-grpc.conf").write_text(block)
        grpc_servers = "".join(f"    server 127.0.0.1:{p};\n" for p in grpc_ports)
        upstream = upstream.replace(
            "upstream gruserve_grpc {\n", "upstream gruserve_grpc {\n" + grpc_servers
        )
        (workdir / "upstream.conf").write_text(upstream)
        includes += f"    include {workdir}/gruserve-grpc.conf;\n"
    access_log = workdir / "access.log"
    user = "user root root;\n" if os.geteuid() == 0 else ""  # workers can read the temp dirs
    (workdir / "nginx.conf").write_text(
        f"{user}worker_processes 1;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"    client_body_temp_path {workdir}/client_body;\n"
        f"    proxy_temp_path {workdir}/proxy;\n"
        f"    fastcgi_temp_path {workdir}/fastcgi;\n"
        f"    uwsgi_temp_path {workdir}/uwsgi;\n"
        f"    scgi_temp_path {workdir}/scgi;\n"
        "    log_format upstreams '$uri $upstream_addr $status';\n"
        f"    access_log {access_log} upstreams;\n"
        f"{includes}"
        "}\n"
    )
    command = [
        binary,
        "-p",
        str(workdir),
        "-c",
        str(workdir / "nginx.conf"),
        "-g",
        f"daemon off; pid {workdir}/nginx.pid; error_log stderr;",
    ]
    check = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    with (workdir / "error.log").open("wb") as errors:  # a file: a full pipe would block nginx
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
        try:
            wait_for_port(port, proc)
            yield f"127.0.0.1:{port}", access_log
        finally:
            proc.send_signal(signal.SIGQUIT)  # graceful: finish open requests, then exit
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def upstreams_by_uri(access_log: Path) -> dict[str, list[list[str]]]:
    """``uri -> [[upstreams tried, the one that answered last] per request]`` (access log)."""
    served: dict[str, list[list[str]]] = {}
    for line in access_log.read_text().splitlines():
        uri, rest = line.split(" ", 1)
        upstreams, _status = rest.rsplit(" ", 1)
        served.setdefault(uri, []).append(upstreams.split(", "))
    return served


def homes(lb: str, access_log: Path, session_ids: list[str]) -> dict[str, str]:
    """The replica nginx sends each session's requests to (the shipped upstream hashes on the
    session in the path), found by a GET of each through ``lb`` at ``host:port``: a session
    that does not exist yet hashes as it will (404 from its replica), so a test can choose
    ids by where they will live."""
    with httpx.Client(base_url=f"http://{lb}", timeout=10) as client:
        for session_id in session_ids:
            client.get(f"/v1/sessions/{session_id}")
    uris = [f"/v1/sessions/{sid}" for sid in session_ids]
    deadline = time.monotonic() + 10
    while True:  # nginx logs a request once it is answered: the last line may trail the reply
        served = upstreams_by_uri(access_log)
        if all(uri in served for uri in uris) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return {sid: served[uri][-1][-1] for sid, uri in zip(session_ids, uris, strict=True)}


# -- gruserve processes ----------------------------------------------------------------------
def server_env(store: str = "memory", **extra: str) -> dict[str, str]:
    """The environment of a ``gruserve serve`` on the repository's models (the demo)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRUSERVE_")}
    env.update(
        GRUSERVE_MODELS_DIR=str(REPO / "models"),
        GRUSERVE_PROVIDER="cpu",
        GRUSERVE_SESSION_STORE=store,
        GRUSERVE_LOG_LEVEL="warning",
        # no gRPC unless a test asks: test servers run side by side; 8001 is one port
        **{"GRUSERVE_GRPC_PORT": "0", **extra},
    )
    return env


def start_server(port: int, env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    """``gruserve serve`` on 127.0.0.1:port (not waited for: see :func:`wait_ready`)."""
    return subprocess.Popen(
        [str(BIN / "gruserve"), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def wait_ready(proc: subprocess.Popen[bytes], port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = proc.stdout.read().decode() if proc.stdout else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {output}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not become ready")


def serving(env: dict[str, str], cwd: Path) -> Iterator[str]:
    """A ready ``gruserve serve`` on a free port, as its base URL, for a fixture to ``yield
    from``; stopped afterwards, and a traceback in what it printed fails the test."""
    port = free_port()
    proc = start_server(port, env, cwd)
    try:
        wait_ready(proc, port)
        yield f"http://127.0.0.1:{port}"
    finally:
        output = stop(proc)
    assert "Traceback" not in output, output


def wait_for_port(port: int, proc: subprocess.Popen[Any], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def stop(proc: subprocess.Popen[bytes]) -> str:
    """SIGTERM, wait (kill after 20 s); returns what the process printed."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is None or proc.stdout.closed:  # stopped before
        return ""
    output = proc.stdout.read().decode()
    proc.stdout.close()
    return output


def reference(
    url: str, x: np.ndarray, timeout: float = 30
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Outputs [T, 1] and final states of one stateless demo predict call over ``x`` [T, 1]."""
    reply = httpx.post(
        f"{url}/v1/models/demo/predict",
        json={"inputs": [x.tolist()], "return_state": True},
        timeout=timeout,
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    states = {key: np.asarray(value[0]) for key, value in body["states"].items()}
    return np.asarray(body["outputs"][0]), states


# -- NDJSON over a raw HTTP/1.1 connection ---------------------------------------------------
class NdjsonStream:
    """``POST .../stream`` with a chunked body sent line by line; replies read as they come.

    Every reply is read before the next line is sent, so a proxy that buffered either way
    would make :meth:`step` time out instead of passing.
    """

    def __init__(self, address: str, path: str, timeout: float = 10) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.reader = self.sock.makefile("rb")
        self.headers: dict[str, str] = {}
        self._pending = b""
        self.sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-ndjson\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )

    def send(self, body: dict[str, Any]) -> None:
        line = json.dumps(body).encode() + b"\n"
        self.sock.sendall(b"%x\r\n%s\r\n" % (len(line), line))

    def receive(self) -> dict[str, Any]:
        if not self.headers:
            status = self.reader.readline()
            assert status.startswith(b"HTTP/1.1 200"), status
            while (header := self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = header.decode().partition(":")
                self.headers[name.strip().lower()] = value.strip()
        while b"\n" not in self._pending:  # a line may come in several chunks
            size = int(self.reader.readline().split(b";")[0].strip(), 16)
            assert size > 0, "the response ended before the reply"
            self._pending += self.reader.read(size)
            assert self.reader.read(2) == b"\r\n"
        line, _, self._pending = self._pending.partition(b"\n")
        return dict(json.loads(line))

    def step(self, body: dict[str, Any]) -> dict[str, Any]:
        self.send(body)
        return self.receive()

    def finish(self) -> None:
        """End the request body and read the response to its end."""
        self.sock.sendall(b"0\r\n\r\n")
        while True:
            size = int(self.reader.readline().split(b";")[0].strip(), 16)
            if size == 0:
                break
            self._pending += self.reader.read(size)
            self.reader.read(2)
        assert self.reader.readline() == b"\r\n"
        assert not self._pending.strip(), self._pending

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


# -- a second version of the demo model ------------------------------------------------------
def export_demo_version(models_dir: Path, version: int, seed: int) -> Path:
    """``models_dir/demo/<version>``: the repository's demo model "retrained": its own spec and
    preprocessing, its weights moved by seeded noise, through the production exporter (with
    its parity check). Returns the version folder.
    """
    import onnx

    from gruserve.export.exporter import export_model
    from gruserve.keras_io.writer import onnx_weights, spec_of_manifest
    from gruserve.manifest import Manifest

    demo = REPO / "models" / "demo" / "1"
    manifest = Manifest.read(demo / "model.json")
    spec = spec_of_manifest(manifest)
    weights = onnx_weights(onnx.load(str(demo / manifest.onnx_file)), spec)
    rng = np.random.default_rng(seed)
    moved = {
        layer: {
            k: (v + rng.normal(scale=0.2, size=v.shape)).astype(np.float32) for k, v in w.items()
        }
        for layer, w in weights.items()
    }
    export_model(
        spec,
        moved,
        models_dir=models_dir,
        name="demo",
        version=version,
        source={"kind": "test", "note": f"demo v1 weights + noise (seed {seed})"},
        preprocessing=manifest.preprocessing,
    )
    return models_dir / "demo" / str(version)


def copy_in_atomically(version_dir: Path, model_dir: Path) -> Path:
    """Copy a version folder into a served model folder as operators must: under a hidden
    name first, then one ``rename`` (a poller sees the version whole or not at all)."""
    staging = model_dir / f".incoming-{version_dir.name}"
    shutil.copytree(version_dir, staging)
    target = model_dir / version_dir.name
    staging.rename(target)
    return target


def settings_from_env(variables: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """:class:`~gruserve.settings.Settings` as a server reads these ``GRUSERVE_*`` variables
    from its environment (JSON values decoded the way pydantic-settings decodes them)."""
    from gruserve.settings import Settings

    for key in list(os.environ):
        if key.startswith("GRUSERVE_"):
            monkeypatch.delenv(key)
    for key, value in variables.items():
        monkeypatch.setenv(key, str(value))
    return Settings(_env_file=None)  # type: ignore[call-arg]
