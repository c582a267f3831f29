"""SIGTERM to a real ``gruserve serve`` (what Docker and Kubernetes send): it stops accepting
connections at once, finishes the requests in flight, closes WebSockets with 1012 (service
restart: reconnect, to another replica) and exits.
"""

from __future__ import annotations

import errno
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest
from deploy_helpers import NdjsonStream, free_port, server_env, start_server, stop, wait_ready
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect


def _refuses_connections(port: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        except OSError as exc:  # pragma: no cover - anything but "refused" is a failure
            assert exc.errno == errno.ECONNREFUSED, exc
            return True
        time.sleep(0.05)
    return False


def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    port = free_port()
    proc = start_server(port, server_env(), tmp_path)
    try:
        wait_ready(proc, port)
        base = f"http://127.0.0.1:{port}"
        for sid in ("draining", "socket"):
            assert httpx.post(f"{base}/v1/models/demo/sessions", json={"session_id": sid})
        stream = NdjsonStream(f"127.0.0.1:{port}", "/v1/sessions/draining/stream")
        try:
            with connect(f"ws://127.0.0.1:{port}/v1/sessions/socket/ws", open_timeout=10) as ws:
                assert stream.step({"inputs": [10.0]})["step"] == 1
                ws.send('{"inputs": [10.0]}')
                assert '"step":1' in str(ws.recv(timeout=10))

                proc.send_signal(signal.SIGTERM)
                assert _refuses_connections(port), "new connections are still accepted"
                with pytest.raises(ConnectionClosed) as closed:  # told to reconnect elsewhere
                    ws.recv(timeout=5)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012

            # the stream in flight goes on: each line still answered, for a while
            for step in range(2, 7):
                time.sleep(0.2)
                assert stream.step({"inputs": [float(step)]})["step"] == step
            assert proc.poll() is None, "the server exited with a request in flight"
            stream.finish()
        finally:
            stream.close()
        # uvicorn re-raises the signal once it is done: "terminated by SIGTERM" (143 in a shell)
        assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
    finally:
        output = stop(proc)
    assert "timeout graceful shutdown exceeded" not in output, output
    assert "Traceback" not in output, output
