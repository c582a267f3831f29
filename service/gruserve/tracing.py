"""OpenTelemetry tracing: off unless the ``otel`` extra is installed and an exporter is named.

Tracing is configured by the standard ``OTEL_*`` variables only:

- ``OTEL_TRACES_EXPORTER``: ``otlp`` (needs ``opentelemetry-exporter-otlp``, which reads
  ``OTEL_EXPORTER_OTLP_*``) or ``console`` (spans as JSON on stdout). Unset or ``none``:
  tracing is off, and the server runs exactly the code it runs without the extra;
- ``OTEL_SDK_DISABLED=true`` turns it off whatever else is set;
- ``OTEL_SERVICE_NAME`` (default ``gruserve``), ``OTEL_RESOURCE_ATTRIBUTES``,
  ``OTEL_TRACES_SAMPLER`` / ``_ARG`` and ``OTEL_BSP_*`` as the SDK reads them.

When on, each request is a span continuing the caller's W3C ``traceparent``, with
children for the queue wait of its step and each session-store call, and each batched
onnxruntime run is a span (``gruserve.batch.size``) linked to every request in it
(:mod:`gruserve._otel`). Off, nothing is wrapped: the batcher tests one attribute per
batch, and the store and routes are the plain ones.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gruserve._otel import Tracing

log = logging.getLogger(__name__)
EXPORTERS = ("otlp", "console")


def from_environment(environ: Mapping[str, str]) -> Tracing | None:
    """The tracing ``environ`` asks for, or None when it is off (see the module).

    Raises:
        SettingsError: ``OTEL_TRACES_EXPORTER`` names an exporter gruserve cannot make.
    """
    from gruserve.errors import SettingsError

    exporter = environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if exporter in ("", "none") or environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    if exporter not in EXPORTERS:
        raise SettingsError(
            [f"OTEL_TRACES_EXPORTER={exporter!r} is not accepted; it accepts otlp, console or none"]
        )
    if importlib.util.find_spec("opentelemetry.sdk") is None:
        log.warning(
            "OTEL_TRACES_EXPORTER=%s but OpenTelemetry is not installed: tracing is off "
            "(pip install 'gruserve[otel]')",
            exporter,
        )
        return None
    from gruserve._otel import Tracing, make_exporter

    return Tracing.with_exporter(make_exporter(exporter))
