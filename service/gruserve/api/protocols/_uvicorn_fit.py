"""Whether this uvicorn still has what gruserve's protocols read of it beyond its public API.

The protocols in this package subclass uvicorn's and read a few of their attributes that
are not public (each module lists its own). uvicorn is not pinned to one release, so a
fresh install can bring one that renamed a piece. The tests fail when that happens, but a
deployment may install a newer uvicorn than the tests ran on. So each protocol checks its
pieces when a connection opens, and where one is missing it serves that connection as
uvicorn's own class does: correct, only without gruserve's savings (fewer writes, frames
read without ``websockets``' parser). The first such connection logs which pieces are
missing, once per protocol, so an operator sees why the server got slower.
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

log = logging.getLogger(__name__)

_reported: set[str] = set()


def missing(obj: object, names: tuple[str, ...], prefix: str = "") -> list[str]:
    """The ``names`` that ``obj`` lacks, each with ``prefix`` (where it was looked for)."""
    return [prefix + name for name in names if not hasattr(obj, name)]


def report(protocol: str, lacking: list[str]) -> None:
    """Log, the first time only for ``protocol``, that it serves as uvicorn's own class."""
    if protocol in _reported:
        return
    _reported.add(protocol)
    try:
        release = version("uvicorn")
    except PackageNotFoundError:  # pragma: no cover - uvicorn imported from a source tree
        release = "unknown"
    log.warning(
        "uvicorn %s lacks %s, which gruserve's %s protocol reads; its connections are served "
        "by uvicorn's own protocol (correct, without gruserve's savings); pin uvicorn to a "
        "release gruserve's tests pass with to have them back.",
        release,
        ", ".join(lacking),
        protocol,
    )
