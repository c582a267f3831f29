"""The exceptions gruserve raises on purpose.

Every error a person can act on derives from :class:`GruServeError`. The core
never knows about HTTP: ``api/errors.py`` maps these classes to status codes,
and the CLI prints their message and exits non-zero. Built-in ``ValueError`` or
``TypeError`` escaping the core is a bug and must surface as one.
"""

from __future__ import annotations

from collections.abc import Iterable

from gruserve.sessions.owner import client_id


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


class SettingsError(GruServeError):
    """``GRUSERVE_*`` settings have values the server cannot accept.

    Args:
        problems: one line per bad variable, naming it and what it accepts.

    The CLI prints each line and exits with status 2 (a usage error, like a bad option).
    """

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


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


# -- serving -------------------------------------------------------------------------
# The core raises these; ``api/errors.py`` alone decides which HTTP status each one gets.


class ModelNotFound(GruServeError):
    """No model of that name (and version) is being served."""

    def __init__(
        self, name: str, version: int | None = None, available: Iterable[str] = ()
    ) -> None:
        self.name, self.version = name, version
        what = f"model {name!r}" + (f" version {version}" if version is not None else "")
        names = sorted(available)
        hint = f"; served models: {', '.join(names)}" if names else "; no models are loaded"
        super().__init__(f"{what} is not served{hint}")


class ModelUnavailable(GruServeError):
    """A model exists in the repository but failed to load."""

    def __init__(self, name: str, reason: str) -> None:
        self.name, self.reason = name, reason
        super().__init__(f"model {name!r} failed to load and is not served: {reason}")


class ModelVersionGone(GruServeError):
    """A session's model version was removed from the repository (HTTP 410)."""

    def __init__(
        self, session_id: str | None, name: str, version: int, on_disk: Iterable[int]
    ) -> None:
        session_id = None if session_id is None else client_id(session_id)
        self.session_id, self.name, self.version = session_id, name, version
        found = sorted(on_disk)
        whose = f"session {session_id!r} is on " if session_id else ""
        super().__init__(
            f"{whose}model {name!r} version {version}, which was removed from the model "
            f"repository; versions on disk: {found or 'none'}. Create a new session (on the "
            f'default version, or one named with "version")'
        )


class ProviderUnavailable(GruServeError):
    """The configured execution provider cannot run on this machine."""

    def __init__(self, provider: str, available: Iterable[str], hint: str) -> None:
        self.provider = provider
        super().__init__(
            f"execution provider {provider!r} is not available (onnxruntime offers "
            f"{', '.join(available)}); {hint}"
        )


class InvalidInput(GruServeError):
    """A request value is malformed; ``field`` names it (``inputs[2][1]`` style)."""

    def __init__(self, field: str, message: str) -> None:
        self.field, self.detail = field, message
        super().__init__(f"{field}: {message}")


class PayloadTooLarge(GruServeError):
    """A request exceeds a configured size limit (bytes or timesteps)."""

    def __init__(self, what: str, received: int, limit: int, setting: str) -> None:
        self.what, self.received, self.limit = what, received, limit
        super().__init__(
            f"{what} is {received}, above the limit of {limit} (server setting {setting}); "
            "split the request into smaller ones"
        )


class SessionNotFound(GruServeError):
    """The session id is unknown, was deleted, or expired after its idle TTL."""

    def __init__(self, session_id: str) -> None:
        session_id = client_id(session_id)  # the id the client sent, never a store key
        self.session_id = session_id
        super().__init__(
            f"session {session_id!r} does not exist (never created, deleted, or expired "
            "after its idle TTL); create it with POST /v1/models/{model}/sessions"
        )


class SequenceNotStarted(GruServeError):
    """A v2 request continues a sequence that is not active on that model."""

    def __init__(self, session_id: str, model: str) -> None:
        session_id = client_id(session_id)  # the id the client sent, never a store key
        self.session_id, self.model = session_id, model
        super().__init__(
            f"sequence session {session_id!r} is not active on model {model!r} (never "
            "started, already ended, or idle longer than the session TTL): the first request "
            "of a sequence must set sequence_start=true"
        )


class SessionNotOnModel(GruServeError):
    """A bulk step names a session of another model than the one in its URL."""

    def __init__(self, session_id: str, model: str, expected: str) -> None:
        session_id = client_id(session_id)  # the id the client sent, never a store key
        self.session_id, self.model = session_id, model
        super().__init__(
            f"session {session_id!r} belongs to model {model!r}, not {expected!r}: send its "
            f"steps to /v1/models/{model}/steps"
        )


class SessionExists(GruServeError):
    """A client-chosen session id is already taken."""

    def __init__(self, session_id: str) -> None:
        session_id = client_id(session_id)  # the id the client sent, never a store key
        self.session_id = session_id
        super().__init__(f"session {session_id!r} already exists; choose another id or omit it")


class SessionConflict(GruServeError):
    """Another server kept winning the race to update this session."""

    def __init__(self, session_id: str, attempts: int) -> None:
        session_id = client_id(session_id)  # the id the client sent, never a store key
        self.session_id = session_id
        super().__init__(
            f"session {session_id!r} was updated concurrently by another server {attempts} "
            "times in a row; the step was not applied, retry it"
        )


class SessionModelMismatch(GruServeError):
    """A session was created on a model version this server does not run."""

    def __init__(self, session_id: str, model: str, version: int, served: int) -> None:
        session_id = client_id(session_id)  # the id the client sent, never a store key
        self.session_id = session_id
        super().__init__(
            f"session {session_id!r} belongs to model {model!r} version {version}, but this "
            f"server runs version {served}; its state cannot continue on another version, "
            "create a new session"
        )


class TooManySessions(GruServeError):
    """The store already holds the configured maximum number of sessions."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(
            f"the server holds its maximum of {limit} sessions (setting GRUSERVE_MAX_SESSIONS); "
            "delete finished sessions or retry after idle ones expire (or have the least "
            "recently used evicted: GRUSERVE_SESSION_EVICTION=lru)"
        )


class StepOutOfOrder(GruServeError):
    """A step's number is neither the session's next step nor a retry of its last one.

    ``current_step`` is the number of steps the session has applied: the number its
    next step must carry.
    """

    field = "step"

    def __init__(self, session_id: str, sent: int, current: int) -> None:
        session_id = client_id(session_id)  # the id the client sent, never a store key
        self.session_id, self.sent, self.current_step = session_id, sent, current
        if sent > current:
            why = "ahead of it (a step in between is missing)"
        elif sent == current - 1:
            why = "its last step, whose result was not kept (that step carried no step number)"
        else:
            why = "behind it (only the last step's result is kept for a retry)"
        hint = f"send step={current} for the next step"
        if current > 0:
            hint += f", or step={current - 1} to repeat the last one"
        super().__init__(
            f"session {session_id!r} has applied {current} steps and step={sent} is {why}; {hint}"
        )


class StepMismatch(GruServeError):
    """A resent numbered step whose inputs or mask differ from those the session applied.

    The kept result answers only a true resend; a different payload under the same number
    is a client bug (or a mixed-up retry) and must not get another step's outputs.
    """

    field = "step"

    def __init__(self, session_id: str, sent: int, current: int) -> None:
        session_id = client_id(session_id)  # the id the client sent, never a store key
        self.session_id, self.sent, self.current_step = session_id, sent, current
        super().__init__(
            f"session {session_id!r} already applied step={sent} with other inputs or mask "
            f"than this request's; a resend must repeat the step exactly (send step={current} "
            "for a new step)"
        )


class MissingApiKey(GruServeError):
    """A request without (or with a malformed) API key, where one is required."""

    def __init__(self) -> None:
        super().__init__(
            "this server requires an API key: send `Authorization: Bearer <key>` or "
            "`X-API-Key: <key>`"
        )


class InvalidApiKey(GruServeError):
    """A request whose API key is not one of the server's keys."""

    def __init__(self) -> None:
        super().__init__("the API key is not valid for this server")


class AdminOnly(GruServeError):
    """An operator action (the model repository API) asked for with a tenant's key."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} needs an admin API key (name:key:admin)")


class SnapshotError(GruServeError):
    """A session snapshot file cannot be written or read."""

    def __init__(self, path: object, message: str) -> None:
        self.path = path
        super().__init__(f"session snapshot {path}: {message}")


class StoreUnavailable(GruServeError):
    """The session store (Redis) cannot be reached, or answers that it takes no writes now
    (its disk fails, too few replicas, a script running too long: the reason says)."""

    def __init__(self, store: str, reason: object) -> None:
        self.store = store
        super().__init__(self.describe(store, reason))

    @staticmethod
    def describe(store: str, reason: object) -> str:
        """The message; its kinds below say their own cause and what to do."""
        return f"session store {store} cannot answer now ({reason}); retry shortly"


class StoreFull(StoreUnavailable):
    """The session store answers but refuses to store more: Redis reached its ``maxmemory``
    with the ``noeviction`` policy.

    A kind of :class:`StoreUnavailable` (503, and a client retries), since every write
    fails until memory is freed, the steps of existing sessions included; its own type and
    message tell an operator that Redis is full, not down. Nothing of a refused write was
    stored, so a resend (with its step number) applies it once.
    """

    @staticmethod
    def describe(store: str, reason: object) -> str:
        return (
            f"session store {store} is full: it refuses writes above its memory limit "
            f"({reason}); steps and new sessions fail until memory is freed: raise Redis's "
            "maxmemory, lower GRUSERVE_MAX_SESSIONS or GRUSERVE_SESSION_TTL_S, or delete "
            "finished sessions; retry later"
        )


class StoreDenied(StoreUnavailable):
    """The session store refuses gruserve's Redis user: a wrong name or password, or an ACL
    that denies a command or key the store needs.

    A kind of :class:`StoreUnavailable` (503), as a wrong password always was: this
    replica can serve no session until an operator fixes the user, and then it serves again
    without a restart (a client's retry, or a load balancer's next try, succeeds). Its own
    type and message say that the cause is the Redis user, not an outage. Redis checks the
    user before a command runs, so nothing of a refused call was stored.
    """

    @staticmethod
    def describe(store: str, reason: object) -> str:
        return (
            f"session store {store} refuses gruserve's Redis user ({reason}); give the user "
            "the commands and keys listed in the README (Session stores, 'Redis users'), "
            "or fix the user name and password in GRUSERVE_SESSION_STORE"
        )


# -- training ------------------------------------------------------------------------


class TrainingInterrupted(GruServeError):
    """Training was stopped (Ctrl-C) before it finished; nothing was exported."""

    def __init__(self, epoch: int, epochs: int, kept: str) -> None:
        self.epoch, self.epochs = epoch, epochs
        super().__init__(
            f"training interrupted during epoch {epoch} of {epochs}; {kept}; nothing was exported"
        )
