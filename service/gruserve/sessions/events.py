"""Sessions a store ends by itself, expired or evicted: counted in ``/metrics`` and logged.

Stores report what they removed; this class turns it into the
``gruserve_sessions_expired_total{reason}`` and ``gruserve_sessions_evicted_total``
counters and one log line per report. Log lines name session ids (at most
:data:`SHOWN` per line), never states.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from gruserve.metrics import Metrics

log = logging.getLogger("gruserve.sessions")
SHOWN = 10
IDLE, LIFETIME = "idle", "lifetime"


def _ids(session_ids: Sequence[str]) -> str:
    shown = ", ".join(session_ids[:SHOWN])
    more = len(session_ids) - SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


class SessionEvents:
    """Where a store reports the sessions it expired or evicted.

    Args:
        metrics: collectors to count in, or None (only log).
    """

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._metrics = metrics

    def expired(self, reason: str, session_ids: Sequence[str]) -> None:
        """``session_ids`` reached their ``reason`` deadline (:data:`IDLE` or :data:`LIFETIME`)."""
        if not session_ids:
            return
        if self._metrics is not None:
            self._metrics.sessions_expired.labels(reason).inc(len(session_ids))
        log.info("%d session(s) expired (%s): %s", len(session_ids), reason, _ids(session_ids))

    def evicted(self, session_ids: Sequence[str]) -> None:
        """``session_ids`` were evicted to make room for new sessions (least recently used)."""
        if not session_ids:
            return
        if self._metrics is not None:
            self._metrics.sessions_evicted.inc(len(session_ids))
        log.info(
            "%d session(s) evicted (least recently used; the store was full): %s",
            len(session_ids),
            _ids(session_ids),
        )
