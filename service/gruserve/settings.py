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

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    every replica)."""

    session_ttl_s: float = Field(1800.0, gt=0)
    """Seconds a session may stay unused (no create, step or reset) before it expires."""

    max_sessions: int = Field(100_000, ge=1)
    """Most sessions the store holds at once; creating one more answers 429."""

    max_timesteps: int = Field(4096, ge=1)
    """Most timesteps in one request (per sequence); more answers 413."""

    max_request_bytes: int = Field(4 * 1024 * 1024, ge=64)
    """Largest request body, WebSocket message or NDJSON line in bytes; more answers 413."""

    batch_max_size: int | None = Field(None, ge=1)
    """Override every model's ``batching.max_batch_size`` (steps per onnxruntime run)."""

    batch_max_delay_ms: float | None = Field(None, ge=0)
    """Override every model's ``batching.max_delay_ms``: how long the first waiting step
    waits for others to join its batch."""

    batch_queue_size: int = Field(4096, ge=1)
    """Steps that may wait per model before new ones wait for room (backpressure)."""

    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """Log level of gruserve and uvicorn."""

    host: str = "127.0.0.1"
    """Bind address for ``gruserve serve``."""

    port: int = Field(8000, ge=0, le=65535)
    """Port for ``gruserve serve``."""

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("session_store")
    @classmethod
    def _store(cls, value: str) -> str:
        if value != "memory" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"expected 'memory' or a redis:// URL. Received: session_store={value!r}"
            )
        return value
