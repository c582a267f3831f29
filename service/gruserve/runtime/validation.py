"""Checking request arrays against a model's signature, with field paths in every error.

The edge turns JSON or bytes into numpy arrays; these functions decide whether
those arrays fit the model (shape, dtype, finiteness, token range, state
layout) and return them in the exact dtype and layout the runtime feeds
onnxruntime. Errors name the offending element as ``inputs[2][1]`` so a person
can find it in their payload.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gruserve.errors import InvalidInput, PayloadTooLarge
from gruserve.runtime.signature import ModelSignature

StateValue = Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray


@dataclass(frozen=True)
class Chunk:
    """One session step: ``inputs`` (T, F) float32 or (T,) int64, ``mask`` (T,) or None."""

    inputs: np.ndarray
    mask: np.ndarray | None
    single: bool  # the request sent one timestep without a time axis

    @property
    def timesteps(self) -> int:
        return int(self.inputs.shape[0])


def path(field: str, index: Sequence[int]) -> str:
    return field + "".join(f"[{int(i)}]" for i in index)


_FLOAT32_MAX = float(np.finfo(np.float32).max)
_ALL = np.logical_and.reduce  # ``.all()`` without the Python-level wrapper numpy puts around it
_LARGEST = np.maximum.reduce


def _finite_float32(x: np.ndarray, field: str) -> np.ndarray:
    """``x`` as float32, refusing NaN, infinities and values float32 cannot hold.

    The range check comes before the cast, so the cast never overflows (and never
    needs a costly ``np.errstate`` around it: this runs on every step). The common
    case is one reduction (NaN makes the largest magnitude NaN, which fails ``<=``);
    only a failing array is checked value by value to name the first bad one.
    """
    if x.dtype == np.float32:
        if _ALL(np.isfinite(x), axis=None):
            return x
        ok = np.isfinite(x)
    elif x.dtype.kind in "fiu":
        if x.size and _LARGEST(np.abs(x), axis=None) <= _FLOAT32_MAX:
            return x.astype(np.float32)
        ok = np.abs(x) <= _FLOAT32_MAX  # False for NaN too
    else:
        raise InvalidInput(field, f"expected numbers, got {x.dtype} values")
    if not ok.all():
        bad = tuple(np.argwhere(~ok)[0])
        raise InvalidInput(
            path(field, bad),
            f"{x[bad]!r} is not a finite float32 number; NaN, Infinity and magnitudes above "
            "3.4e38 are rejected",
        )
    return x if x.dtype == np.float32 else x.astype(np.float32)


def _token_ids(x: np.ndarray, field: str, vocabulary: int | None) -> np.ndarray:
    if x.dtype.kind == "f":
        whole = np.isfinite(x) & (x == np.round(x))
        if not whole.all():
            bad = tuple(np.argwhere(~whole)[0])
            raise InvalidInput(path(field, bad), f"token ids must be integers, got {x[bad]!r}")
    elif x.dtype.kind not in "iu":
        raise InvalidInput(field, f"token ids must be integers, got {x.dtype} values")
    limit = vocabulary if vocabulary is not None else np.iinfo(np.int64).max
    out = (x < 0) | (x >= limit)  # before the cast: a huge float must not wrap around
    if out.any():
        bad = tuple(np.argwhere(out)[0])
        raise InvalidInput(
            path(field, bad),
            f"token id {int(x[bad])} is outside [0, {limit}) (the Embedding's input_dim)",
        )
    return x.astype(np.int64, copy=False)


def _mask(
    mask: np.ndarray | None, shape: tuple[int, ...], field: str = "mask"
) -> np.ndarray | None:
    if mask is None:
        return None
    if mask.dtype != np.bool_:
        if mask.dtype.kind not in "iu" or not np.isin(mask, (0, 1)).all():
            raise InvalidInput(field, "mask values must be booleans (true/false)")
        mask = mask.astype(np.bool_)
    if mask.shape != shape:
        raise InvalidInput(
            field, f"expected shape {list(shape)} to match inputs, got {list(mask.shape)}"
        )
    return mask


def _timesteps(sig: ModelSignature, t: int, max_timesteps: int) -> None:
    if t < 1:
        raise InvalidInput("inputs", "needs at least one timestep")
    if t > max_timesteps:
        raise PayloadTooLarge("the number of timesteps", t, max_timesteps, "GRUSERVE_MAX_TIMESTEPS")
    s = sig.static_timesteps
    if s is not None and (t > s or (sig.pad_alignment is None and t != s)):
        exactly = "exactly" if sig.pad_alignment is None else "at most"
        raise InvalidInput(
            "inputs",
            f"model {sig.name!r} was exported unrolled for {s} timesteps: "
            f"send {exactly} {s}, got {t}",
        )


def check_chunk(
    sig: ModelSignature, inputs: np.ndarray, mask: np.ndarray | None, max_timesteps: int
) -> Chunk:
    """Validate one session step: (T, F) or (F,) values, or (T,) token ids."""
    if sig.takes_token_ids:
        single = inputs.ndim == 0
        x = inputs.reshape(1) if single else inputs
        if x.ndim != 1:
            raise InvalidInput(
                "inputs",
                f"expected a list of token ids (timesteps,), got shape {list(inputs.shape)}",
            )
        _timesteps(sig, x.shape[0], max_timesteps)
        ids = _token_ids(x, "inputs", sig.vocabulary)
        return Chunk(ids, _mask(mask, ids.shape), single)
    f = sig.features
    single = inputs.ndim == 1
    x = inputs.reshape(1, -1) if single else inputs
    if x.ndim != 2 or x.shape[1] != f:
        raise InvalidInput(
            "inputs",
            f"expected shape [timesteps, {f}] (or [{f}] for one timestep), "
            f"got {list(inputs.shape)}: "
            f"model {sig.name!r} takes {f} features per timestep",
        )
    _timesteps(sig, x.shape[0], max_timesteps)
    values = _finite_float32(inputs, "inputs").reshape(x.shape)
    return Chunk(values, _mask(mask, x.shape[:1]), single)


def check_batch(
    sig: ModelSignature, inputs: np.ndarray, mask: np.ndarray | None, max_timesteps: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate a stateless batch: (B, T, F) values or (B, T) token ids, mask (B, T)."""
    want = 2 if sig.takes_token_ids else 3
    if inputs.ndim != want or (not sig.takes_token_ids and inputs.shape[2] != sig.features):
        shape = (
            "[batch, timesteps]" if sig.takes_token_ids else f"[batch, timesteps, {sig.features}]"
        )
        raise InvalidInput("inputs", f"expected shape {shape}, got {list(inputs.shape)}")
    if inputs.shape[0] < 1:
        raise InvalidInput("inputs", "needs at least one sequence")
    _timesteps(sig, inputs.shape[1], max_timesteps)
    if sig.takes_token_ids:
        x = _token_ids(inputs, "inputs", sig.vocabulary)
    else:
        x = _finite_float32(inputs, "inputs")
    return x, _mask(mask, inputs.shape[:2])


def check_states(
    sig: ModelSignature, value: StateValue, field: str, batch: int | None = None
) -> list[np.ndarray]:
    """States in manifest order, each (units,) for a session or (batch, units) for predict.

    Accepts ``{key: values}`` (canonical), a list with one entry per state in
    manifest order, or, for a one-state model, that state's values alone.
    """
    lead = () if batch is None else (batch,)
    shapes = [(*lead, u) for u in sig.state_units]
    keys = sig.state_keys
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(keys))
        if unknown:
            raise InvalidInput(
                f"{field}.{unknown[0]}", f"unknown state; this model's states are {keys}"
            )
        missing = [k for k in keys if k not in value]
        if missing:
            raise InvalidInput(f"{field}.{missing[0]}", f"missing; give every state of {keys}")
        parts = [(f"{field}.{k}", value[k]) for k in keys]
    elif isinstance(value, np.ndarray) and len(keys) == 1 and value.shape == shapes[0]:
        parts = [(field, value)]
    else:
        scalar = isinstance(value, np.ndarray) and value.ndim == 0
        entries = [] if scalar else list(value)
        if scalar or len(entries) != len(keys):
            raise InvalidInput(
                field,
                f"expected {len(keys)} state(s) {keys} with shapes {[list(s) for s in shapes]}, "
                f"got {'a single number' if scalar else f'{len(entries)} entries'}",
            )
        parts = [(f"{field}[{i}]", np.asarray(v)) for i, v in enumerate(entries)]
    checked = []
    for (where, array), shape in zip(parts, shapes, strict=True):
        if array.shape != shape:
            raise InvalidInput(where, f"expected shape {list(shape)}, got {list(array.shape)}")
        checked.append(_finite_float32(array, where))
    return checked


def flat_state(sig: ModelSignature, value: StateValue | None, field: str) -> np.ndarray:
    """A session's state vector from a request value; zeros when None."""
    if value is None:
        return sig.zero_state()
    parts = check_states(sig, value, field)
    return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
