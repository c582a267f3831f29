"""Composition root: builds every serving object from :class:`~gruserve.settings.Settings`.

``create_app()`` is the app factory (``uvicorn --factory gruserve.server:create_app``);
``run_server`` is what ``gruserve serve`` calls. Nothing here, nor anything it
imports, needs torch, keras or onnx: the base install serves.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from gruserve import __version__, logs
from gruserve.api.app import create_app as create_api
from gruserve.api.app import keys_enabled
from gruserve.environment import load_settings, unknown_variables
from gruserve.errors import SettingsError, SnapshotError
from gruserve.metrics import Metrics
from gruserve.runtime.batcher import Batcher
from gruserve.runtime.limits import WorkLimits
from gruserve.runtime.model import LoadedModel
from gruserve.runtime.predictor import Predictor
from gruserve.runtime.provider import choose_providers
from gruserve.runtime.registry import ModelRegistry
from gruserve.runtime.versions import Batchers, RepositoryWatcher
from gruserve.services import Services
from gruserve.sessions import snapshot
from gruserve.sessions.census import VersionCensus
from gruserve.sessions.events import SessionEvents
from gruserve.sessions.memory import MemorySessionStore
from gruserve.sessions.redis_store import RedisSessionStore
from gruserve.sessions.service import SessionService
from gruserve.sessions.store import SessionStore
from gruserve.sessions.sweeper import Sweeper
from gruserve.settings import Settings
from gruserve.tracing import from_environment as tracing_from_environment

log = logging.getLogger("gruserve")
SWITCH_INTERVAL_S = 0.0001
GC_THRESHOLDS = (10_000, 20, 100)


def build_store(settings: Settings, events: SessionEvents | None = None) -> SessionStore:
    lifecycle: dict[str, Any] = {
        "max_lifetime_s": settings.session_max_lifetime_s,
        "eviction": settings.session_eviction,
        "events": events,
    }
    if settings.session_store == "memory":
        return MemorySessionStore(settings.session_ttl_s, settings.max_sessions, **lifecycle)
    return RedisSessionStore(
        settings.session_store,
        settings.session_ttl_s,
        settings.max_sessions,
        timeout_s=settings.store_timeout_s,
        min_replicas=settings.store_min_replicas,
        wait_ms=settings.store_wait_ms,
        history=settings.session_history > 0,
        packed=settings.store_packed_records,
        recent=settings.store_recent_records,
        **lifecycle,
    )


def restore_snapshot(path: Path, store: MemorySessionStore, sessions: SessionService) -> None:
    """Load the sessions a previous run wrote to ``path`` into ``store``, then remove the file.

    Only sessions this server can continue are restored (model version served, state of
    the right size, not expired). The file is removed once read, so a later crash cannot
    bring back these states after they have moved on; an unreadable file is moved aside
    (``<path>.unreadable``) and the server starts without it.
    """
    if not path.exists():
        return
    try:
        records = snapshot.read(path)
    except SnapshotError as exc:
        log.error("%s; starting without it (moved to %s.unreadable)", exc, path.name)
        path.replace(path.with_name(path.name + ".unreadable"))
        return
    servable = [r for r in records if sessions.servable(r)]
    restored = store.restore(servable)
    path.unlink()
    log.info(
        "restored %d of the %d sessions in %s (%d on a model version not served here, "
        "%d expired or over the session limit)",
        len(restored),
        len(records),
        path,
        len(records) - len(servable),
        len(servable) - len(restored),
    )


def build_services(
    settings: Settings, registry: CollectorRegistry | None = None, tracing: Any = None
) -> Services:
    """Load the models and build batchers, store and services (blocking: call before serving).

    ``tracing`` (a :class:`gruserve._otel.Tracing`, or None: off) instruments the batchers
    and the store.
    """
    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    models = ModelRegistry.load(
        settings.models_dir,
        choose_providers(settings.provider),
        settings.intra_op_threads,
        settings.model_versions,
        settings.version_policies(),
        settings.version_unload_grace_s,
    )
    executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="gruserve-ort")

    def make_batcher(model: LoadedModel) -> Batcher:
        batching = model.signature.manifest.batching or {}
        size = settings.batch_max_size or int(batching.get("max_batch_size", 64))
        delay_ms = settings.batch_max_delay_ms
        if delay_ms is None:
            delay_ms = float(batching.get("max_delay_ms", 2.0))
        return Batcher(
            model,
            executor,
            max_batch_size=size,
            max_delay_s=delay_ms / 1000,
            max_queue=settings.batch_queue_size,
            inline_below_s=settings.batch_inline_below_us / 1e6,
            metrics=metrics.for_model(model.name),
        )

    batchers = Batchers(models, make_batcher)
    for model in models.models():
        batchers.of(model)
    store = build_store(settings, SessionEvents(metrics))
    census = VersionCensus(store, settings.session_census_interval_s)
    metrics.watch_versions(models, census)
    limits = WorkLimits(
        settings.max_batch_timesteps, settings.max_reply_values, settings.predict_chunk_timesteps
    )
    if tracing is not None:
        tracing.instrument(batchers.values(), store)
        batchers.made.append(lambda batcher: tracing.instrument([batcher], None))
    sessions = SessionService(
        models,
        batchers,
        store,
        max_timesteps=settings.max_timesteps,
        metrics=metrics,
        limits=limits,
        history=settings.session_history,
        on_version_gone=settings.session_on_version_gone,
    )
    if settings.snapshot_path is not None and isinstance(store, MemorySessionStore):
        restore_snapshot(settings.snapshot_path, store, sessions)
    predictor = Predictor(models, executor, settings.max_timesteps, metrics, limits)
    watcher = RepositoryWatcher(models, batchers, settings.repository_poll_s)
    return Services(
        settings,
        models,
        batchers,
        predictor,
        sessions,
        store,
        metrics,
        executor,
        tracing,
        Sweeper(store, settings.session_sweep_interval_s),
        watcher,
        census,
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """The production app; settings from ``GRUSERVE_*`` / ``.env`` when not given.

    As uvicorn's factory, a bad setting prints one line per bad variable and exits with
    status 2, as ``gruserve serve`` does, instead of a traceback.
    """
    try:
        return _build_app(settings if settings is not None else load_settings(), address=None)
    except SettingsError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2) from None


def _build_app(settings: Settings, address: str | None) -> FastAPI:
    logs.configure(settings.log_level, settings.log_format)
    for warning in unknown_variables(os.environ, _env_file()):
        log.warning(warning)
    tracing = tracing_from_environment(os.environ)
    services = build_services(settings, tracing=tracing)
    log_summary(settings, services, address)
    return create_api(settings, services)


def _env_file() -> Path | None:
    env_file = Settings.model_config.get("env_file")
    return Path(env_file) if isinstance(env_file, str) else None


def log_summary(settings: Settings, services: Services, address: str | None) -> None:
    """What this server serves, in one info line (the registry logged each model's load, a
    failure as an error), and a warning when no model loaded."""
    statuses = services.registry.statuses()
    served = [f"{st.name} v{st.version} ({st.provider})" for st in statuses if st.ready]
    log.info(
        "gruserve %s: models %s from %s; store %s; API keys %s%s",
        __version__,
        ", ".join(served) or "none",
        settings.models_dir,
        _store_label(settings.session_store),
        "on" if keys_enabled(settings) else "off",
        f"; listening on http://{address}" if address else "",
    )
    if services.tracing is not None:
        exporter = os.environ.get("OTEL_TRACES_EXPORTER")
        log.info("OpenTelemetry tracing on (OTEL_TRACES_EXPORTER=%s)", exporter)
    if not served:
        log.warning(
            "no model loaded from %s: every request but the probes will fail "
            "(check GRUSERVE_MODELS_DIR: NAME/VERSION/model.onnx + model.json)",
            settings.models_dir.resolve(),
        )


def _store_label(url: str) -> str:
    """The store without a password (``redis://:secret@host`` -> ``redis://***@host``)."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


def settle_heap() -> None:
    """Freeze what start-up built out of the garbage collector's sight, and collect less often.

    A serving process holds ~100k long-lived objects (FastAPI, pydantic, onnxruntime
    bindings) that never become garbage. Left in the oldest generation, every full
    collection walks all of them: ~45 ms with the event loop stopped, about twice a
    second under load, which made the REST p99 at C=64 ~50 ms (bench/README.md).
    ``gc.freeze()`` moves them to a permanent generation (full collections then take
    ~0.4 ms); a larger young-generation threshold runs the collector ~14x less often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The ``uvicorn.Config`` arguments ``gruserve serve`` uses, but the app, host and port."""
    from uvicorn.config import WS_PROTOCOLS

    access_log = settings.log_level == "debug"
    options: dict[str, Any] = {
        "log_level": settings.log_level,
        "ws_max_size": settings.max_request_bytes,
        "ws_per_message_deflate": settings.ws_compression,
        "access_log": access_log,
        # X-Forwarded-For only changes the client address uvicorn's access log shows (nothing
        # else reads it), so the per-request rewrite runs only when that log is on.
        "proxy_headers": access_log,
        "server_header": False,  # no "server: uvicorn" on every response
        "timeout_graceful_shutdown": settings.shutdown_grace_s,
        "timeout_keep_alive": settings.keepalive_s,
    }
    log_config = logs.uvicorn_log_config(settings.log_level, settings.log_format)
    if log_config is not None:
        options["log_config"] = log_config
    # the fastest of uvicorn's WebSocket stacks here (bench/README.md), where available, with
    # plain messages framed by the protocol itself (api/protocols/_websocket.py)
    if "websockets-sansio" in WS_PROTOCOLS:
        from gruserve.api.protocols._websocket import GruServeWebSocketProtocol, WsLimits

        options["ws"] = GruServeWebSocketProtocol.bound(WsLimits(settings.ws_max_frames))
    else:  # pragma: no cover - uvicorn releases before websockets-sansio
        options["ws"] = "auto"
    try:  # one write per response, the step without ASGI, edge limits (api/protocols/_http11.py)
        from gruserve.api.protocols._http11 import GruServeHttpProtocol
        from gruserve.api.protocols._http_limits import HttpLimits
    except ImportError:  # pragma: no cover - uvicorn[standard] brings httptools
        pass
    else:
        options["http"] = GruServeHttpProtocol.bound(
            HttpLimits(
                settings.max_header_bytes, settings.header_timeout_s, settings.max_connections
            )
        )
    return options


def run_server(
    models_dir: Path | None = None,
    host: str | None = None,
    port: int | None = None,
    **overrides: Any,
) -> None:
    """Serve with uvicorn; arguments given here override the environment."""
    import uvicorn

    # The event loop thread and the onnxruntime worker thread hand the GIL back and forth on
    # every batch; at Python's default 5 ms switch interval a finished run can wait that long
    # for the loop thread to let go. A shorter interval measured +15% steps/s (bench/README.md).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    given = {"models_dir": models_dir, "host": host, "port": port, **overrides}
    given = {k: v for k, v in given.items() if v is not None}
    settings = load_settings(**given)
    if settings.workers > 1:
        from gruserve import workers

        workers.serve(settings, given)
        return
    app = _build_app(settings, address=f"{settings.host}:{settings.port}")
    settle_heap()
    uvicorn.run(app, host=settings.host, port=settings.port, **uvicorn_options(settings))
