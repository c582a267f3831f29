"""Which versions of a model are kept loaded: Triton's version policy, in its words.

``latest: N`` keeps the N newest versions on disk, ``specific: [1, 3]`` keeps those,
``all`` keeps every one. The policy decides what is loaded ahead of need and what
may be unloaded once idle; it never refuses a session: a step for a version on disk
that no policy keeps loads it on demand.

>>> VersionPolicy.parse("latest: 2").kept([1, 2, 3])
[2, 3]
>>> VersionPolicy.parse("specific: [1, 3]").kept([1, 2, 3])
[1, 3]
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

_LATEST = re.compile(r"^\s*latest\s*:\s*(\d+)\s*$")
_SPECIFIC = re.compile(r"^\s*specific\s*:\s*(\[.*\])\s*$")


@dataclass(frozen=True)
class VersionPolicy:
    """``latest`` N newest, else the ``specific`` versions, else (both None) all of them."""

    latest: int | None = 1
    specific: tuple[int, ...] | None = None

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """``latest: N`` (N >= 1), ``specific: [v, ...]`` or ``all``.

        Raises:
            ValueError: anything else, with the accepted forms.
        """
        if text.strip() == "all":
            return cls(None, None)
        found = _LATEST.fullmatch(text)
        if found and int(found.group(1)) >= 1:
            return cls(int(found.group(1)), None)
        found = _SPECIFIC.fullmatch(text)
        if found:
            try:
                versions = json.loads(found.group(1))
            except ValueError:
                versions = None
            if (
                isinstance(versions, list)
                and versions
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in versions)
            ):
                return cls(None, tuple(sorted(set(versions))))
        raise ValueError(
            f"a version policy is 'latest: N' (N >= 1), 'specific: [1, 2]' or 'all'. "
            f"Received: {text!r}"
        )

    def kept(self, on_disk: Sequence[int]) -> list[int]:
        """The versions of ``on_disk`` this policy keeps loaded, oldest first."""
        found = sorted(on_disk)
        if self.latest is not None:
            return found[-self.latest :]
        if self.specific is not None:
            return [v for v in found if v in self.specific]
        return found
