"""Two ``gruserve serve`` replicas on one Redis behind a real nginx running the repository's
gRPC server block (deploy/nginx/gruserve-grpc.conf, ``grpc_pass``): one Triton sequence,
driven by the stock ``tritonclient.grpc``, continues across replicas and gives exactly what
the model gives for the whole sequence at once.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from deploy_helpers import (
    find_nginx,
    free_port,
    nginx,
    reference,
    server_env,
    start_server,
    stop,
    upstreams_by_uri,
    wait_ready,
)

grpcclient = pytest.importorskip("tritonclient.grpc")

ATOL = RTOL = 1e-5  # outputs in raw sunspot units (tens): float32 holds ~7 digits
REPLICAS = 2
INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


@pytest.fixture(scope="module")
def front(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``(nginx gRPC address, replica HTTP addresses, access log)``."""
    find_nginx()
    workdir = tmp_path_factory.mktemp("grpc-cluster")
    ports = [free_port() for _ in range(REPLICAS)]
    grpc_ports = [free_port() for _ in range(REPLICAS)]
    procs = [
        start_server(port, server_env(redis_server, GRUSERVE_GRPC_PORT=str(g)), workdir)
        for port, g in zip(ports, grpc_ports, strict=True)
    ]
    try:
        for proc, port in zip(procs, ports, strict=True):
            wait_ready(proc, port)
        listen = free_port()
        with nginx(ports, workdir / "nginx", grpc=(listen, grpc_ports)) as (_, access_log):
            yield f"127.0.0.1:{listen}", [f"127.0.0.1:{p}" for p in ports], access_log
    finally:
        for proc in procs:
            stop(proc)


def _step(x: np.ndarray) -> list[Any]:
    given = grpcclient.InferInput("inputs", list(x.shape), "FP32")
    given.set_data_from_numpy(x)
    return [given]


def test_a_sequence_continues_across_replicas(front: Any, rng: np.random.Generator) -> None:
    address, replicas, access_log = front
    x = (rng.normal(size=(1, 12, 1)) * 20 + 60).astype(np.float32)
    client = grpcclient.InferenceServerClient(address)
    try:
        assert client.is_server_ready()
        got = []
        # half the steps as unary calls, which nginx spreads over the replicas ...
        for t in range(6):
            result = client.infer(
                "demo", _step(x[:, t : t + 1]), sequence_id="hop-1", sequence_start=t == 0
            )
            got.append(result.as_numpy("outputs"))
        # ... the rest over one stream (one replica), ending the sequence
        answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for t in range(6, 12):
            client.async_stream_infer(
                "demo", _step(x[:, t : t + 1]), sequence_id="hop-1", sequence_end=t == 11
            )
        for _ in range(6, 12):
            result, error = answers.get(timeout=60)
            assert error is None, error
            got.append(result.as_numpy("outputs"))
        client.stop_stream()
    finally:
        client.close()
    expected, _ = reference(f"http://{replicas[-1]}", x[0], timeout=10)
    np.testing.assert_allclose(np.concatenate(got, axis=1)[0], expected, atol=ATOL, rtol=RTOL)
    served = upstreams_by_uri(access_log)
    answered_by = {tried[-1] for tried in served[INFER]}
    assert len(answered_by) == REPLICAS, served  # both replicas stepped the one sequence
    assert len(served[STREAM]) == 1


def test_gruserve_session_metadata_keeps_a_sequence_on_one_replica(
    front: Any, rng: np.random.Generator
) -> None:
    """Unary calls carrying ``gruserve-session`` metadata reach one replica (the upstream
    hashes on it), where those without it go round robin (above)."""
    address, replicas, access_log = front
    before = len(upstreams_by_uri(access_log)[INFER])
    x = (rng.normal(size=(1, 6, 1)) * 20 + 60).astype(np.float32)
    client = grpcclient.InferenceServerClient(address)
    try:
        got = [
            client.infer(
                "demo",
                _step(x[:, t : t + 1]),
                sequence_id="stay-1",
                sequence_start=t == 0,
                sequence_end=t == 5,
                headers={"gruserve-session": "stay-1"},
            ).as_numpy("outputs")
            for t in range(6)
        ]
    finally:
        client.close()
    expected, _ = reference(f"http://{replicas[0]}", x[0], timeout=10)
    np.testing.assert_allclose(np.concatenate(got, axis=1)[0], expected, atol=ATOL, rtol=RTOL)
    answered = [tried[-1] for tried in upstreams_by_uri(access_log)[INFER][before:]]
    assert len(answered) == 6 and len(set(answered)) == 1, answered
