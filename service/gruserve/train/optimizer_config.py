"""Reading an optimizer from a training config: Keras's names, arguments and checks.

``"adam"`` or ``{"class_name": "Adam", "config": {...}}`` (what
``keras.optimizers.serialize`` writes, so a pasted ``get_config()`` works).
Every argument takes Keras's default; options gruserve does not implement
are accepted only at their default value, so a config relying on them fails
before training instead of training something else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gruserve.errors import ConfigError
from gruserve.train.optimizers import OPTIMIZERS, KerasOptimizer, Params

# Keys of Keras's ``optimizer.get_config()`` every optimizer shares, with the values we honour.
_BASE_DEFAULTS: dict[str, Any] = {
    "weight_decay": None,
    "clipnorm": None,
    "clipvalue": None,
    "global_clipnorm": None,
}
# Keras options gruserve does not implement: accepted only at their default, so a pasted
# ``get_config()`` works but a config that relies on them fails loudly.
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "use_ema": False,
    "ema_overwrite_frequency": None,
    "loss_scale_factor": None,
    "gradient_accumulation_steps": None,
}
_IGNORED = {"name", "ema_momentum", "jit_compile", "is_legacy_optimizer"}


@dataclass(frozen=True)
class OptimizerSpec:
    """A validated optimizer choice; :meth:`build` attaches it to parameters."""

    cls: type[KerasOptimizer]
    arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.cls.keras_name

    def build(self, params: Params) -> KerasOptimizer:
        return self.cls(params, **self.arguments)

    def to_config(self) -> dict[str, Any]:
        return {"class_name": self.cls.keras_name, "config": dict(self.arguments)}


def optimizer_spec(identifier: Any, where: str = "training.optimizer") -> OptimizerSpec:
    """Parse ``"adam"`` or Keras's ``{"class_name": "Adam", "config": {...}}``.

    Raises:
        ConfigError: unknown optimizer, unknown argument or a value Keras rejects.
    """
    config: Any
    if isinstance(identifier, str):
        name, config = identifier, {}
    elif isinstance(identifier, dict) and "class_name" in identifier:
        name, config = identifier["class_name"], identifier.get("config") or {}
        extra = sorted(set(identifier) - {"class_name", "config", "module", "registered_name"})
        if extra:
            raise ConfigError(where, f"unknown key(s) {extra}; use class_name and config")
    else:
        raise ConfigError(
            where, f"expected a name such as 'adam' or {{class_name, config}}, got {identifier!r}"
        )
    cls = OPTIMIZERS.get(str(name).lower())
    if cls is None:
        raise ConfigError(
            where, f"unknown optimizer {name!r}; known: {', '.join(sorted(OPTIMIZERS))}"
        )
    if not isinstance(config, dict):
        raise ConfigError(f"{where}.config", f"expected a mapping, got {config!r}")
    return OptimizerSpec(cls, _arguments(cls, config, where))


def _arguments(cls: type[KerasOptimizer], config: dict[str, Any], where: str) -> dict[str, Any]:
    known = {**_BASE_DEFAULTS, **cls.defaults_keras}
    arguments = dict(known)
    for key, value in config.items():
        at = f"{where}.{key}"
        if key in _IGNORED:
            continue
        if key in _UNSUPPORTED_DEFAULTS:
            if value != _UNSUPPORTED_DEFAULTS[key]:
                raise ConfigError(at, f"{value!r} is not supported by gruserve train")
            continue
        if key not in known:
            raise ConfigError(
                where, f"unknown argument {key!r} for {cls.keras_name}; known: {', '.join(known)}"
            )
        if isinstance(known[key], bool):
            if not isinstance(value, bool):
                raise ConfigError(at, f"expected true or false, got {value!r}")
        elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            if key == "learning_rate" and isinstance(value, dict):
                raise ConfigError(at, "learning-rate schedules are not supported; give a number")
            raise ConfigError(at, f"expected a number, got {value!r}")
        arguments[key] = value
    _check(cls, arguments, where)
    return arguments


def _check(cls: type[KerasOptimizer], a: dict[str, Any], where: str) -> None:
    """The same range checks Keras makes in its constructors."""
    if a["learning_rate"] is None or not a["learning_rate"] > 0:
        raise ConfigError(f"{where}.learning_rate", f"must be > 0, got {a['learning_rate']!r}")
    clips = [k for k in ("clipnorm", "clipvalue", "global_clipnorm") if a[k] is not None]
    if len(clips) > 1:
        raise ConfigError(where, f"only one of clipnorm, clipvalue, global_clipnorm; got {clips}")
    for key in clips:
        if a[key] <= 0:
            raise ConfigError(f"{where}.{key}", f"must be > 0, got {a[key]!r}")
    if a["weight_decay"] is not None and a["weight_decay"] < 0:
        raise ConfigError(f"{where}.weight_decay", f"must be >= 0, got {a['weight_decay']!r}")
    for key in ("momentum", "rho", "beta_1", "beta_2"):
        if key in a and not 0.0 <= a[key] <= 1.0:
            raise ConfigError(f"{where}.{key}", f"must be a float between [0, 1], got {a[key]!r}")
    for key in ("epsilon", "initial_accumulator_value"):
        if key in a and (a[key] is None or a[key] < 0 or math.isnan(a[key])):
            raise ConfigError(f"{where}.{key}", f"must be >= 0, got {a[key]!r}")
