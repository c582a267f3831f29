"""Shared fixtures. Keras runs on its torch backend: no TensorFlow anywhere."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# -- serving ---------------------------------------------------------------------------------
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any, TypeVar  # noqa: E402

import httpx  # noqa: E402

import fixtures  # noqa: E402

if TYPE_CHECKING:  # the otel extra: imported by the tests that use it (importorskip)
    from bench.redis_topology import Node
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.util.types import AnyValue

_T = TypeVar("_T")
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before in this run: a test often takes two before
    starting the server that binds them, and the kernel may offer the first one again."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository holding every model of tests/fixtures.py (see ``tiny_models``)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_models(models_dir: Path) -> dict[str, fixtures.TinyModel]:
    """Every model of tests/fixtures.py, exported once per test run into ``models_dir``."""
    return fixtures.build_all(models_dir)


@contextlib.contextmanager
def private_redis(workdir: Path, args: Sequence[str] = ()) -> Iterator[Node]:
    """A redis-server of its own on a free port (no persistence, then ``args``), in a
    folder under ``workdir``; stopped after. Skips the test where Redis is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(
            "redis-server is not installed (Debian: apt-get install redis-server); "
            "the Redis session store tests need a real server"
        )
    from bench.redis_topology import Node, wait_for

    # Node.serving: answered by this process (the port was free when picked, but another
    # test run on the machine may have started its server there first)
    node = Node(binary, workdir, list(args))
    try:
        wait_for(node.serving, f"redis-server on port {node.port}")
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a free port (no persistence) for the whole run."""
    with private_redis(tmp_path_factory.mktemp("redis")) as node:
        yield f"redis://127.0.0.1:{node.port}/0"


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The private Redis, emptied for this test."""
    import redis

    with redis.Redis.from_url(redis_server) as client:
        client.flushdb()
    return redis_server


SHARED_CLUSTER_NODE_TIMEOUT_MS = 15_000
"""``cluster-node-timeout`` of the cluster the tests share (Redis's default). Nothing kills
its nodes, so a failover there is never wanted; at the fault tests' 1 s, a node that a busy
machine leaves without an answer to its peers' pings for a second can be voted out, and its
last writes, not yet on its replica, are lost with it (asynchronous replication)."""


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A private Redis Cluster (3 masters, 3 replicas) for the whole run; see cluster_helpers."""
    from cluster_helpers import local_cluster

    workdir = tmp_path_factory.mktemp("cluster")
    with local_cluster(workdir, node_timeout_ms=SHARED_CLUSTER_NODE_TIMEOUT_MS) as cluster:
        yield cluster


@pytest.fixture
def cluster_url(redis_cluster: Any) -> str:
    """The private Redis Cluster's store URL, converged (every node agreeing on the slot
    map, every replica in sync) and emptied for this test."""
    redis_cluster.wait_healthy(3)
    redis_cluster.flush()
    return str(redis_cluster.url)


@pytest.fixture(params=["memory", "redis"])
def store_url(request: pytest.FixtureRequest) -> str:
    """Runs a test once per session store."""
    if request.param == "memory":
        return "memory"
    return str(request.getfixturevalue("redis_url"))


def serving_settings(models_dir: Path, store: str = "memory", **overrides: Any) -> Any:
    from gruserve.settings import Settings

    overrides.setdefault("grpc_port", 0)  # no gRPC unless a test asks (8001 is one port)
    return Settings(
        _env_file=None, models_dir=models_dir, provider="cpu", session_store=store, **overrides
    )


class Served:
    """An app built by the production factory, with an HTTP client bound to it."""

    def __init__(self, app: Any, client: httpx.AsyncClient) -> None:
        self.app, self.client = app, client

    @property
    def services(self) -> Any:
        return self.app.state.services


async def serve(models_dir: Path, store: str = "memory", **overrides: Any) -> AsyncIterator[Served]:
    from gruserve.server import create_app

    app = create_app(serving_settings(models_dir, store, **overrides))
    async with app.router.lifespan_context(app):
        before = asyncio.all_tasks()  # the app's own background tasks (the sweeper) included
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gruserve") as client:
            yield Served(app, client)
        await _settle(before)


async def _settle(before: set[asyncio.Task[Any]], timeout: float = 10.0) -> None:
    """Let the tasks started since ``before`` (a handler still unwinding after its client
    left, say) end before the lifespan closes the session store under them.

    redis-py loses a connection that a call in flight opens while its client is being
    closed: the socket stays open, and its StreamWriter is garbage-collected in some later
    test, after this test's loop is closed, as a "loop is closed" ResourceWarning (an
    error there). Awaiting the calls first leaves nothing open. On a quiet machine there
    is nothing to wait for; on a busy one a handler may still be in a Redis call here.
    """
    current = asyncio.current_task()
    started = [t for t in asyncio.all_tasks() - before if t is not current and not t.done()]
    if not started:
        return
    _, pending = await asyncio.wait(started, timeout=timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


@pytest.fixture
async def served(
    models_dir: Path, tiny_models: dict[str, Any], store_url: str
) -> AsyncIterator[Served]:
    """The app on either store (parametrised)."""
    async for s in serve(models_dir, store_url):
        yield s


@pytest.fixture
async def client(served: Served) -> httpx.AsyncClient:
    return served.client


@pytest.fixture
async def sessions(models_dir: Path, tiny_models: dict[str, Any]) -> AsyncIterator[Any]:
    """The session service of an app built by the production factory (memory store)."""
    async for s in serve(models_dir):
        yield s.services.sessions


@pytest.fixture
def either(served: Served) -> Any:
    """The same, once per store (memory, Redis)."""
    return served.services.sessions


async def new_sessions(sessions: Any, n: int, model: str = "stacked", **kw: Any) -> list[str]:
    """``n`` new sessions of ``model`` on a session service, by the ids their clients use."""
    from gruserve.sessions.owner import client_id

    return [client_id((await sessions.create(model, **kw)).session_id) for _ in range(n)]


async def until(check: Any, what: str, timeout: float = 60.0) -> None:
    """Poll the coroutine function ``check`` until it answers true; fail naming ``what``
    after ``timeout`` seconds (long: a busy machine makes the wait slower, not wrong)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"still not {what}"
        await asyncio.sleep(0.01)


async def past(moment: float) -> None:
    """Sleep until the wall clock (``time.time()``, the clock of records' ``created_at`` and
    ``last_used_at``, and Redis's ``TIME`` on this machine) is past ``moment``, with a
    margin for Redis's whole milliseconds: what must have expired by then has. A busy
    machine only makes it return later."""
    while (left := moment + 0.005 - time.time()) > 0:
        await asyncio.sleep(left)


async def cancel_while_waiting_on(
    batcher: Any, method: str, request: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start the coroutine ``request``, let it reach ``batcher.<method>`` (held there, as
    a slow model would hold it), then cancel it as a client gone away would."""
    submitted = asyncio.Event()

    async def stuck(*args: Any) -> Any:
        submitted.set()
        await asyncio.Event().wait()  # until cancelled

    monkeypatch.setattr(batcher, method, stuck)
    task = asyncio.ensure_future(request)
    await asyncio.wait_for(submitted.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    monkeypatch.undo()


def outputs_of(result: Any) -> list[np.ndarray]:
    """A step result's outputs, in the model's order (and a failed one shown by assert)."""
    from gruserve.sessions.service import StepResult

    assert isinstance(result, StepResult), result
    return [np.asarray(v) for v in result.outputs.values()]


def all_instances(kind: type[_T], items: Iterable[object]) -> list[_T]:
    """``items``, each asserted to be a ``kind``: the per-item answers of a bulk call (a
    result or the exception of that item) that must all be successes (a failed one shown by
    assert)."""
    checked: list[_T] = []
    for item in items:
        assert isinstance(item, kind), item
        checked.append(item)
    return checked


async def live_server(app: Any) -> AsyncIterator[str]:
    """Serve ``app`` with a real uvicorn on a free port inside this event loop, configured as
    ``gruserve serve`` configures it; yields its address."""
    import uvicorn

    from gruserve.server import uvicorn_options

    port = free_port()
    options = {**uvicorn_options(app.state.settings), "log_level": "warning"}  # as `serve` runs
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", **options)
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def http_exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes
) -> bytes:
    """Send raw request bytes; read one Content-Length response (head and body)."""
    writer.write(raw)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await asyncio.wait_for(reader.readexactly(length), 5)


class StuckStep:
    """What became of a session step that never finishes by itself."""

    def __init__(self) -> None:
        self.started, self.cancelled = asyncio.Event(), asyncio.Event()


@pytest.fixture
def stuck_step(served: Served, monkeypatch: pytest.MonkeyPatch) -> StuckStep:
    """``served``'s session steps wait (10 s) until cancelled, recording start and cancel."""
    events = StuckStep()

    async def step(*args: Any, **kwargs: Any) -> Any:
        events.started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            events.cancelled.set()
            raise

    monkeypatch.setattr(served.services.sessions, "step", step)
    return events


@pytest.fixture
def watchers(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Disconnect watchers started (one per request that outlived the grace period)."""
    from gruserve.api.protocols import _disconnect

    started: list[Any] = []
    original = _disconnect._disconnected

    def counted(receive: Any) -> Any:
        started.append(receive)
        return original(receive)

    monkeypatch.setattr(_disconnect, "_disconnected", counted)
    return started


@pytest.fixture
def keras_in_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Keras float64 reference that is float64 all through. Keras follows JAX's default
    and computes an op on float64 values in float32 on every backend but TensorFlow
    (``keras.src.backend.common.dtypes.BIT64_TO_BIT32_DTYPE``): on torch a "float64" GRU
    runs its matmuls in float32, a reference no better than the float32 runs it judges.
    Found by fuzzing; tests/parity/test_fidelity_grid.py checks that it holds."""
    from keras.src.backend.common import dtypes

    monkeypatch.setitem(dtypes.BIT64_TO_BIT32_DTYPE, "float64", "float64")


# -- tracing ---------------------------------------------------------------------------------
def span_attributes(span: ReadableSpan) -> Mapping[str, AnyValue]:
    """A finished span's attributes. The SDK's ReadableSpan always has a mapping there (its
    annotation, OpenTelemetry's ``Attributes``, allows None)."""
    assert span.attributes is not None, span
    return span.attributes


def span_attribute(span: ReadableSpan, key: str, kind: type[_T]) -> _T:
    """Attribute ``key`` of a finished span, asserted to be a ``kind`` (an attribute value
    may be any of str, bool, int, float, bytes or a sequence or mapping of them)."""
    value = span_attributes(span)[key]
    assert isinstance(value, kind), (key, value)
    return value
