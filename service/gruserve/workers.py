"""Several serving processes on one port: ``gruserve serve --workers N`` (``GRUSERVE_WORKERS``).

One Python process serves from one event loop on one core. With ``N > 1``, uvicorn's
supervisor binds the port once and starts ``N`` processes that accept on it; each
builds its own app from :func:`worker_app` (models, batchers, store client), so the
processes share nothing but the session store. That is why the memory store is
refused: each process would hold its own sessions, and a session created through one
would be unknown to the others.

The supervisor is the process a service manager signals: on SIGTERM it sends SIGTERM
to every worker, each finishes its requests in flight (``GRUSERVE_SHUTDOWN_GRACE_S``)
and exits, and the supervisor exits once all have. A worker that dies is replaced.

Metrics use prometheus-client's multiprocess mode: every worker writes its samples to
files in ``PROMETHEUS_MULTIPROC_DIR`` (a fresh temporary folder unless set; when set,
its old sample files are removed at start) and a scrape of ``/metrics``, whichever
worker answers it, reports the sum over all workers; the per-version gauges are that
worker's own (:class:`gruserve.metrics.ModelVersions`), and ``process_*`` come per process,
labelled ``pid`` (:class:`gruserve.metrics.ServerProcesses`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from gruserve.errors import GruServeError
from gruserve.metrics import MULTIPROCESS_DIR, SUPERVISOR_FILE
from gruserve.settings import ENV_PREFIX, Settings

APP = "gruserve.workers:worker_app"
_PROTOCOLS = {
    "http": "gruserve.workers:WorkerHttpProtocol",
    "ws": "gruserve.workers:WorkerWebSocketProtocol",
}
"""The protocol classes by import string: the ones ``uvicorn_options`` builds carry the edge
limits as class attributes of classes made at run time, which cannot be pickled to a spawned
worker; each worker builds its own from its settings instead (:func:`__getattr__`)."""


class SharedStoreRequired(GruServeError):
    """Several workers were asked for with the memory session store."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        super().__init__(
            f"GRUSERVE_WORKERS={workers} needs a shared session store: with "
            "GRUSERVE_SESSION_STORE=memory every worker process would keep its own sessions, "
            "and a session created through one worker would be unknown to the others. Set "
            "GRUSERVE_SESSION_STORE=redis://HOST:6379/0, or run one worker"
        )


def _environment(given: dict[str, Any]) -> None:
    """Hand settings given as arguments to the workers, which read the environment."""
    for name, value in given.items():
        text = str(value) if isinstance(value, str | Path) else json.dumps(value)
        os.environ[ENV_PREFIX + name.upper()] = text


def _metrics_dir() -> tuple[Path, bool]:
    """The multiprocess metrics folder, emptied of old samples; True if made here."""
    named = os.environ.get(MULTIPROCESS_DIR)
    if named:
        folder = Path(named)
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.db"):
            old.unlink()
        return folder, False
    folder = Path(tempfile.mkdtemp(prefix="gruserve-metrics-"))
    os.environ[MULTIPROCESS_DIR] = str(folder)
    return folder, True


def serve(settings: Settings, given: dict[str, Any]) -> None:
    """Run ``settings.workers`` worker processes on ``settings.host``:``settings.port``.

    Args:
        settings: the supervisor's settings (from the environment and ``given``).
        given: settings passed as arguments rather than ``GRUSERVE_*`` variables.

    Raises:
        SharedStoreRequired: the session store is ``memory``.
    """
    import uvicorn

    from gruserve.server import uvicorn_options

    if settings.session_store == "memory":
        raise SharedStoreRequired(settings.workers)
    _environment(given)
    folder, made = _metrics_dir()
    (folder / SUPERVISOR_FILE).write_text(str(os.getpid()))  # its process figures too
    try:
        uvicorn.run(
            APP,
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            **{**uvicorn_options(settings), **_PROTOCOLS},
        )
    finally:
        if made:
            shutil.rmtree(folder, ignore_errors=True)


def worker_app() -> FastAPI:
    """One worker's app (uvicorn calls this in each worker process), tuned as ``serve`` tunes
    a single process."""
    from gruserve.server import SWITCH_INTERVAL_S, create_app, settle_heap

    sys.setswitchinterval(SWITCH_INTERVAL_S)
    app = create_app(Settings())
    settle_heap()
    return app


def __getattr__(name: str) -> Any:
    """``WorkerHttpProtocol`` / ``WorkerWebSocketProtocol``: the protocol classes
    ``uvicorn_options`` makes, built in the worker from its ``GRUSERVE_*`` settings."""
    if name not in ("WorkerHttpProtocol", "WorkerWebSocketProtocol"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from gruserve.server import uvicorn_options

    options = uvicorn_options(Settings())
    built = options["http" if name == "WorkerHttpProtocol" else "ws"]
    globals()[name] = built
    return built
