"""Settings read from the environment, with messages a person can act on.

Left to pydantic, a bad value (``GRUSERVE_SESSION_TTL_S=abc``) escapes as a
multi-line ``ValidationError`` and a traceback, and a misspelt variable
(``GRUSERVE_SESION_TTL_S``) is silently ignored: the settings must ignore
unknown variables, since the environment is shared with every other program.
This module turns the first into one line per bad variable that names what the
setting accepts (:class:`~gruserve.errors.SettingsError`), and finds the second
with the closest known name (:func:`unknown_variables`).

>>> unknown_variables({"GRUSERVE_SESION_TTL_S": "60"}, env_file=None)
['GRUSERVE_SESION_TTL_S is not a gruserve setting (ignored); did you mean GRUSERVE_SESSION_TTL_S?']
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import SettingsError as SourceError

from gruserve.errors import SettingsError
from gruserve.settings import ENV_PREFIX, Settings

# Read by docker-compose.yml when it starts the replicas, never by the server; a shell that
# sets them for compose may well start `gruserve serve` too.
KNOWN_ELSEWHERE = frozenset({"GRUSERVE_REPLICAS", "GRUSERVE_GPU_REPLICAS"})
_SOURCE_FIELD = re.compile(r'field "(\w+)"')


def variable(field: str) -> str:
    """A setting's environment variable: ``session_ttl_s`` -> ``GRUSERVE_SESSION_TTL_S``."""
    return f"{ENV_PREFIX}{field}".upper()


def known_variables() -> list[str]:
    return [variable(name) for name in Settings.model_fields]


def unknown_variables(
    environ: Mapping[str, str], env_file: Path | None = Path(".env")
) -> list[str]:
    """One warning for each ``GRUSERVE_*`` name in ``environ`` or ``env_file`` that no
    setting reads, naming the closest known variable when one is close (difflib).

    Args:
        environ: the process environment (``os.environ``).
        env_file: the ``.env`` file the settings also read; None or a missing file: none.
    """
    names = {name.upper() for name in environ}
    if env_file is not None and Path(env_file).is_file():
        from dotenv import dotenv_values  # pydantic-settings' own .env reader

        names |= {name.upper() for name in dotenv_values(env_file)}
    known = known_variables()
    warnings = []
    for name in sorted(names):
        if not name.startswith(ENV_PREFIX) or name in known or name in KNOWN_ELSEWHERE:
            continue
        # compared without the prefix, which every name shares
        close = difflib.get_close_matches(
            name.removeprefix(ENV_PREFIX), [k.removeprefix(ENV_PREFIX) for k in known], n=1
        )
        hint = (
            f"; did you mean {ENV_PREFIX}{close[0]}?" if close else f" (known: {', '.join(known)})"
        )
        warnings.append(f"{name} is not a gruserve setting (ignored){hint}")
    return warnings


def load_settings(**overrides: Any) -> Settings:
    """:class:`Settings` from the environment, ``.env`` and ``overrides`` (which win).

    Raises:
        SettingsError: a value is not accepted; the message names every bad variable
            and what it accepts, one line each.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = [_explain(error, overrides) for error in exc.errors(include_url=False)]
    except SourceError as exc:  # a JSON value (model_versions) that does not parse
        found = _SOURCE_FIELD.search(str(exc))
        field = found.group(1) if found else "?"
        lines = [
            f"{variable(field)} is not accepted (not valid JSON: {exc.__cause__}); "
            f"it accepts {accepts(field)}"
        ]
    raise SettingsError(lines)


def _explain(error: Any, overrides: Mapping[str, Any]) -> str:
    loc = error.get("loc") or ()
    reason = str(error["msg"]).removeprefix("Value error, ")
    reason = reason[:1].lower() + reason[1:]
    if not loc or loc[0] not in Settings.model_fields:
        return reason
    field = str(loc[0])
    name = f"{field}=" if field in overrides else f"{variable(field)}="
    secret = _is_secret(Settings.model_fields[field])
    shown = "(value not shown)" if secret else repr(error.get("input"))
    return f"{name}{shown} is not accepted ({reason}); it accepts {accepts(field)}"


def _is_secret(info: FieldInfo) -> bool:
    return SecretStr in (info.annotation, *typing.get_args(info.annotation))


def accepts(field: str) -> str:
    """What a setting accepts, in words: ``a number > 0``, ``one of 'auto', 'cpu', 'cuda'``."""
    info = Settings.model_fields[field]
    annotation = info.annotation
    args = typing.get_args(annotation)
    optional = type(None) in args
    if optional:
        annotation = next(a for a in args if a is not type(None))
    if typing.get_origin(annotation) is Literal:
        words = "one of " + ", ".join(repr(v) for v in typing.get_args(annotation))
    elif annotation is bool:
        words = "true or false (or 1/0, yes/no, on/off)"
    elif annotation in (int, float):
        words = "an integer" if annotation is int else "a number"
        bounds = []
        for item in info.metadata:
            for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
                limit = getattr(item, attr, None)
                if isinstance(item, annotated_types.BaseMetadata) and limit is not None:
                    bounds.append(f"{sign} {limit}")
        if bounds:
            words += " " + " and ".join(bounds)
    elif typing.get_origin(annotation) is dict:
        words = 'a JSON object of model names to version numbers, e.g. {"demo": 1}'
    elif field == "session_store":
        words = (
            "'memory' or a redis://, rediss:// or unix:// URL, or "
            "redis+cluster://host:port[,host:port...]"
        )
    elif annotation is Path:
        words = "a path"
    else:
        words = "text"
    return words + (" (unset: none)" if optional else "")
