"""Array backends the layer math is written against.

The GRU math lives once, in :mod:`gruserve.layers.forward` and
:mod:`gruserve.layers.activations`, written against the small interface
below (the same idea as Keras's ``keras.ops`` over several backends). Three
backends implement it:

- :class:`NumpyBackend`: the reference used for export-time parity checks and
  by tools that must not import torch;
- :class:`TorchBackend`: the torch modules in :mod:`gruserve.nn` (autograd);
- ``gruserve.export.symbolic.OnnxBackend``: arrays are ONNX tensor names and
  every call emits graph nodes, so loop and unrolled graphs are produced by
  running the very same functions.

Arrays support the Python operators ``+ - * / @``, unary minus and slicing
with plain ``slice`` objects; everything else goes through a backend method.
Time loops use :meth:`LoopBackend.rnn`, which mirrors Keras's backend ``rnn``
(masking, ``go_backwards``, ``zero_output_for_mask``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

Array = Any
StepFunction = Callable[[Array, list[Array]], tuple[Array, list[Array]]]


class Backend(Protocol):
    """The operations the layer math needs; see the module docstring."""

    name: str

    def asarray(self, value: np.ndarray, name: str | None = None) -> Array: ...
    def cast(self, x: Array, dtype: str) -> Array: ...
    def sigmoid(self, x: Array) -> Array: ...
    def tanh(self, x: Array) -> Array: ...
    def exp(self, x: Array) -> Array: ...
    def log(self, x: Array) -> Array: ...
    def erf(self, x: Array) -> Array: ...
    def abs(self, x: Array) -> Array: ...
    def sqrt(self, x: Array) -> Array: ...
    def softplus(self, x: Array) -> Array: ...
    def maximum(self, x: Array, y: Array | float) -> Array: ...
    def minimum(self, x: Array, y: Array | float) -> Array: ...
    def clip(self, x: Array, low: float, high: float) -> Array: ...
    def where(self, cond: Array, x: Array | float, y: Array | float) -> Array: ...
    def greater(self, x: Array, y: Array | float) -> Array: ...
    def less(self, x: Array, y: Array | float) -> Array: ...
    def not_equal(self, x: Array, y: Array | float) -> Array: ...
    def logical_and(self, x: Array, y: Array) -> Array: ...
    def any(self, x: Array, axis: int) -> Array: ...
    def max(self, x: Array, axis: int, keepdims: bool = True) -> Array: ...
    def sum(self, x: Array, axis: int | None, keepdims: bool = True) -> Array: ...
    def sort_descending(self, x: Array) -> Array: ...
    def cumsum(self, x: Array) -> Array: ...
    def positions(self, x: Array) -> Array: ...
    def concat(self, xs: Sequence[Array], axis: int) -> Array: ...
    def stack(self, xs: Sequence[Array], axis: int) -> Array: ...
    def flip(self, x: Array, axis: int) -> Array: ...
    def take(self, table: Array, ids: Array) -> Array: ...
    def expand_dims(self, x: Array, axis: int) -> Array: ...
    def swap_batch_time(self, x: Array) -> Array: ...
    def zeros_state(self, like: Array, units: int) -> Array: ...
    def time_step(self, x: Array, t: int) -> Array: ...
    def num_timesteps(self, x: Array) -> int | None: ...
    def rnn(
        self,
        step: StepFunction,
        inputs: Array,
        initial_states: list[Array],
        mask: Array | None,
        *,
        go_backwards: bool,
        zero_output_for_mask: bool,
        return_sequences: bool,
        unroll: bool,
    ) -> tuple[Array, Array | None, list[Array]]: ...


class LoopBackend:
    """A Python time loop with Keras's masking rules, shared by eager backends.

    Keras (``keras/src/backend/*/rnn.py``) carries the state through masked
    steps and emits either the previous output or zeros there; the "previous
    output" before any valid step is zeros, not the initial state.
    """

    def rnn(
        self: Any,
        step: StepFunction,
        inputs: Array,
        initial_states: list[Array],
        mask: Array | None,
        *,
        go_backwards: bool,
        zero_output_for_mask: bool,
        return_sequences: bool,
        unroll: bool,
    ) -> tuple[Array, Array | None, list[Array]]:
        """Run ``step`` over axis 1 of ``inputs`` (batch, time, ...).

        Returns ``(last_output, outputs, final_states)``; ``outputs`` is the
        (batch, time, units) sequence in processing order (reversed when
        ``go_backwards``, as Keras returns it) or ``None`` when not requested.
        """
        del unroll  # unrolling changes the graph, never the numbers
        steps = self.num_timesteps(inputs)
        if steps is None:
            raise TypeError(f"{self.name} backend needs a static number of timesteps")
        order = range(steps - 1, -1, -1) if go_backwards else range(steps)
        states = list(initial_states)
        outputs: list[Array] = []
        prev_output: Array | None = None
        for t in order:
            output, new_states = step(self.time_step(inputs, t), states)
            if mask is not None:
                keep = self.expand_dims(self.time_step(mask, t), -1)
                if zero_output_for_mask or prev_output is None:
                    fallback: Array | float = 0.0
                else:
                    fallback = prev_output
                output = self.where(keep, output, fallback)
                new_states = [
                    self.where(keep, n, s) for n, s in zip(new_states, states, strict=True)
                ]
            prev_output = output
            states = new_states
            if return_sequences:
                outputs.append(output)
        if prev_output is None:
            raise ValueError("rnn() needs at least one timestep")
        sequence = self.stack(outputs, axis=1) if return_sequences else None
        return prev_output, sequence, states


class NumpyBackend(LoopBackend):
    """float32 numpy: the torch-free reference implementation."""

    name = "numpy"

    def asarray(self, value: np.ndarray, name: str | None = None) -> np.ndarray:
        del name
        return np.asarray(value)

    def cast(self, x: np.ndarray, dtype: str) -> np.ndarray:
        return np.asarray(x).astype(dtype)

    def sigmoid(self, x: np.ndarray) -> np.ndarray:
        # Split by sign so that exp never overflows for large |x|.
        e = np.exp(-np.abs(x))
        return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(x.dtype)

    def tanh(self, x: np.ndarray) -> np.ndarray:
        return np.tanh(x)

    def exp(self, x: np.ndarray) -> np.ndarray:
        return np.exp(x)

    def log(self, x: np.ndarray) -> np.ndarray:
        return np.log(x)

    def erf(self, x: np.ndarray) -> np.ndarray:
        return _np_erf(x)

    def abs(self, x: np.ndarray) -> np.ndarray:
        return np.abs(x)

    def sqrt(self, x: np.ndarray) -> np.ndarray:
        return np.sqrt(x)

    def softplus(self, x: np.ndarray) -> np.ndarray:
        return np.logaddexp(np.zeros_like(x), x)

    def maximum(self, x: np.ndarray, y: np.ndarray | float) -> np.ndarray:
        return np.maximum(x, np.asarray(y, dtype=x.dtype))

    def minimum(self, x: np.ndarray, y: np.ndarray | float) -> np.ndarray:
        return np.minimum(x, np.asarray(y, dtype=x.dtype))

    def clip(self, x: np.ndarray, low: float, high: float) -> np.ndarray:
        return np.clip(x, np.asarray(low, x.dtype), np.asarray(high, x.dtype))

    def where(self, cond: np.ndarray, x: Any, y: Any) -> np.ndarray:
        dtype = next((a.dtype for a in (x, y) if isinstance(a, np.ndarray)), np.dtype(np.float32))
        return np.where(cond, x, y).astype(dtype, copy=False)

    def greater(self, x: np.ndarray, y: Any) -> np.ndarray:
        return np.greater(x, y)

    def less(self, x: np.ndarray, y: Any) -> np.ndarray:
        return np.less(x, y)

    def not_equal(self, x: np.ndarray, y: Any) -> np.ndarray:
        return np.not_equal(x, y)

    def logical_and(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.logical_and(x, y)

    def any(self, x: np.ndarray, axis: int) -> np.ndarray:
        return np.any(x, axis=axis)

    def max(self, x: np.ndarray, axis: int, keepdims: bool = True) -> np.ndarray:
        return np.max(x, axis=axis, keepdims=keepdims)

    def sum(self, x: np.ndarray, axis: int | None, keepdims: bool = True) -> np.ndarray:
        return np.sum(x, axis=axis, keepdims=keepdims, dtype=x.dtype if x.dtype != bool else None)

    def sort_descending(self, x: np.ndarray) -> np.ndarray:
        return -np.sort(-x, axis=-1)

    def cumsum(self, x: np.ndarray) -> np.ndarray:
        return np.cumsum(x, axis=-1, dtype=x.dtype)

    def positions(self, x: np.ndarray) -> np.ndarray:
        return np.arange(1, x.shape[-1] + 1, dtype=x.dtype)

    def concat(self, xs: Sequence[np.ndarray], axis: int) -> np.ndarray:
        return np.concatenate(list(xs), axis=axis)

    def stack(self, xs: Sequence[np.ndarray], axis: int) -> np.ndarray:
        return np.stack(list(xs), axis=axis)

    def flip(self, x: np.ndarray, axis: int) -> np.ndarray:
        return np.flip(x, axis=axis)

    def take(self, table: np.ndarray, ids: np.ndarray) -> np.ndarray:
        return np.take(table, ids.astype(np.int64), axis=0)

    def expand_dims(self, x: np.ndarray, axis: int) -> np.ndarray:
        return np.expand_dims(x, axis)

    def swap_batch_time(self, x: np.ndarray) -> np.ndarray:
        return np.swapaxes(x, 0, 1)

    def zeros_state(self, like: np.ndarray, units: int) -> np.ndarray:
        return np.zeros((like.shape[0], units), dtype=np.float32)

    def time_step(self, x: np.ndarray, t: int) -> np.ndarray:
        return x[:, t]

    def num_timesteps(self, x: np.ndarray) -> int:
        return int(x.shape[1])


def _np_erf(x: np.ndarray) -> np.ndarray:
    """Exact erf elementwise (numpy has none; scipy is not a dependency)."""
    flat = np.fromiter((math.erf(v) for v in x.astype(np.float64).ravel()), np.float64, x.size)
    return flat.reshape(x.shape).astype(x.dtype)


class TorchBackend(LoopBackend):
    """torch tensors with autograd; used by :mod:`gruserve.nn`."""

    name = "torch"

    def __init__(self) -> None:
        import torch  # deferred: serving and export never need torch

        self.torch = torch

    def asarray(self, value: Any, name: str | None = None) -> Any:
        del name
        if isinstance(value, self.torch.Tensor):
            return value
        return self.torch.as_tensor(np.asarray(value))

    def cast(self, x: Any, dtype: str) -> Any:
        return x.to(getattr(self.torch, dtype))

    def sigmoid(self, x: Any) -> Any:
        return self.torch.sigmoid(x)

    def tanh(self, x: Any) -> Any:
        return self.torch.tanh(x)

    def exp(self, x: Any) -> Any:
        return self.torch.exp(x)

    def log(self, x: Any) -> Any:
        return self.torch.log(x)

    def erf(self, x: Any) -> Any:
        return self.torch.erf(x)

    def abs(self, x: Any) -> Any:
        return self.torch.abs(x)

    def sqrt(self, x: Any) -> Any:
        return self.torch.sqrt(x)

    def softplus(self, x: Any) -> Any:
        return self.torch.nn.functional.softplus(x)

    def _like(self, x: Any, y: Any) -> Any:
        return y if isinstance(y, self.torch.Tensor) else self.torch.tensor(y, dtype=x.dtype)

    def maximum(self, x: Any, y: Any) -> Any:
        return self.torch.maximum(x, self._like(x, y))

    def minimum(self, x: Any, y: Any) -> Any:
        return self.torch.minimum(x, self._like(x, y))

    def clip(self, x: Any, low: float, high: float) -> Any:
        return self.torch.clamp(x, low, high)

    def where(self, cond: Any, x: Any, y: Any) -> Any:
        ref = x if isinstance(x, self.torch.Tensor) else y
        return self.torch.where(cond, self._like(ref, x), self._like(ref, y))

    def greater(self, x: Any, y: Any) -> Any:
        return x > y

    def less(self, x: Any, y: Any) -> Any:
        return x < y

    def not_equal(self, x: Any, y: Any) -> Any:
        return x != y

    def logical_and(self, x: Any, y: Any) -> Any:
        return self.torch.logical_and(x, y)

    def any(self, x: Any, axis: int) -> Any:
        return self.torch.any(x, dim=axis)

    def max(self, x: Any, axis: int, keepdims: bool = True) -> Any:
        return self.torch.amax(x, dim=axis, keepdim=keepdims)

    def sum(self, x: Any, axis: int | None, keepdims: bool = True) -> Any:
        if axis is None:
            return self.torch.sum(x)
        return self.torch.sum(x, dim=axis, keepdim=keepdims)

    def sort_descending(self, x: Any) -> Any:
        return self.torch.sort(x, dim=-1, descending=True).values

    def cumsum(self, x: Any) -> Any:
        return self.torch.cumsum(x, dim=-1)

    def positions(self, x: Any) -> Any:
        return self.torch.arange(1, x.shape[-1] + 1, dtype=x.dtype, device=x.device)

    def concat(self, xs: Sequence[Any], axis: int) -> Any:
        return self.torch.cat(list(xs), dim=axis)

    def stack(self, xs: Sequence[Any], axis: int) -> Any:
        return self.torch.stack(list(xs), dim=axis)

    def flip(self, x: Any, axis: int) -> Any:
        return self.torch.flip(x, dims=[axis])

    def take(self, table: Any, ids: Any) -> Any:
        return self.torch.nn.functional.embedding(ids.long(), table)

    def expand_dims(self, x: Any, axis: int) -> Any:
        return self.torch.unsqueeze(x, axis)

    def swap_batch_time(self, x: Any) -> Any:
        return self.torch.transpose(x, 0, 1)

    def zeros_state(self, like: Any, units: int) -> Any:
        return self.torch.zeros(
            (like.shape[0], units), dtype=self.torch.float32, device=like.device
        )

    def time_step(self, x: Any, t: int) -> Any:
        return x[:, t]

    def num_timesteps(self, x: Any) -> int:
        return int(x.shape[1])


NUMPY = NumpyBackend()
_torch_backend: TorchBackend | None = None


def torch_backend() -> TorchBackend:
    """The shared torch backend (imports torch on first use)."""
    global _torch_backend
    if _torch_backend is None:
        _torch_backend = TorchBackend()
    return _torch_backend
