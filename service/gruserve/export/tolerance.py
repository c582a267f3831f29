"""The rule every parity figure is judged by: float64 is the truth, float32 the yardstick.

An exported float32 graph cannot be closer to the exact result than float32
arithmetic allows. On well-conditioned models that is far inside a fixed
tolerance; on chaotic or diverging dynamics float32 itself (Keras included)
drifts far past it. So an output passes when its error against the float64
result is within the tolerance or within :data:`FLOAT32_FACTOR` times the
error of Keras's own float32 computation on the same inputs. The export
check, the native-kernel tests and the CI grid all use :func:`judge`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

ATOL = 1e-5
"""Absolute tolerance against the float64 result."""
RTOL = 1e-4
"""Relative tolerance against the float64 result."""
FLOAT32_FACTOR = 8.0
"""How many times float32's own error (in tolerance units) an export may have."""


def _non_finite(values: np.ndarray) -> str:
    kinds = [k for k, hit in (("NaN", np.isnan(values)), ("inf", np.isinf(values))) if hit.any()]
    return " and ".join(kinds)


def judge(
    got: np.ndarray,
    exact: np.ndarray,
    float32: np.ndarray | Sequence[np.ndarray],
    atol: float = ATOL,
    rtol: float = RTOL,
) -> dict[str, Any]:
    """Compare one output tensor: errors against float64, in absolute and tolerance units.

    ``error_ratio`` is ``max |got - exact| / (atol + rtol * |exact|)``: 1 is the
    edge of the tolerance. Where ``exact`` itself is not finite (float64
    overflowed), ``got`` must not be finite either, though inf and NaN agree:
    which one comes out depends on the order of operations, unless a float32
    computation is finite there as well: its error is then unbounded too, and
    float32's yardstick admits the export's. Where ``got`` is
    not finite and ``exact`` is, the error is infinite and passes only if a
    float32 computation overflowed as well.

    ``float32`` may hold several float32 computations of the same math
    (torch's and numpy's): their largest error is the yardstick, since two
    float32 programs round differently and either is as right as the other.
    """
    singles = [
        np.asarray(f, np.float64)
        for f in ([float32] if isinstance(float32, np.ndarray) else float32)
    ]
    got64 = got.astype(np.float64)
    finite = np.isfinite(exact)
    # Where float64 itself overflowed, any overflow (inf or the NaN of inf - inf) agrees.
    mismatched_inf = bool(np.any(~finite & np.isfinite(got64)))
    # The same miss by a float32 computation (its rounding saturated a gate at exactly 1
    # where float64's did not, so float64 alone grew past its range) is float32's own
    # error there: unbounded, so the export's miss is within the yardstick.
    float32_missed_inf = any(bool(np.any(~finite & np.isfinite(f))) for f in singles)
    bound = atol + rtol * np.abs(np.where(finite, exact, 0.0))
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(finite, np.abs(got64 - exact), 0.0)
        f32_diff = np.max([np.where(finite, np.abs(f - exact), 0.0) for f in singles], axis=0)
    diff = np.where(np.isnan(diff), np.inf, diff)
    f32_diff = np.where(np.isnan(f32_diff), np.inf, f32_diff)
    ratio = float(np.max(diff / bound)) if diff.size else 0.0
    f32_ratio = float(np.max(f32_diff / bound)) if diff.size else 0.0
    if mismatched_inf:
        ratio = math.inf
    if float32_missed_inf:
        f32_ratio = math.inf
    return {
        "max_abs_diff": float(diff.max()) if diff.size else 0.0,
        "float32_max_abs_diff": float(f32_diff.max()) if diff.size else 0.0,
        "error_ratio": ratio,
        "float32_error_ratio": f32_ratio,
        "non_finite": _non_finite(got64[finite]) if diff.size else "",
        "passed": ratio <= 1.0 or ratio <= FLOAT32_FACTOR * f32_ratio,
    }
