"""The README's command blocks, run as a user would run them from a fresh clone.

Every ``bash`` and ``python`` block runs, in README order, except those marked
``<!-- readme-test: skip: REASON -->`` on the line before (Docker, Kubernetes, a GPU, the
install and test commands themselves). Within a block:

- install lines (``make ...``, ``pip install ...``) are not run: the suite runs in the
  environment ``make test`` installed, which is what they make;
- a server command (``gruserve serve``, ``uvicorn --factory``) runs in the background, in
  the foreground or not, until the block ends; the next line runs once it is ready;
- ``localhost:8000`` / ``127.0.0.1:8000`` are a free port: the one of the block's own
  server, or of the server the README's reader started with ``make serve``; so is the gRPC
  port ``localhost:8001`` (that server's ``GRUSERVE_GRPC_PORT``);
- comment lines right under a command (or a ``print``) are its documented output: each must
  appear in the real output, in order (``...`` matches anything; text after three spaces
  and ``(`` or ``<-`` is a remark). ``<!-- readme-test: output unchecked: REASON -->``
  runs a block without comparing.

Blocks that import a Keras file or train run in a scratch copy of the clone (they write
into ``models/``); the rest share one, whose ``models/`` holds the shipped demo only.
The ``gruserve`` on the path is this environment's (an activated ``.venv``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "deploy"))

from deploy_helpers import free_port, server_env, start_server, stop, wait_ready

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARKER = re.compile(r"<!-- readme-test: (skip|output unchecked): (.+) -->")
INSTALL = re.compile(r"^(make\s|pip\s|\.venv/bin/pip\s)")
SERVER = re.compile(r"\bgruserve serve\b|\buvicorn --factory\b")
DOCUMENTED_PORT = "8000"
DOCUMENTED_GRPC_PORT = "8001"
REMARK = re.compile(r"\s{3,}(?:\(|<-).*$")


@dataclass
class Block:
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    skip: str | None = None
    unchecked: bool = False

    @property
    def name(self) -> str:
        return f"README.md:{self.line} ({self.language})"

    @property
    def writes_models(self) -> bool:
        """Writes or reads the models the import blocks make (run with those, not the server)."""
        return any(
            command in self.code
            for command in ("gruserve train", "gruserve import-keras", "gruserve export-keras")
        )

    @property
    def starts_server(self) -> bool:
        return self.language == "bash" and any(map(_starts_server, self.code.splitlines()))

    def documented(self) -> list[str]:
        """The output lines documented under the block's commands."""
        found: list[str] = []
        after_code = False  # the line above is code, or output documented under code
        for line in self.code.splitlines():
            stripped = line.strip()
            if stripped.startswith("#") and after_code:
                text = stripped[2:] if stripped.startswith("# ") else stripped[1:]
                found.append(REMARK.sub("", text).rstrip())
                continue
            after_code = bool(stripped) and not stripped.startswith("#")
        return found


def _command(line: str) -> str:
    """A shell line without its trailing comment."""
    return re.sub(r"(^|\s+)#(\s.*)?$", "", line)


def _starts_server(line: str) -> bool:
    return not INSTALL.match(line) and SERVER.search(_command(line)) is not None


def readme_blocks() -> list[Block]:
    blocks: list[Block] = []
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(bash|python)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = lines.index("```", i + 1)
        block = Block(i + 1, fence.group(1), "\n".join(lines[i + 1 : end]) + "\n")
        marker = MARKER.match(lines[i - 1]) if i else None
        if marker and marker.group(1) == "skip":
            block.skip = marker.group(2)
        elif marker:
            block.unchecked = True
        blocks.append(block)
        i = end + 1
    return blocks


def _pattern(documented: str) -> re.Pattern[str]:
    """``...`` matches as little as it can on one line; a run of spaces, any run of spaces."""
    parts = ("[ \\t]+".join(re.escape(w) for w in p.split(" ")) for p in documented.split("..."))
    return re.compile("[^\\n]*?".join(parts))


def assert_documented_output(block: Block, output: str) -> None:
    """Each documented line, in order, somewhere in ``output`` (curl prints no newline
    after a JSON body, so one output line may hold several replies)."""
    cursor = 0
    for expected in block.documented():
        if expected.strip() in ("", "..."):
            continue
        found = _pattern(" ".join(expected.split())).search(output, cursor)
        if found is None:
            raise AssertionError(
                f"{block.name}: documented output {expected!r} not found in order in:\n"
                f"{output[cursor:]}"
            )
        cursor = found.end()


BASH_PRELUDE = """\
set -e
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true' EXIT
ready() {  # a server the block started answers /readyz
    for _ in $(seq 1 600); do
        curl -s -o /dev/null "127.0.0.1:$1/readyz" && return 0
        sleep 0.1
    done
    echo "no server on port $1" >&2; return 1
}
"""


def bash_script(block: Block, port: int) -> str:
    """The block as a script: installs left out, servers in the background until it ends."""
    out = [BASH_PRELUDE]
    for line in block.code.splitlines():
        if INSTALL.match(line):
            out.append(f": installed already: {line!r}")
        elif _starts_server(line):
            command = _command(line).rstrip().rstrip("&").rstrip()
            out.append(f"{command} > server-{port}.log 2>&1 &")
            out.append(f"ready {port}")
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def _with_port(text: str, port: int, grpc_port: int) -> str:
    for host in ("localhost", "127.0.0.1"):
        text = text.replace(f"{host}:{DOCUMENTED_PORT}", f"{host}:{port}")
        text = text.replace(f"{host}:{DOCUMENTED_GRPC_PORT}", f"{host}:{grpc_port}")
    return text.replace(f"--port {DOCUMENTED_PORT}", f"--port {port}")


def run_block(block: Block, workdir: Path, port: int, grpc_port: int, timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRUSERVE_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["GRUSERVE_PORT"] = str(port)  # what a server the block starts listens on
    env["GRUSERVE_GRPC_PORT"] = str(grpc_port)  # never the shared 8001
    env["GRUSERVE_PROVIDER"] = "cpu"
    code = _with_port(block.code, port, grpc_port)
    if block.language == "bash":
        argv = ["bash", "-c", bash_script(Block(block.line, "bash", code), port)]
    else:
        argv = [sys.executable, "-c", code]
    done = subprocess.run(
        argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{block.name} exited {done.returncode}:\n{output}"
    assert "Traceback" not in output, f"{block.name}:\n{output}"
    if not block.unchecked:
        assert_documented_output(block, done.stdout)
    return output


def _clone(tmp: Path) -> Path:
    """What a fresh clone holds that the blocks use: the model repository and the demo."""
    shutil.copytree(REPO / "models", tmp / "models")
    shutil.copytree(
        REPO / "service" / "gruserve" / "train" / "demo",
        tmp / "service" / "gruserve" / "train" / "demo",
    )
    return tmp


BLOCKS = readme_blocks()


@pytest.fixture(scope="module")
def make_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int, Path]]:
    """What ``make serve`` leaves running: ``gruserve serve --models-dir models`` (HTTP port,
    gRPC port, the clone)."""
    workdir = _clone(tmp_path_factory.mktemp("clone"))
    port, grpc_port = free_port(), free_port()
    env = {
        **server_env(GRUSERVE_GRPC_PORT=str(grpc_port)),
        "GRUSERVE_MODELS_DIR": str(workdir / "models"),
    }
    proc = start_server(port, env, workdir)
    try:
        wait_ready(proc, port)
        yield port, grpc_port, workdir
    finally:
        output = stop(proc)
    assert "Traceback" not in output, output


def test_the_readme_has_blocks_and_says_why_it_skips_some() -> None:
    assert len(BLOCKS) >= 20
    for block in BLOCKS:
        assert block.skip is None or len(block.skip) > 10, block.name
    run = [b for b in BLOCKS if b.skip is None]
    assert any(b.writes_models for b in run) and any(b.starts_server for b in run)
    documented = sum(len(b.documented()) for b in run)
    assert documented >= 40, documented


@pytest.mark.slow
def test_the_serving_blocks_run_and_answer_as_documented(
    make_serve: tuple[int, int, Path],
) -> None:
    missing = [tool for tool in ("curl", "jq") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the README's examples use {', '.join(missing)} (Debian: apt-get install)")
    port, grpc_port, workdir = make_serve
    ran = 0
    for block in BLOCKS:
        if block.skip is not None or block.writes_models:
            continue
        if block.starts_server:
            run_block(block, workdir, free_port(), free_port())
        else:
            run_block(block, workdir, port, grpc_port)
        ran += 1
    assert ran >= 15


@pytest.mark.slow
def test_the_import_and_training_blocks_run(tmp_path: Path) -> None:
    from keras_helpers import keras

    workdir = _clone(tmp_path)
    model = keras.Sequential([keras.Input((None, 2)), keras.layers.GRU(4), keras.layers.Dense(1)])
    model.save(workdir / "my_model.keras")
    model.save(workdir / "legacy.h5")
    model.save(workdir / "my_model_dir", zipped=False)
    blocks = [b for b in BLOCKS if b.skip is None and b.writes_models]
    assert blocks
    for block in blocks:
        run_block(block, workdir, free_port(), free_port(), timeout=600)
    assert (workdir / "models" / "my_model" / "1" / "model.onnx").is_file()
    assert (workdir / "models" / "legacy" / "3" / "model.onnx").is_file()
    assert (workdir / "out.keras").is_file()
    assert (workdir / "models" / "demo" / "2" / "model.json").is_file()  # the repo ships 1
