"""A backend whose arrays are ONNX tensors: running the layer math builds a graph.

:class:`OnnxBackend` implements :class:`gruserve.layers.backend.Backend`;
each call appends nodes to the graph being built (the main graph, or the body
of a Scan / branch of an If while one is open). Because the exporter runs the
same functions as the torch modules and the numpy reference, the loop and
unrolled graphs cannot drift from them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from onnx import GraphProto, NodeProto, TensorProto, ValueInfoProto, helper, numpy_helper

from gruserve.layers.backend import LoopBackend, StepFunction

_ONNX_TYPES = {
    "float32": TensorProto.FLOAT,
    "bool": TensorProto.BOOL,
    "int32": TensorProto.INT32,
    "int64": TensorProto.INT64,
}
_INT64_MIN = np.iinfo(np.int64).min


@dataclass
class _Scope:
    """Nodes of one graph being built (main graph, Scan body or If branch)."""

    nodes: list[NodeProto] = field(default_factory=list)


class GraphContext:
    """Names, initializers and the stack of graphs under construction."""

    def __init__(self) -> None:
        self.initializers: list[TensorProto] = []
        self._constants: dict[tuple[str, tuple[int, ...], bytes], str] = {}
        self._used: set[str] = set()
        self._scopes = [_Scope()]

    def fresh(self, hint: str) -> str:
        base = hint.replace(" ", "_") or "t"
        name, n = base, 0
        while name in self._used:
            n += 1
            name = f"{base}_{n}"
        self._used.add(name)
        return name

    @property
    def nodes(self) -> list[NodeProto]:
        return self._scopes[-1].nodes

    def produced_here(self, name: str) -> bool:
        """Whether a node of the graph being built outputs ``name``.

        A subgraph may only return its own values; anything else needs an Identity.
        """
        return any(name in node.output for node in self.nodes)

    def emit(
        self,
        op: str,
        inputs: Sequence[str],
        n_outputs: int = 1,
        hint: str | None = None,
        **attrs: Any,
    ) -> list[str]:
        outputs = [
            self.fresh(f"{hint or op}_out{i}" if n_outputs > 1 else (hint or op))
            for i in range(n_outputs)
        ]
        node_name = self.fresh(f"{op}_node")
        self.nodes.append(helper.make_node(op, list(inputs), outputs, name=node_name, **attrs))
        return outputs

    def initializer(self, value: np.ndarray, name: str | None = None) -> str:
        """Register an initializer; unnamed small constants are shared."""
        array = np.asarray(value)
        if name is None:
            key = (str(array.dtype), array.shape, array.tobytes())
            if key in self._constants:
                return self._constants[key]
            tensor_name = self.fresh("const")
            self._constants[key] = tensor_name
        else:
            tensor_name = self.fresh(name)
        self.initializers.append(numpy_helper.from_array(array, tensor_name))
        return tensor_name

    @contextmanager
    def subgraph(self) -> Iterator[_Scope]:
        scope = _Scope()
        self._scopes.append(scope)
        try:
            yield scope
        finally:
            self._scopes.pop()

    def make_subgraph(
        self, scope: _Scope, name: str, inputs: list[ValueInfoProto], outputs: list[ValueInfoProto]
    ) -> GraphProto:
        return helper.make_graph(scope.nodes, self.fresh(name), inputs, outputs)


def value_info(name: str, dtype: str, rank: int | None = None) -> ValueInfoProto:
    shape = None if rank is None else [None] * rank
    return helper.make_tensor_value_info(name, _ONNX_TYPES[dtype], shape)


class OnnxTensor:
    """A tensor name plus the dtype and rank the builders need to know."""

    __array_priority__ = 1000  # numpy scalars on the left defer to our operators

    def __init__(
        self, ctx: GraphContext, name: str, dtype: str = "float32", rank: int | None = None
    ) -> None:
        self.ctx = ctx
        self.name = name
        self.dtype = dtype
        self.rank = rank

    def __repr__(self) -> str:
        return f"OnnxTensor({self.name!r}, {self.dtype}, rank={self.rank})"

    # -- helpers -----------------------------------------------------------------
    def _other(self, other: Any) -> OnnxTensor:
        if isinstance(other, OnnxTensor):
            return other
        array = np.asarray(other, dtype=self.dtype if self.dtype != "bool" else None)
        return OnnxTensor(self.ctx, self.ctx.initializer(array), str(array.dtype), array.ndim)

    def _binary(self, op: str, other: Any, reverse: bool = False) -> OnnxTensor:
        rhs = self._other(other)
        a, b = (rhs, self) if reverse else (self, rhs)
        rank = max(r for r in (a.rank, b.rank, 0) if r is not None)
        return OnnxTensor(self.ctx, self.ctx.emit(op, [a.name, b.name])[0], self.dtype, rank)

    def __add__(self, other: Any) -> OnnxTensor:
        return self._binary("Add", other)

    def __radd__(self, other: Any) -> OnnxTensor:
        return self._binary("Add", other, reverse=True)

    def __sub__(self, other: Any) -> OnnxTensor:
        return self._binary("Sub", other)

    def __rsub__(self, other: Any) -> OnnxTensor:
        return self._binary("Sub", other, reverse=True)

    def __mul__(self, other: Any) -> OnnxTensor:
        return self._binary("Mul", other)

    def __rmul__(self, other: Any) -> OnnxTensor:
        return self._binary("Mul", other, reverse=True)

    def __truediv__(self, other: Any) -> OnnxTensor:
        return self._binary("Div", other)

    def __rtruediv__(self, other: Any) -> OnnxTensor:
        return self._binary("Div", other, reverse=True)

    def __neg__(self) -> OnnxTensor:
        return OnnxTensor(self.ctx, self.ctx.emit("Neg", [self.name])[0], self.dtype, self.rank)

    def __matmul__(self, other: Any) -> OnnxTensor:
        rhs = self._other(other)
        return OnnxTensor(
            self.ctx, self.ctx.emit("MatMul", [self.name, rhs.name])[0], self.dtype, self.rank
        )

    def __getitem__(self, key: Any) -> OnnxTensor:
        """Basic indexing: ints, step-less slices and one Ellipsis."""
        items = list(key) if isinstance(key, tuple) else [key]
        if Ellipsis in items:
            if self.rank is None:
                raise TypeError(f"indexing {self!r} with ... needs a known rank")
            at = items.index(Ellipsis)
            fill = [slice(None)] * (self.rank - (len(items) - 1))
            items = items[:at] + fill + items[at + 1 :]
        rank = self.rank
        out = self
        # Slices first (axes stay put), then integer picks from the last axis backwards.
        starts, ends, axes = [], [], []
        for axis, item in enumerate(items):
            if isinstance(item, slice):
                if item.step not in (None, 1):
                    raise TypeError("slices with a step are not supported")
                if item.start is None and item.stop is None:
                    continue
                starts.append(item.start or 0)
                ends.append(item.stop if item.stop is not None else np.iinfo(np.int64).max)
                axes.append(axis)
        if axes:
            ints = [self.ctx.initializer(np.asarray(v, np.int64)) for v in (starts, ends, axes)]
            out = OnnxTensor(
                self.ctx, self.ctx.emit("Slice", [out.name, *ints])[0], self.dtype, rank
            )
        for axis in reversed(range(len(items))):
            item = items[axis]
            if isinstance(item, int):
                index = self.ctx.initializer(np.asarray(item, np.int64))
                out = OnnxTensor(
                    self.ctx,
                    self.ctx.emit("Gather", [out.name, index], axis=axis)[0],
                    self.dtype,
                    None if rank is None else rank - 1,
                )
                rank = out.rank
        return out


class OnnxBackend(LoopBackend):
    """Emits ONNX nodes; see the module docstring.

    ``timesteps`` is the static number of timesteps when the model declares
    one; unrolled loops need it.
    """

    name = "onnx"

    def __init__(self, ctx: GraphContext, timesteps: int | None = None) -> None:
        self.ctx = ctx
        self.timesteps = timesteps

    # -- plumbing --------------------------------------------------------------------
    def tensor(self, name: str, dtype: str = "float32", rank: int | None = None) -> OnnxTensor:
        return OnnxTensor(self.ctx, name, dtype, rank)

    def const(self, value: Any, dtype: str = "float32") -> OnnxTensor:
        array = np.asarray(value, dtype=dtype)
        return self.tensor(self.ctx.initializer(array), dtype, array.ndim)

    def op(
        self,
        op: str,
        inputs: Sequence[OnnxTensor | str | None],
        *,
        dtype: str = "float32",
        rank: int | None = None,
        n_outputs: int = 1,
        **attrs: Any,
    ) -> Any:
        names = ["" if i is None else (i if isinstance(i, str) else i.name) for i in inputs]
        outs = self.ctx.emit(op, names, n_outputs, **attrs)
        tensors = [self.tensor(o, dtype, rank) for o in outs]
        return tensors[0] if n_outputs == 1 else tensors

    def _unary(self, op: str, x: OnnxTensor, **attrs: Any) -> OnnxTensor:
        return self.op(op, [x], dtype=x.dtype, rank=x.rank, **attrs)

    def _as(self, like: OnnxTensor, value: Any) -> OnnxTensor:
        return value if isinstance(value, OnnxTensor) else self.const(value, like.dtype)

    def ints(self, values: Sequence[int]) -> OnnxTensor:
        return self.const(np.asarray(values, np.int64), "int64")

    # -- Backend protocol --------------------------------------------------------------
    def asarray(self, value: np.ndarray, name: str | None = None) -> OnnxTensor:
        array = np.asarray(value)
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        return self.tensor(self.ctx.initializer(array, name), str(array.dtype), array.ndim)

    def cast(self, x: OnnxTensor, dtype: str) -> OnnxTensor:
        return self.op("Cast", [x], dtype=dtype, rank=x.rank, to=_ONNX_TYPES[dtype])

    def sigmoid(self, x: OnnxTensor) -> OnnxTensor:
        """Split by sign around exp(-|x|), as the numpy backend does.

        onnxruntime's Sigmoid op returns 0 for x <= -20 and is 17% off at -15,
        where Keras is exact; fine inside a gate, not once silu's small values
        or a diverging state multiply the error. Exp is exact to float32.
        """
        e = self.exp(-self.abs(x))
        positive = 1.0 / (e + 1.0)
        return self.where(self._compare("GreaterOrEqual", x, 0.0), positive, e * positive)

    def tanh(self, x: OnnxTensor) -> OnnxTensor:
        return self._unary("Tanh", x)

    def exp(self, x: OnnxTensor) -> OnnxTensor:
        return self._unary("Exp", x)

    def log(self, x: OnnxTensor) -> OnnxTensor:
        return self._unary("Log", x)

    def erf(self, x: OnnxTensor) -> OnnxTensor:
        return self._unary("Erf", x)

    def abs(self, x: OnnxTensor) -> OnnxTensor:
        return self._unary("Abs", x)

    def sqrt(self, x: OnnxTensor) -> OnnxTensor:
        return self._unary("Sqrt", x)

    def softplus(self, x: OnnxTensor) -> OnnxTensor:
        return self._unary("Softplus", x)

    def maximum(self, x: OnnxTensor, y: Any) -> OnnxTensor:
        return self.op("Max", [x, self._as(x, y)], rank=x.rank)

    def minimum(self, x: OnnxTensor, y: Any) -> OnnxTensor:
        return self.op("Min", [x, self._as(x, y)], rank=x.rank)

    def clip(self, x: OnnxTensor, low: float, high: float) -> OnnxTensor:
        return self.op("Clip", [x, self.const(low), self.const(high)], rank=x.rank)

    def where(self, cond: OnnxTensor, x: Any, y: Any) -> OnnxTensor:
        like = x if isinstance(x, OnnxTensor) else y
        a, b = self._as(like, x), self._as(like, y)
        rank = max(r for r in (cond.rank, a.rank, b.rank, 0) if r is not None)
        return self.op("Where", [cond, a, b], dtype=like.dtype, rank=rank)

    def _compare(self, op: str, x: OnnxTensor, y: Any) -> OnnxTensor:
        return self.op(op, [x, self._as(x, y)], dtype="bool", rank=x.rank)

    def greater(self, x: OnnxTensor, y: Any) -> OnnxTensor:
        return self._compare("Greater", x, y)

    def less(self, x: OnnxTensor, y: Any) -> OnnxTensor:
        return self._compare("Less", x, y)

    def not_equal(self, x: OnnxTensor, y: Any) -> OnnxTensor:
        return self.op("Not", [self._compare("Equal", x, y)], dtype="bool", rank=x.rank)

    def logical_and(self, x: OnnxTensor, y: OnnxTensor) -> OnnxTensor:
        return self.op("And", [x, y], dtype="bool", rank=x.rank)

    def any(self, x: OnnxTensor, axis: int) -> OnnxTensor:
        counts = self.op(
            "ReduceMax",
            [self.cast(x, "int32"), self.ints([axis])],
            dtype="int32",
            rank=None if x.rank is None else x.rank - 1,
            keepdims=0,
        )
        return self.greater(counts, 0)

    def _reduce(self, op: str, x: OnnxTensor, axis: int | None, keepdims: bool) -> OnnxTensor:
        inputs: list[Any] = [x] if axis is None else [x, self.ints([axis])]
        if axis is None or not keepdims:
            rank = 0 if axis is None else (None if x.rank is None else x.rank - 1)
        else:
            rank = x.rank
        return self.op(op, inputs, dtype=x.dtype, rank=rank, keepdims=int(keepdims))

    def max(self, x: OnnxTensor, axis: int, keepdims: bool = True) -> OnnxTensor:
        return self._reduce("ReduceMax", x, axis, keepdims)

    def sum(self, x: OnnxTensor, axis: int | None, keepdims: bool = True) -> OnnxTensor:
        return self._reduce("ReduceSum", x, axis, keepdims)

    def last_dim(self, x: OnnxTensor) -> OnnxTensor:
        """Size of the last axis as an int64 tensor of shape (1,)."""
        return self.op("Shape", [x], dtype="int64", rank=1, start=-1)

    def sort_descending(self, x: OnnxTensor) -> OnnxTensor:
        values, _ = self.op(
            "TopK", [x, self.last_dim(x)], rank=x.rank, n_outputs=2, axis=-1, largest=1, sorted=1
        )
        return values

    def cumsum(self, x: OnnxTensor) -> OnnxTensor:
        return self.op("CumSum", [x, self.const(-1, "int64")], rank=x.rank)

    def positions(self, x: OnnxTensor) -> OnnxTensor:
        size = self.op("Squeeze", [self.last_dim(x), self.ints([0])], dtype="int64", rank=0)
        one = self.const(1, "int64")
        count = self.op(
            "Range",
            [one, self.op("Add", [size, one], dtype="int64", rank=0), one],
            dtype="int64",
            rank=1,
        )
        return self.cast(count, "float32")

    def concat(self, xs: Sequence[OnnxTensor], axis: int) -> OnnxTensor:
        return self.op("Concat", list(xs), dtype=xs[0].dtype, rank=xs[0].rank, axis=axis)

    def stack(self, xs: Sequence[OnnxTensor], axis: int) -> OnnxTensor:
        expanded = [self.expand_dims(x, axis) for x in xs]
        return self.concat(expanded, axis)

    def flip(self, x: OnnxTensor, axis: int) -> OnnxTensor:
        return self.op(
            "Slice",
            [x, self.ints([-1]), self.ints([_INT64_MIN]), self.ints([axis]), self.ints([-1])],
            dtype=x.dtype,
            rank=x.rank,
        )

    def take(self, table: OnnxTensor, ids: OnnxTensor) -> OnnxTensor:
        rank = None if ids.rank is None else ids.rank + 1
        return self.op(
            "Gather", [table, self.cast(ids, "int64")], dtype=table.dtype, rank=rank, axis=0
        )

    def expand_dims(self, x: OnnxTensor, axis: int) -> OnnxTensor:
        rank = None if x.rank is None else x.rank + 1
        return self.op("Unsqueeze", [x, self.ints([axis])], dtype=x.dtype, rank=rank)

    def squeeze(self, x: OnnxTensor, axis: int) -> OnnxTensor:
        rank = None if x.rank is None else x.rank - 1
        return self.op("Squeeze", [x, self.ints([axis])], dtype=x.dtype, rank=rank)

    def transpose(self, x: OnnxTensor, perm: Sequence[int]) -> OnnxTensor:
        return self.op("Transpose", [x], dtype=x.dtype, rank=len(perm), perm=list(perm))

    def swap_batch_time(self, x: OnnxTensor) -> OnnxTensor:
        if x.rank is None:
            raise TypeError(f"swap_batch_time needs a known rank: {x!r}")
        return self.transpose(x, [1, 0, *range(2, x.rank)])

    def zeros_state(self, like: OnnxTensor, units: int) -> OnnxTensor:
        batch = self.op("Shape", [like], dtype="int64", rank=1, start=0, end=1)
        shape = self.concat([batch, self.ints([units])], axis=0)
        return self.op(
            "ConstantOfShape",
            [shape],
            rank=2,
            value=numpy_helper.from_array(np.zeros(1, np.float32)),
        )

    def zeros_like(self, like: OnnxTensor) -> OnnxTensor:
        shape = self.op("Shape", [like], dtype="int64", rank=1)
        return self.op(
            "ConstantOfShape",
            [shape],
            rank=like.rank,
            value=numpy_helper.from_array(np.zeros(1, np.float32)),
        )

    def time_step(self, x: OnnxTensor, t: int) -> OnnxTensor:
        rank = None if x.rank is None else x.rank - 1
        return self.op("Gather", [x, self.const(t, "int64")], dtype=x.dtype, rank=rank, axis=1)

    def num_timesteps(self, x: OnnxTensor) -> int | None:
        del x
        return self.timesteps

    # -- loops -------------------------------------------------------------------------
    def rnn(
        self,
        step: StepFunction,
        inputs: OnnxTensor,
        initial_states: list[OnnxTensor],
        mask: OnnxTensor | None,
        *,
        go_backwards: bool,
        zero_output_for_mask: bool,
        return_sequences: bool,
        unroll: bool,
    ) -> tuple[OnnxTensor, OnnxTensor | None, list[OnnxTensor]]:
        """A Scan over axis 1, or the Python loop traced step by step when unrolling."""
        if unroll:
            return super().rnn(
                step,
                inputs,
                initial_states,
                mask,
                go_backwards=go_backwards,
                zero_output_for_mask=zero_output_for_mask,
                return_sequences=return_sequences,
                unroll=True,
            )
        return self._scan(
            step, inputs, initial_states, mask, go_backwards, zero_output_for_mask, return_sequences
        )

    def _scan(
        self,
        step: StepFunction,
        inputs: OnnxTensor,
        initial_states: list[OnnxTensor],
        mask: OnnxTensor | None,
        go_backwards: bool,
        zero_output_for_mask: bool,
        return_sequences: bool,
    ) -> tuple[OnnxTensor, OnnxTensor | None, list[OnnxTensor]]:
        ctx = self.ctx
        n_states = len(initial_states)
        # The last output is carried as one more loop state: it is Keras's
        # "previous output" for masked steps and the result when not returning sequences.
        carried_in = [ctx.fresh("h_in") for _ in range(n_states)] + [ctx.fresh("prev_out_in")]
        x_in = ctx.fresh("x_t")
        mask_in = ctx.fresh("mask_t") if mask is not None else None
        with ctx.subgraph() as body:
            states = [self.tensor(n, rank=2) for n in carried_in[:n_states]]
            prev_output = self.tensor(carried_in[-1], rank=2)
            output, new_states = step(
                self.tensor(x_in, rank=inputs.rank - 1 if inputs.rank else None), states
            )
            if mask_in is not None:
                keep = self.expand_dims(self.tensor(mask_in, "bool", 1), -1)
                output = self.where(keep, output, 0.0 if zero_output_for_mask else prev_output)
                new_states = [
                    self.where(keep, n, s) for n, s in zip(new_states, states, strict=True)
                ]
            outs = self.own_all([*new_states, output])
            # A name can be returned once only: the sequence output needs its own copy.
            scan_outputs = [self._identity(output)] if return_sequences else []
            graph_inputs = [value_info(n, "float32", 2) for n in carried_in]
            graph_inputs.append(
                value_info(x_in, "float32", None if inputs.rank is None else inputs.rank - 1)
            )
            if mask_in is not None:
                graph_inputs.append(value_info(mask_in, "bool", 1))
            graph_outputs = [value_info(t.name, "float32", 2) for t in outs + scan_outputs]
            graph = ctx.make_subgraph(body, "gru_step", graph_inputs, graph_outputs)
        initial_output = self.zeros_like(initial_states[-1])
        scan_inputs = [inputs] + ([mask] if mask is not None else [])
        n_scan = len(scan_inputs)
        # Any-valued: unpacked beside op()'s dtype/rank/n_outputs, which list[int] would not fit.
        output_axes: dict[str, Any] = {"scan_output_axes": [1]} if return_sequences else {}
        results = self.op(
            "Scan",
            [*initial_states, initial_output, *scan_inputs],
            rank=2,
            n_outputs=n_states + 1 + len(scan_outputs),
            body=graph,
            num_scan_inputs=n_scan,
            scan_input_axes=[1] * n_scan,
            scan_input_directions=[1 if go_backwards else 0] * n_scan,
            **output_axes,
        )
        final_states = results[:n_states]
        last_output = results[n_states]
        sequence = None
        if return_sequences:
            sequence = results[n_states + 1]
            sequence.rank = 3
        return last_output, sequence, final_states

    def own_all(self, xs: Sequence[OnnxTensor]) -> list[OnnxTensor]:
        """Subgraph outputs: each computed here and each name returned once."""
        seen: set[str] = set()
        result = []
        for x in xs:
            y = x if x.name not in seen and self.ctx.produced_here(x.name) else self._identity(x)
            seen.add(y.name)
            result.append(y)
        return result

    def _identity(self, x: OnnxTensor) -> OnnxTensor:
        """A fresh name for a subgraph output (outputs may not alias inputs)."""
        return self.op("Identity", [x], dtype=x.dtype, rank=x.rank)
