"""Server settings, read from ``GRUSERVE_*`` environment variables and a ``.env`` file.

Only server-wide choices live here. How a model batches (batch size, wait)
is per model and lives in its manifest (``model.json`` ``batching``); the two
``batch_*`` settings below override every manifest when set, which is what an
operator tuning one deployment wants.

>>> Settings(models_dir="models", provider="cpu").session_store
'memory'
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gruserve.runtime.policy import VersionPolicy
from gruserve.sessions.store_url import SINGLE_SCHEMES, is_cluster_url, parse_cluster_url

ENV_PREFIX = "GRUSERVE_"


class Settings(BaseSettings):
    """Everything ``gruserve serve`` can be told; defaults serve ``models/`` on localhost."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        protected_namespaces=(),
    )

    models_dir: Path = Path("models")
    """Model repository folder: ``NAME/VERSION/{model.onnx,model.json}``."""

    model_versions: dict[str, int] = Field(default_factory=dict)
    """Pinned versions as JSON, e.g. ``{"demo": 1}``; unnamed models serve their latest."""

    model_version_policy: dict[str, str] = Field(default_factory=dict)
    """Which versions stay loaded, per model, as JSON in Triton's words, e.g.
    ``{"demo": "latest: 2"}``, ``"specific: [1, 3]"`` or ``"all"``; unnamed models keep
    ``latest: 1``. New sessions get the newest kept version unless ``model_versions`` pins
    one; any version on disk still serves its sessions (loaded on first use)."""

    version_unload_grace_s: float = Field(300.0, ge=0)
    """A loaded version that no policy keeps and that is not a default is unloaded once no
    step has used it for this many seconds."""

    repository_poll_s: float = Field(0.0, ge=0)
    """Rescan the models directory this often (seconds) and load new versions before making
    them the default (0 = only through ``POST /v2/repository/models/{model}/load``)."""

    session_history: int = Field(0, ge=0)
    """Timesteps of input each session keeps (its last N, with mask values) so that
    ``POST /v1/sessions/{id}/upgrade`` can replay them on a new version (0 = none kept)."""

    session_on_version_gone: Literal["fail", "reset", "upgrade"] = "fail"
    """A step for a session whose version was removed from disk: ``fail`` answers 410
    ModelVersionGone; ``reset`` moves the session to the default version at zero state;
    ``upgrade`` moves it there replaying all its kept inputs. The step count continues."""

    provider: Literal["auto", "cpu", "cuda"] = "auto"
    """onnxruntime execution provider: ``auto`` picks CUDA when onnxruntime-gpu and a GPU
    are present, else CPU; ``cuda`` refuses to start without them."""

    intra_op_threads: int = Field(1, ge=0)
    """Threads onnxruntime uses inside one run (0 = onnxruntime's default, one per core).
    One is fastest for batches of short steps; raise it for long sequences."""

    inference_threads: int = Field(2, ge=1)
    """Worker threads running onnxruntime calls off the event loop (all models share them)."""

    session_store: str = "memory"
    """``memory`` (one process) or a Redis URL such as ``redis://127.0.0.1:6379/0`` (shared by
    every replica); ``redis+cluster://host:port,host:port`` for a Redis Cluster."""

    session_ttl_s: float = Field(1800.0, gt=0)
    """Seconds a session may stay unused (no create, step or reset) before it expires."""

    session_max_lifetime_s: float = Field(0.0, ge=0)
    """Seconds a session may live from its creation however busy it is, then it expires
    (0 = no limit). A reset does not renew it; a v2 ``sequence_start`` does."""

    max_sessions: int = Field(100_000, ge=1)
    """Most sessions the store holds at once (across replicas with Redis)."""

    session_sweep_interval_s: float = Field(1.0, gt=0)
    """Seconds between background sweeps that forget expired sessions (creates never sweep,
    except in a store that looks full, so ``max_sessions`` counts live sessions only)."""

    session_census_interval_s: float = Field(15.0, gt=0)
    """Seconds between counts of sessions per model version on a shared store (Redis), for
    the ``gruserve_model_version_sessions`` gauge: each replica walks the session listing
    this often in the background and scrapes read its last count (the memory store is
    counted exactly on every scrape)."""

    session_eviction: Literal["reject", "lru"] = "reject"
    """What creating a session does when ``max_sessions`` are held: ``reject`` answers 429;
    ``lru`` evicts the least recently used session (the one unused for longest) to make room."""

    store_timeout_s: float = Field(2.0, gt=0)
    """Redis only: connect and socket timeout in seconds. A request whose Redis call takes
    longer (Redis down or hung) answers 503 instead of waiting: after this, or up to about
    4x this when Redis hangs (one retry on a fresh connection: two reads, two connects)."""

    store_min_replicas: int = Field(0, ge=0)
    """Redis only: a write (create, step, reset, delete) is acknowledged only once this many
    replicas of its Redis master have it (Redis ``WAIT``), so a failover loses no
    acknowledged step; fewer within ``store_wait_ms`` answers 503 (the client resends).
    0 = acknowledge once the master has it."""

    store_wait_ms: int = Field(1000, ge=1)
    """Redis only, with ``store_min_replicas``: how long a write waits for its replicas (ms).
    Must stay below ``store_timeout_s``."""

    store_packed_records: bool = True
    """Redis only: write each session as one packed hash field instead of the ten fields
    that servers before 0.2.0 wrote (less Redis and server CPU per step). Every server that
    has this setting reads both layouts, so a rolling restart may turn it on or off. Servers
    of 0.1.0 may not read packed records: when a fleet upgrades from 0.1.0, roll 0.2.0 out
    with this set to false, then drop the setting in a second rolling restart."""

    store_recent_records: int = Field(10_000, ge=0)
    """Redis only: how many sessions' records this server keeps of its own last successful
    writes, so that a session's next step here skips reading it (one round trip instead
    of two; the write still checks nobody wrote since, writer token included, and re-reads
    if somebody did). Costs about 0.6 KB plus 4 bytes per state unit and a numbered step's
    kept outputs per record: about 11 MB at 10,000 sessions of 128 units. 0 = off."""

    snapshot_path: Path | None = None
    """Memory store only, opt-in: on a graceful shutdown (SIGTERM) every live session is
    written to this file; the next start restores those whose model version is still served
    and that have not expired, then removes the file."""

    max_timesteps: int = Field(4096, ge=1)
    """Most timesteps in one request (per sequence); more answers 413."""

    max_bulk_steps: int = Field(1024, ge=1)
    """Most steps in one bulk request (``POST /v1/models/{model}/steps`` or one message on
    ``/v1/models/{model}/ws``); more answers 413. Each step is also held to
    ``max_timesteps`` and the whole request to ``max_request_bytes``."""

    max_request_bytes: int = Field(4 * 1024 * 1024, ge=64)
    """Largest request body, WebSocket message or NDJSON line in bytes; more answers 413."""

    max_batch_timesteps: int = Field(65_536, ge=1)
    """Most sequences x timesteps one stateless request (v1 ``predict``, v2 ``infer``) may
    run; more answers 413 before anything runs. The request byte limit does not bound
    this: 4 MiB of binary v2 input holds a million one-step sequences."""

    max_reply_values: int = Field(1_048_576, ge=1)
    """Most numbers one reply may hold: the requested outputs plus the requested final
    states, over the whole batch (a session step: its outputs). More answers 413 before
    anything runs. A float32 takes 4 bytes in a binary reply and up to about 16 in JSON,
    so the default keeps a reply under about 16 MiB."""

    predict_chunk_timesteps: int = Field(8_192, ge=1)
    """A large stateless batch runs as several onnxruntime runs of at most this many
    sequences x timesteps each (but one sequence at least), so that its working memory is
    bounded by this and not by the request, and other requests get the inference threads
    in between."""

    max_header_bytes: int = Field(65_536, ge=1024)
    """``gruserve serve``: largest request line plus headers in bytes; more answers 431 and
    the connection is closed (checked as the bytes arrive, before any route or key check)."""

    header_timeout_s: float = Field(10.0, gt=0)
    """``gruserve serve``: seconds a connection may take, from when it opens or its request
    begins, to send a complete header block; then it is closed (slow-header clients)."""

    max_connections: int = Field(1_000, ge=1)
    """``gruserve serve``: most open connections (HTTP and WebSocket); one more is answered
    503 at once and closed. Keep it under the process's open-file limit (``ulimit -n``)
    less what the server itself holds, so that the limit, not the system, refuses."""

    ws_max_frames: int = Field(1024, ge=1)
    """Most frames one WebSocket message may come in (a fragmented message: its first frame
    and continuations); more closes the connection with 1008. The frames' headers count
    with the payload against ``max_request_bytes`` (more closes with 1009), so a flood of
    tiny or empty continuation frames is cut off early."""

    ws_compression: bool = True
    """Accept WebSocket clients' offer of permessage-deflate (browsers always offer it).
    Compressing a few float32 values saves nothing, and a compressed connection's
    messages take ``websockets``' slower framing (bench/README.md, item 9); off, every
    client's messages are framed by gruserve's protocol."""

    batch_max_size: int | None = Field(None, ge=1)
    """Override every model's ``batching.max_batch_size`` (steps per onnxruntime run)."""

    batch_max_delay_ms: float | None = Field(None, ge=0)
    """Override every model's ``batching.max_delay_ms``: how long the first waiting step
    waits for others to join its batch."""

    batch_inline_below_us: float = Field(500.0, ge=0)
    """Run a batch on the event loop instead of the inference threads when batches of its
    size recently took less than this many microseconds of CPU time (0 = always the
    threads). Below it, the hand-off to a thread costs more than the run: the demo model's
    batches run inline (64 steps: 190-310 µs on 2-core VMs), a large one's (U=512) stay off
    the loop so that they cannot stall other requests (bench/README.md, "Where a batch
    runs")."""

    batch_queue_size: int = Field(4096, ge=1)
    """Steps that may wait per model before new ones wait for room (backpressure)."""

    api_keys: SecretStr | None = None
    """Comma-separated API keys. When any key is set (here or in ``api_keys_file``), every
    route but liveness and readiness needs one: ``Authorization: Bearer <key>`` or
    ``X-API-Key: <key>``. ``name:key`` names the key's tenant (sessions belong to the name
    that created them and do not exist for other names); ``name:key:admin`` sees all."""

    api_keys_file: Path | None = None
    """A file of API keys, one per line (blank lines and ``#`` comments ignored); read at
    start, added to ``api_keys``."""

    metrics_public: bool = False
    """Serve ``/metrics`` without an API key even when keys are set (for a scraper that
    cannot send one)."""

    shutdown_grace_s: float = Field(10.0, ge=0)
    """After SIGTERM, seconds ``gruserve serve`` lets requests in flight finish before it
    cancels them and exits."""

    keepalive_s: float = Field(5.0, gt=0)
    """Seconds ``gruserve serve`` keeps an idle HTTP keep-alive connection open. A proxy's
    upstream keep-alive timeout must be shorter (nginx: 4 s in deploy/nginx)."""

    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """Log level of gruserve and uvicorn."""

    log_format: Literal["text", "json"] = "text"
    """``text``: one readable line per record. ``json``: one JSON object per line (``time``,
    ``level``, ``logger``, ``message``, and ``request_id`` where a request is being answered),
    for log shippers; uvicorn's own records take the same format."""

    host: str = "127.0.0.1"
    """Bind address for ``gruserve serve``."""

    port: int = Field(8000, ge=0, le=65535)
    """Port for ``gruserve serve``."""

    grpc_port: int = Field(8001, ge=0, le=65535)
    """Port of the KServe v2 / Triton gRPC server (``GRPCInferenceService``, health,
    reflection), served in the same process and event loop as HTTP; 0 turns it off. Needs
    the ``gruserve[grpc]`` extra: without it the server logs a warning and serves HTTP only.
    Binds ``host``, as HTTP does."""

    workers: int = Field(1, ge=1)
    """Processes ``gruserve serve`` runs, all accepting on the one port. More than one needs
    a shared session store (Redis): with ``memory`` each process would hold its own sessions,
    so ``serve`` refuses to start."""

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("session_store")
    @classmethod
    def _store(cls, value: str) -> str:
        if value == "memory" or value.startswith(SINGLE_SCHEMES):
            return value
        if is_cluster_url(value):
            parse_cluster_url(value)  # its ValueError names what is wrong
            return value
        raise ValueError(f"expected 'memory' or a redis:// URL. Received: session_store={value!r}")

    @model_validator(mode="after")
    def _wait_within_timeout(self) -> Settings:
        if self.store_min_replicas and self.store_wait_ms >= self.store_timeout_s * 1000:
            raise ValueError(
                "store_wait_ms must stay below store_timeout_s (the socket would time out "
                f"first). Received: store_wait_ms={self.store_wait_ms!r} with "
                f"store_timeout_s={self.store_timeout_s!r}"
            )
        return self

    @field_validator("model_version_policy")
    @classmethod
    def _policies(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            try:
                VersionPolicy.parse(text)
            except ValueError as exc:
                raise ValueError(f"model_version_policy[{name!r}]: {exc}") from None
        return value

    def version_policies(self) -> dict[str, VersionPolicy]:
        return {name: VersionPolicy.parse(text) for name, text in self.model_version_policy.items()}

    @model_validator(mode="after")
    def _snapshot_needs_memory(self) -> Settings:
        if self.snapshot_path is not None and self.session_store != "memory":
            raise ValueError(
                "snapshot_path is for the memory store (Redis keeps sessions itself). "
                f"Received: snapshot_path={str(self.snapshot_path)!r} with "
                f"session_store={self.session_store!r}"
            )
        return self
