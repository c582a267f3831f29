"""``gruserve`` with the Redis store's step writes answered in the process: a probe, not a mode.

    python -m bench._local_writes serve --port 8330    # GRUSERVE_SESSION_STORE=redis://...

``bench.stores --local-writes`` serves this beside the real Redis server to split a Redis
step's extra cost in two: what the store's own Python and the step's extra await cost (the
coalescer, the packed write, the kept record: all still run here), and what sending the
wave to Redis and reading its answer add (skipped here; the wave's answer comes one pass of
the event loop later, every write accepted). Writes that create a session still go to
Redis, so reads and listings find the sessions, and so do deletes and every other script;
only the default write script (packed records, no history) is answered here. Never serve clients
with it: an accepted write here is not stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from gruserve.sessions.redis_store import _master_pipelines
from gruserve.sessions.redis_store._master_pipelines import Call, MasterPipelines
from gruserve.sessions.redis_store._scripts import WRITE_SCRIPT
from gruserve.sessions.store import CREATE

_CREATE = b"%d\n" % CREATE
"""How a packed write that creates a session starts (its expected revision)."""
_HEAD_ARGS = 5
"""The write script's arguments before the writes (``_scripts.py``: ttl ... token)."""
_SETS = 3
"""The index keys before the sessions' hashes in a write call's keys."""

_send = MasterPipelines.run


async def _run(self: MasterPipelines, calls: Sequence[Call], wait: bool = False) -> list[Any]:
    steps = all(call.script.script == WRITE_SCRIPT for call in calls) and not any(
        arg.startswith(_CREATE) for call in calls for arg in call.args[_HEAD_ARGS:]
    )
    if not wait or not steps:
        return await _send(self, calls, wait)
    await asyncio.sleep(0)  # the answer a pass later, as the earliest real reply would come
    return [[[1] * (len(call.keys) - _SETS), [], [], []] for call in calls]


def main() -> None:
    _master_pipelines.MasterPipelines.run = _run  # type: ignore[method-assign]
    from gruserve.cli import main as gruserve

    gruserve()


if __name__ == "__main__":
    main()
