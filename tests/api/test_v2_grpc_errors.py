"""The gRPC status codes ``tests/api/test_v2_grpc.py`` does not provoke, provoked end to end
with the stock ``tritonclient.grpc`` client against a real ``gruserve serve``:
ALREADY_EXISTS, PERMISSION_DENIED (and the repository RPCs an admin may call) and ABORTED.
With INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED, UNAUTHENTICATED
and UNAVAILABLE there, every error class of ``grpc_status.STATUS`` is answered by a server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")
import grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from conftest import free_port  # noqa: E402
from gruserve.api.v2 import grpc_status  # noqa: E402
from redis_records import set_stored_field, stored_field  # noqa: E402
from test_server import BIN, _env, _start, _stop  # noqa: E402

ACME, GLOBEX, OPS = (
    {"authorization": "Bearer k-acme"},
    {"x-api-key": "k-globex"},
    {"authorization": "Bearer k-ops"},
)
X = np.ones((1, 1, 3), np.float32)


def tensor(x: np.ndarray) -> Any:
    given = grpcclient.InferInput("inputs", list(x.shape), "FP32")
    given.set_data_from_numpy(x)
    return given


@pytest.fixture
def serving(models_dir: Path, tiny_models: dict[str, Any], tmp_path: Path) -> Iterator[Any]:
    """``serving(store, **env)``: a started ``gruserve serve`` with gRPC, (http, client)."""
    started: list[Any] = []

    def start(store: str = "memory", **env: str) -> tuple[str, Any]:
        port, grpc_port = free_port(), free_port()
        command = ["serve", "--port", str(port), "--grpc-port", str(grpc_port)]
        proc = _start(
            [str(BIN / "gruserve"), *command], _env(models_dir, store, **env), port, tmp_path
        )
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        started.append((proc, client))
        return f"http://127.0.0.1:{port}", client

    yield start
    for proc, client in started:
        client.close()
        _stop(proc)


def _status(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def test_a_sequence_id_an_old_record_of_another_tenant_holds_is_already_exists(
    serving: Any, redis_server: str
) -> None:
    """Tenants have their own id namespaces, so the one session a start can collide with is
    a record from before namespaces: a named tenant's session kept under its plain id, in
    the namespace of the unnamed tenant (bare keys). Such a record is made here as the old
    code wrote it (a bare-key session whose owner is then set to ``acme``); the bare key's
    start of the sequence that maps to that id is refused, as an explicit create of a taken
    id is over HTTP, and the holder's session is untouched."""
    import redis

    url = redis_server.rsplit("/", 1)[0] + "/8"
    redis.Redis.from_url(url).flushdb()
    http, client = serving(url, GRUSERVE_API_KEYS="acme:k-acme,k-plain")
    plain = {"x-api-key": "k-plain"}
    taken = httpx.post(
        f"{http}/v1/models/simple/sessions", json={"session_id": "v2:simple:5"}, headers=plain
    )
    assert taken.status_code == 201, taken.text
    store = redis.Redis.from_url(url)
    key = "gruserve:session:v2:simple:5"
    set_stored_field(store, key, "owner", "acme")
    error = _status(
        lambda: client.infer(
            "simple", [tensor(X)], sequence_id=5, sequence_start=True, headers=plain
        )
    )
    assert error.status() == "StatusCode.ALREADY_EXISTS", error
    assert "v2:simple:5" in error.message()
    assert (stored_field(store, key, "owner"), stored_field(store, key, "step")) == ("acme", "0")
    # a named tenant's sequence 5 lives in its own namespace and starts
    out = client.infer("simple", [tensor(X)], sequence_id=5, sequence_start=True, headers=ACME)
    assert out.as_numpy("outputs").shape[:2] == (1, 1)
    store.close()


def test_the_repository_rpcs_are_for_admins(serving: Any) -> None:
    _, client = serving(GRUSERVE_API_KEYS="acme:k-acme,ops:k-ops:admin")
    for call in (
        lambda: client.get_model_repository_index(headers=ACME),
        lambda: client.load_model("simple", headers=ACME),
        lambda: client.unload_model("simple", headers=ACME),
    ):
        error = _status(call)
        assert error.status() == "StatusCode.PERMISSION_DENIED", error
        assert "admin" in error.message()
    index = client.get_model_repository_index(headers=OPS, as_json=True)["models"]
    assert {"name": "simple", "version": "1", "state": "READY"} in index
    client.unload_model("simple", headers=OPS)
    error = _status(lambda: client.infer("simple", [tensor(X)], headers=ACME))
    assert error.status() == "StatusCode.UNAVAILABLE", error  # unloaded: as HTTP's 503
    client.load_model("simple", headers=OPS)
    assert client.infer("simple", [tensor(X)], headers=ACME).as_numpy("outputs").shape[:2] == (
        1,
        1,
    )
    error = _status(lambda: client.load_model("nope", headers=OPS))
    assert error.status() == "StatusCode.NOT_FOUND", error


def test_a_lost_compare_and_set_is_aborted(serving: Any, redis_server: str) -> None:
    """A session whose stored revision never equals the one its readers see, as when another
    replica advances it before each of our writes: every compare-and-set loses, and after
    the service's attempts the step is ABORTED (retryable), with nothing applied.

    The record is written by hand with its revision as ``"01"``: the reader parses 1, the
    store's compare-and-set compares the text ``"01"`` with ``"1"`` and reports a lost race,
    every time. Deterministic, and no timing involved."""
    import redis

    url = redis_server.rsplit("/", 1)[0] + "/7"
    redis.Redis.from_url(url).flushdb()
    http, client = serving(url)
    client.infer("simple", [tensor(X)], sequence_id=777, sequence_start=True)
    client.infer("simple", [tensor(X)], sequence_id=777)
    store = redis.Redis.from_url(url)
    key = "gruserve:session:v2:simple:777"
    revision = store.hget(key, "revision")
    assert isinstance(revision, bytes)
    store.hset(key, "revision", b"0" + revision)
    error = _status(lambda: client.infer("simple", [tensor(X)], sequence_id=777))
    assert error.status() == "StatusCode.ABORTED", error
    assert "v2:simple:777" in error.message()
    assert stored_field(store, key, "step") == "2"  # the step was not applied
    conflicts = [
        line
        for line in httpx.get(f"{http}/metrics").text.splitlines()
        if line.startswith("gruserve_session_conflicts_total ")
    ]
    assert float(conflicts[0].split()[1]) >= 1
    errors = httpx.get(f"{http}/metrics").text  # a gRPC error counts as an HTTP one does
    assert 'gruserve_errors_total{type="SessionConflict"} 1.0' in errors
    store.close()


def test_every_status_code_of_the_map_is_provoked_by_some_test() -> None:
    """A new error class mapped to a new code needs a test that provokes it end to end."""
    here = Path(__file__).parent
    tests = (here / "test_v2_grpc.py").read_text() + Path(__file__).read_text()
    for code in set(grpc_status.STATUS.values()):
        assert f"StatusCode.{code.name}" in tests, code
    assert grpc.StatusCode.OK not in grpc_status.STATUS.values()
