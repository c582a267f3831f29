"""Keras's optimizers, step for step, as ``torch.optim.Optimizer`` subclasses.

``torch.optim`` differs from Keras in details that change the weights: Adam
adds epsilon to ``sqrt(v_hat)`` where Keras adds it to ``sqrt(v)`` and folds
the bias correction into the learning rate; torch's SGD momentum buffer holds
gradients where Keras's holds ``-lr * gradient`` steps. The formulas here are
those of Keras 3's torch backend (``keras/src/backend/torch/optimizers``),
computed in float32 like Keras's variables, and every step does what
``BaseOptimizer.apply`` does: clip the gradients, apply decoupled weight decay,
update, count the iteration. Constraints are the model's business and are
applied by the training step right after :meth:`KerasOptimizer.step`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
import torch

Params = Iterable[torch.nn.Parameter]


def _f32(value: float) -> float:
    """The value Keras actually uses: its hyper-parameters live in float32 variables."""
    return float(np.float32(value))


class KerasOptimizer(torch.optim.Optimizer):
    """Base class: gradient clipping, weight decay and the iteration counter.

    Args:
        params: the parameters to train.
        learning_rate: step size (float32, as Keras stores it).
        weight_decay: decoupled decay ``w -= w * weight_decay * lr`` before
            each update (Keras's ``weight_decay``), or None.
        clipnorm / clipvalue / global_clipnorm: Keras's gradient clipping;
            at most one may be set.
    """

    keras_name: ClassVar[str] = ""
    defaults_keras: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        params: Params,
        learning_rate: float,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        **hyper: Any,
    ) -> None:
        super().__init__(list(params), {"lr": _f32(learning_rate)})
        self.weight_decay = weight_decay
        self.clipnorm = clipnorm
        self.clipvalue = clipvalue
        self.global_clipnorm = global_clipnorm
        self.hyper = hyper
        self.iterations = 0

    @property
    def learning_rate(self) -> float:
        return float(self.param_groups[0]["lr"])

    @learning_rate.setter
    def learning_rate(self, value: float) -> None:
        for group in self.param_groups:
            group["lr"] = _f32(value)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        """One Keras ``optimizer.apply(grads)``: clip, decay, update, count."""
        if closure is not None:
            raise TypeError("Keras optimizers take no closure")
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return
        grads = self._clip([p.grad.detach() for p in params])
        lr = self.learning_rate
        if self.weight_decay:
            for p in params:
                p.mul_(1.0 - _f32(self.weight_decay) * lr)
        self.update(params, grads, lr)
        self.iterations += 1

    def update(self, params: list[torch.Tensor], grads: list[torch.Tensor], lr: float) -> None:
        raise NotImplementedError

    def _clip(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.clipnorm:
            clipped = []
            for g in grads:
                norm = torch.sqrt(torch.sum(g * g))
                clipped.append(g * self.clipnorm / torch.clamp(norm, min=self.clipnorm))
            return clipped
        if self.global_clipnorm:
            norm = torch.sqrt(sum(torch.sum(g * g) for g in grads))  # type: ignore[arg-type]
            limit = torch.tensor(1.0 / self.global_clipnorm)
            scale = self.global_clipnorm * torch.minimum(1.0 / norm, limit)
            return [g * scale for g in grads]
        if self.clipvalue:
            return [torch.clamp(g, -self.clipvalue, self.clipvalue) for g in grads]
        return grads

    def _slot(self, p: torch.Tensor, name: str, fill: float = 0.0) -> torch.Tensor:
        state = self.state[p]
        if name not in state:
            state[name] = torch.full_like(p, fill)
        return state[name]  # type: ignore[no-any-return]

    def _power(self, base: float, offset: int = 1) -> torch.Tensor:
        """``base ** (iterations + offset)`` in float32, as Keras computes it."""
        return torch.pow(
            torch.tensor(base, dtype=torch.float32),
            torch.tensor(float(self.iterations + offset), dtype=torch.float32),
        )


class SGD(KerasOptimizer):
    """``keras.optimizers.SGD``: the momentum buffer holds ``momentum * m - lr * g``."""

    keras_name = "SGD"
    defaults_keras = {"learning_rate": 0.01, "momentum": 0.0, "nesterov": False}

    def update(self, params, grads, lr):  # type: ignore[no-untyped-def]
        momentum = _f32(self.hyper["momentum"])
        for p, g in zip(params, grads, strict=True):
            if momentum == 0:
                p.add_(g, alpha=-lr)
                continue
            m = self._slot(p, "momentum")
            m.mul_(momentum).add_(g, alpha=-lr)
            if self.hyper["nesterov"]:
                p.add_(g, alpha=-lr).add_(m, alpha=momentum)
            else:
                p.add_(m)


class Adam(KerasOptimizer):
    """``keras.optimizers.Adam``: bias correction in the step size, epsilon on ``sqrt(v)``."""

    keras_name = "Adam"
    defaults_keras = {
        "learning_rate": 0.001,
        "beta_1": 0.9,
        "beta_2": 0.999,
        "epsilon": 1e-7,
        "amsgrad": False,
    }

    def update(self, params, grads, lr):  # type: ignore[no-untyped-def]
        b1, b2, eps = self.hyper["beta_1"], self.hyper["beta_2"], self.hyper["epsilon"]
        lr_t = torch.tensor(lr, dtype=torch.float32)
        alpha = lr_t * torch.sqrt(1 - self._power(b2)) / (1 - self._power(b1))
        for p, g in zip(params, grads, strict=True):
            m, v = self._slot(p, "momentum"), self._slot(p, "velocity")
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).add_(g * g, alpha=1 - b2)
            if self.hyper["amsgrad"]:
                v_hat = self._slot(p, "velocity_hat")
                torch.maximum(v_hat, v, out=v_hat)
                v = v_hat
            p.sub_((m * alpha) / (torch.sqrt(v) + eps))


class AdamW(Adam):
    """``keras.optimizers.AdamW``: Adam with decoupled weight decay 0.004 by default."""

    keras_name = "AdamW"
    defaults_keras = {**Adam.defaults_keras, "weight_decay": 0.004}


class RMSprop(KerasOptimizer):
    """``keras.optimizers.RMSprop``: epsilon inside the square root."""

    keras_name = "RMSprop"
    defaults_keras = {
        "learning_rate": 0.001,
        "rho": 0.9,
        "momentum": 0.0,
        "epsilon": 1e-7,
        "centered": False,
    }

    def update(self, params, grads, lr):  # type: ignore[no-untyped-def]
        rho, eps, momentum = self.hyper["rho"], self.hyper["epsilon"], self.hyper["momentum"]
        for p, g in zip(params, grads, strict=True):
            velocity = self._slot(p, "velocity")
            velocity.mul_(rho).add_(g * g, alpha=1 - rho)
            denominator = velocity + eps
            if self.hyper["centered"]:
                average = self._slot(p, "average_gradient")
                average.mul_(rho).add_(g, alpha=1 - rho)
                denominator = denominator - average * average
            increment = (g * lr) / torch.sqrt(denominator)
            if momentum > 0:
                m = self._slot(p, "momentum")
                m.mul_(momentum).add_(increment)
                p.sub_(m)
            else:
                p.sub_(increment)


class Adagrad(KerasOptimizer):
    """``keras.optimizers.Adagrad``: accumulators start at ``initial_accumulator_value``."""

    keras_name = "Adagrad"
    defaults_keras = {"learning_rate": 0.001, "initial_accumulator_value": 0.1, "epsilon": 1e-7}

    def update(self, params, grads, lr):  # type: ignore[no-untyped-def]
        initial, eps = self.hyper["initial_accumulator_value"], self.hyper["epsilon"]
        for p, g in zip(params, grads, strict=True):
            accumulator = self._slot(p, "accumulator", initial)
            accumulator.add_(g * g)
            p.sub_((g * lr) / torch.sqrt(accumulator + eps))


class Adamax(KerasOptimizer):
    """``keras.optimizers.Adamax``: the infinity-norm variant of Adam."""

    keras_name = "Adamax"
    defaults_keras = {"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}

    def update(self, params, grads, lr):  # type: ignore[no-untyped-def]
        b1, b2, eps = self.hyper["beta_1"], self.hyper["beta_2"], self.hyper["epsilon"]
        correction = 1 - self._power(b1)
        for p, g in zip(params, grads, strict=True):
            m, u = self._slot(p, "m"), self._slot(p, "u")
            m.mul_(b1).add_(g, alpha=1 - b1)
            torch.maximum(u * b2, torch.abs(g), out=u)
            p.sub_((m * lr) / ((u + eps) * correction))


class Nadam(KerasOptimizer):
    """``keras.optimizers.Nadam``: Nesterov Adam with Keras's 0.96 momentum schedule."""

    keras_name = "Nadam"
    defaults_keras = {"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}

    def __init__(self, params: Params, learning_rate: float, **kwargs: Any) -> None:
        super().__init__(params, learning_rate, **kwargs)
        self.u_product = torch.tensor(1.0, dtype=torch.float32)

    def update(self, params, grads, lr):  # type: ignore[no-untyped-def]
        b1, b2, eps = self.hyper["beta_1"], self.hyper["beta_2"], self.hyper["epsilon"]
        beta_1 = torch.tensor(b1, dtype=torch.float32)
        u_t = beta_1 * (1.0 - 0.5 * self._power(0.96, 1))
        u_t_1 = beta_1 * (1.0 - 0.5 * self._power(0.96, 2))
        u_product_t = self.u_product * u_t
        u_product_t_1 = u_product_t * u_t_1
        beta_2_power = self._power(b2)
        self.u_product = u_product_t
        for p, g in zip(params, grads, strict=True):
            m, v = self._slot(p, "momentum"), self._slot(p, "velocity")
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).add_(g * g, alpha=1 - b2)
            m_hat = (m * u_t_1) / (1 - u_product_t_1) + (g * (1 - u_t)) / (1 - u_product_t)
            v_hat = v / (1 - beta_2_power)
            p.sub_((m_hat * lr) / (torch.sqrt(v_hat) + eps))


OPTIMIZERS: dict[str, type[KerasOptimizer]] = {
    cls.keras_name.lower(): cls for cls in (SGD, Adam, AdamW, RMSprop, Adagrad, Adamax, Nadam)
}
