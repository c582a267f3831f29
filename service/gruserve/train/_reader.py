"""Reading one section of a training config, with messages that name the field.

Every value is read through a :class:`Section`, which knows its dotted path
(``training.early_stopping``) so an error says exactly which key to change,
and which keys were used, so a misspelt key is rejected instead of silently
ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from gruserve.errors import ConfigError

_MISSING = object()


class Section:
    """One mapping of the config; ``path`` is its dotted location."""

    def __init__(self, path: str, data: Any) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(path, f"expected a mapping, got {type(data).__name__} {data!r}")
        self.path = path
        self.data = dict(data)
        self.used: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.where(key), message)

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        self.used.add(key)
        if key not in self.data or (self.data[key] is None and default is not _MISSING):
            if default is _MISSING:
                raise self.error(key, "is required")
            return default
        return self.data[key]

    def section(self, key: str, required: bool = False) -> Section:
        if required and key not in self.data:
            raise self.error(key, "is required")
        return Section(self.where(key), self.raw(key, None))

    def string(self, key: str, default: Any = _MISSING) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str) or not value:
            raise self.error(key, f"expected a non-empty string, got {value!r}")
        return value

    def optional_string(self, key: str) -> str | None:
        return None if self.raw(key, None) is None else self.string(key)

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {value!r}")
        return value

    def integer(self, key: str, default: Any = _MISSING, *, minimum: int | None = None) -> int:
        value = self.raw(key, default)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(key, f"expected an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be >= {minimum}, got {value}")
        return value

    def optional_integer(self, key: str, *, minimum: int | None = None) -> int | None:
        return None if self.raw(key, None) is None else self.integer(key, minimum=minimum)

    def number(
        self,
        key: str,
        default: Any = _MISSING,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
        exclusive_minimum: bool = False,
    ) -> float:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"expected a number, got {value!r}")
        value = float(value)
        if minimum is not None and (value < minimum or (exclusive_minimum and value == minimum)):
            relation = ">" if exclusive_minimum else ">="
            raise self.error(key, f"must be {relation} {minimum:g}, got {value:g}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"must be <= {maximum:g}, got {value:g}")
        return value

    def optional_number(self, key: str, **limits: Any) -> float | None:
        return None if self.raw(key, None) is None else self.number(key, **limits)

    def choice(self, key: str, default: Any, allowed: Iterable[Any]) -> Any:
        allowed = list(allowed)
        value = self.raw(key, default)
        if value not in allowed:
            raise self.error(
                key, f"unknown value {value!r}; known: {', '.join(str(a) for a in allowed)}"
            )
        return value

    def strings(self, key: str, default: Any = _MISSING) -> list[str]:
        value = self.raw(key, default)
        if isinstance(value, str):
            value = [value]
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, str) and v for v in value)
        ):
            raise self.error(key, f"expected a non-empty list of names, got {value!r}")
        if len(set(value)) != len(value):
            raise self.error(key, f"lists a name twice: {value!r}")
        return list(value)

    def finish(self) -> None:
        """Reject keys nobody read: a silently ignored option trains the wrong model."""
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(
                self.path or "config",
                f"unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(self.used))}",
            )
