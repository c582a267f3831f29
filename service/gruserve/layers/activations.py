"""Every Keras 3 activation, written once for all backends.

Each :class:`Activation` carries the math (a function of an array and a
:class:`~gruserve.layers.backend.Backend`) and, when one exists, the exact
equivalent in the ONNX GRU operator's ``activations`` attribute, marked
``native_exact`` where onnxruntime's kernel is as exact as the float32 loop
from small to extreme inputs (``tests/export/test_native_kernels.py``
measures it); only those are exported natively unless a user forces it. The formulas
follow ``keras/src/backend/*/nn.py``; where Keras's behaviour is surprising
(sparsemax, Keras 2's hard_sigmoid) the docstring says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gruserve.errors import InvalidArgument
from gruserve.layers.backend import Array, Backend

_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946
_INV_SQRT2 = 1.0 / math.sqrt(2.0)


@dataclass(frozen=True)
class OnnxGruActivation:
    """How an activation is spelled in the ONNX GRU ``activations`` attribute."""

    op: str
    alpha: float | None = None
    beta: float | None = None


@dataclass(frozen=True)
class Activation:
    """One activation: its Keras name, math, and native ONNX GRU spelling."""

    name: str
    fn: Callable[[Array, Backend], Array]
    onnx_gru: OnnxGruActivation | None = None
    native_exact: bool = True
    """Whether onnxruntime's GRU kernel computes ``onnx_gru`` as exactly as the loop."""

    @property
    def bounded(self) -> bool:
        """Whether the output stays within [-1, 1]: a gate that cannot run away.

        onnxruntime's GRU kernel loses Keras's result by orders of magnitude
        once an unbounded gate (relu, linear, elu...) grows past 1 and the
        state diverges, so only bounded gates are exported natively.
        """
        return self.name in _BOUNDED

    def __call__(self, x: Array, backend: Backend) -> Array:
        return self.fn(x, backend)


_BOUNDED = {"sigmoid", "hard_sigmoid", "sparse_sigmoid", "tanh", "softsign", "hard_tanh"}


def _hard_sigmoid(x: Array, b: Backend) -> Array:
    return b.clip(x * (1.0 / 6.0) + 0.5, 0.0, 1.0)


def _hard_sigmoid_keras2(x: Array, b: Backend) -> Array:
    return b.clip(x * 0.2 + 0.5, 0.0, 1.0)


def _elu(x: Array, b: Backend) -> Array:
    return b.where(b.greater(x, 0.0), x, b.exp(b.minimum(x, 0.0)) - 1.0)


def _softmax(x: Array, b: Backend) -> Array:
    e = b.exp(x - b.max(x, axis=-1))
    return e / b.sum(e, axis=-1)


def _log_softmax(x: Array, b: Backend) -> Array:
    shifted = x - b.max(x, axis=-1)
    return shifted - b.log(b.sum(b.exp(shifted), axis=-1))


def _sparsemax(x: Array, b: Backend) -> Array:
    """Keras's sparsemax, bug for bug.

    Every Keras backend computes the threshold as (sum of the cumulative sums
    inside the support - 1) / k, not the textbook (cumsum[k] - 1) / k. A model
    trained in Keras learned against Keras's formula, so that is what we
    reproduce.
    """
    ordered = b.sort_descending(x)
    running = b.cumsum(ordered)
    support = b.greater(ordered - (running - 1.0) / b.positions(x), 0.0)
    k = b.sum(b.cast(support, "float32"), axis=-1)
    tau = (b.sum(b.where(support, running, 0.0), axis=-1) - 1.0) / k
    return b.maximum(x - tau, 0.0)


def _build_registry() -> dict[str, Activation]:
    def a(
        name: str,
        fn: Callable[[Array, Backend], Array],
        onnx: OnnxGruActivation | None = None,
    ) -> Activation:
        return Activation(name, fn, onnx)

    entries = [
        a("linear", lambda x, b: x, OnnxGruActivation("Affine", 1.0, 0.0)),
        a("sigmoid", lambda x, b: b.sigmoid(x), OnnxGruActivation("Sigmoid")),
        a("tanh", lambda x, b: b.tanh(x), OnnxGruActivation("Tanh")),
        a("relu", lambda x, b: b.maximum(x, 0.0), OnnxGruActivation("Relu")),
        a("softsign", lambda x, b: x / (b.abs(x) + 1.0), OnnxGruActivation("Softsign")),
        # onnxruntime's GRU kernel computes log(1 + exp(x)), inf past x ~ 88 where Keras is
        # finite: only a forced native export uses it; the loop's Softplus op is stable.
        Activation("softplus", lambda x, b: b.softplus(x), OnnxGruActivation("Softplus"), False),
        a("hard_sigmoid", _hard_sigmoid, OnnxGruActivation("HardSigmoid", 1.0 / 6.0, 0.5)),
        a(
            "sparse_sigmoid",
            lambda x, b: b.clip(x * 0.5 + 0.5, 0.0, 1.0),
            OnnxGruActivation("HardSigmoid", 0.5, 0.5),
        ),
        a("elu", _elu, OnnxGruActivation("Elu", 1.0)),
        a(
            "leaky_relu",
            lambda x, b: b.where(b.greater(x, 0.0), x, x * 0.2),
            OnnxGruActivation("LeakyRelu", 0.2),
        ),
        a("exponential", lambda x, b: b.exp(x)),
        a("gelu", lambda x, b: x * 0.5 * (b.erf(x * _INV_SQRT2) + 1.0)),
        a("silu", lambda x, b: x * b.sigmoid(x)),
        a(
            "selu",
            lambda x, b: b.where(
                b.greater(x, 0.0),
                x * _SELU_SCALE,
                (b.exp(b.minimum(x, 0.0)) - 1.0) * (_SELU_ALPHA * _SELU_SCALE),
            ),
        ),
        a("celu", lambda x, b: b.maximum(x, 0.0) + b.minimum(b.exp(b.minimum(x, 0.0)) - 1.0, 0.0)),
        a("relu6", lambda x, b: b.clip(x, 0.0, 6.0)),
        a("hard_tanh", lambda x, b: b.clip(x, -1.0, 1.0)),
        a("hard_silu", lambda x, b: x * _hard_sigmoid(x, b)),
        a("mish", lambda x, b: x * b.tanh(b.softplus(x))),
        a("log_sigmoid", lambda x, b: -b.softplus(-x)),
        a("tanh_shrink", lambda x, b: x - b.tanh(x)),
        a("hard_shrink", lambda x, b: b.where(b.greater(b.abs(x), 0.5), x, 0.0)),
        a(
            "soft_shrink",
            lambda x, b: b.where(
                b.greater(x, 0.5), x - 0.5, b.where(b.less(x, -0.5), x + 0.5, 0.0)
            ),
        ),
        a(
            "sparse_plus",
            lambda x, b: b.where(
                b.greater(x, -1.0),
                b.where(b.less(x, 1.0), (x + 1.0) * (x + 1.0) * 0.25, x),
                0.0,
            ),
        ),
        a("squareplus", lambda x, b: (x + b.sqrt(x * x + 4.0)) * 0.5),
        a("softmax", _softmax),
        a("log_softmax", _log_softmax),
        a("sparsemax", _sparsemax),
    ]
    return {e.name: e for e in entries}


ACTIVATIONS: dict[str, Activation] = _build_registry()
ALIASES = {"swish": "silu", "hard_swish": "hard_silu"}
# Keras 2 (tf-keras) spelled hard_sigmoid as 0.2 * x + 0.5.
KERAS2_HARD_SIGMOID = Activation(
    "hard_sigmoid", _hard_sigmoid_keras2, OnnxGruActivation("HardSigmoid", 0.2, 0.5)
)
# Names Keras knows that no GRU or Dense of gruserve can use, and why.
_UNUSABLE = {
    "threshold": "it needs `threshold` and `default_value` arguments, so it cannot be named alone",
    "glu": "it halves the last axis, which a GRU state cannot take (Keras fails too)",
}


def known_activation_names() -> list[str]:
    """Every name :func:`get_activation` accepts, aliases included."""
    return sorted([*ACTIVATIONS, *ALIASES])


def activation_name(identifier: Any) -> str:
    """Normalise a Keras activation identifier (None, str or serialized dict)."""
    if identifier is None:
        return "linear"
    if isinstance(identifier, dict):
        # Keras 3 may write {"module": ..., "class_name": "function", "config": "tanh"}.
        config = identifier.get("config")
        if isinstance(config, str):
            return config
        if isinstance(config, dict) and isinstance(config.get("name"), str):
            return str(config["name"])
    if isinstance(identifier, str):
        return identifier
    return repr(identifier)


def get_activation(
    identifier: Any,
    *,
    keras_version: int = 3,
    where: str = "activation",
    argument: str = "activation",
) -> Activation:
    """Resolve a Keras activation identifier to an :class:`Activation`.

    Raises:
        InvalidArgument: unknown name (the message lists the known ones), or a
            Keras name that cannot work here (threshold, glu).
    """
    name = activation_name(identifier)
    name = ALIASES.get(name, name)
    if name in _UNUSABLE:
        raise InvalidArgument(
            where,
            argument,
            identifier,
            f"another activation: {name!r} is unusable, {_UNUSABLE[name]}",
        )
    if name == "hard_sigmoid" and keras_version == 2:
        return KERAS2_HARD_SIGMOID
    activation = ACTIVATIONS.get(name)
    if activation is None:
        raise InvalidArgument(where, argument, identifier, known_activation_names())
    return activation
