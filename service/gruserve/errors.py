"""The exceptions gruserve raises on purpose.

Every error a person can act on derives from :class:`GruServeError`. The core
never knows about HTTP: ``api/errors.py`` maps these classes to status codes,
and the CLI prints their message and exits non-zero. Built-in ``ValueError`` or
``TypeError`` escaping the core is a bug and must surface as one.
"""

from __future__ import annotations

from collections.abc import Iterable


class GruServeError(Exception):
    """Base class: the message alone must tell the reader what to change."""


class ConfigError(GruServeError, ValueError):
    """A layer, model or training configuration is invalid.

    Subclasses ``ValueError`` too so that code written against Keras, which
    raises ``ValueError`` for bad layer arguments, keeps working.
    """

    def __init__(self, where: str, message: str) -> None:
        self.where = where
        super().__init__(f"{where}: {message}")


class InvalidArgument(ConfigError):
    """One argument has a value outside what Keras accepts."""

    def __init__(
        self,
        where: str,
        argument: str,
        received: object,
        allowed: Iterable[object] | str,
    ) -> None:
        self.argument = argument
        if isinstance(allowed, str):
            expected = allowed
        else:
            expected = "one of " + ", ".join(repr(a) for a in allowed)
        super().__init__(
            where,
            f"invalid value for argument `{argument}`: expected {expected}. "
            f"Received: {argument}={received!r}",
        )


class UnsupportedLayer(ConfigError):
    """A model contains a layer class gruserve cannot reproduce exactly."""

    def __init__(self, layer_name: str, class_name: str, supported: Iterable[str]) -> None:
        self.class_name = class_name
        super().__init__(
            f"layer {layer_name!r}",
            f"class {class_name!r} is not supported. Supported layers: "
            + ", ".join(sorted(supported)),
        )


class ModelFileError(GruServeError):
    """A Keras model file cannot be read (corrupt, truncated, missing weights)."""

    def __init__(self, path: object, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")


class WeightShapeError(ModelFileError):
    """A stored weight does not have the shape the layer's config implies."""


class ExportError(GruServeError):
    """Building or verifying the ONNX graph failed."""


class ParityError(ExportError):
    """The exported graph disagrees with the reference computation."""


class RepositoryError(GruServeError):
    """The model repository on disk is missing, malformed or tampered with."""


class ManifestVersionError(RepositoryError):
    """A manifest written by a newer (or unknown) gruserve."""


class MissingDependency(GruServeError):
    """An optional extra is needed for this command."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the {package!r} package: pip install 'gruserve[{extra}]'"
        )
