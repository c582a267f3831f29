"""Tell a tf-keras / Keras 2 file from a Keras 3 one.

The distinction changes numbers, not just parsing: Keras 2's ``hard_sigmoid``
is ``0.2 x + 0.5`` where Keras 3's is ``x / 6 + 0.5``, and only Keras 2 has
``time_major``. The recorded ``keras_version`` decides; files that do not record
it (hand-written or stripped) are judged by keys only tf-keras writes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from gruserve.errors import ModelFileError

# Config keys written by tf-keras / Keras 2 and never by Keras 3.
_KERAS2_KEYS = frozenset({"batch_input_shape", "time_major"})


def keras_major(path: Path, version: str | None, config: Any) -> int:
    """2 for tf-keras / Keras 2 files, 3 for Keras 3 files."""
    if version:
        match = re.match(r"\s*(\d+)", version)
        if match:
            major = int(match.group(1))
            if major >= 3:
                return 3
            if major == 2:
                return 2
            raise ModelFileError(
                path,
                f"was written by Keras {version}; only Keras 2 (tf-keras) and Keras 3 files "
                "are supported",
            )
    return 2 if _has_keras2_keys(config) else 3


def _has_keras2_keys(value: Any) -> bool:
    if isinstance(value, dict):
        return bool(_KERAS2_KEYS & set(value)) or any(_has_keras2_keys(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_keras2_keys(v) for v in value)
    return False
