"""The one place that maps exceptions to gRPC status codes (``api/errors.py`` does HTTP).

Core errors know nothing about transports; each front-end maps the same classes. For
gRPC, by the codes' published meanings:

=======================================================  ======================
error                                                    code
=======================================================  ======================
InvalidInput                                             INVALID_ARGUMENT
PayloadTooLarge, TooManySessions                         RESOURCE_EXHAUSTED
ModelNotFound, SessionNotFound, SequenceNotStarted,
SessionNotOnModel, ModelVersionGone                      NOT_FOUND
SessionExists                                            ALREADY_EXISTS
StepOutOfOrder, StepMismatch, SessionModelMismatch       FAILED_PRECONDITION
SessionConflict (lost a compare-and-set; retry)          ABORTED
MissingApiKey, InvalidApiKey                             UNAUTHENTICATED
AdminOnly                                                PERMISSION_DENIED
ModelUnavailable, StoreUnavailable                       UNAVAILABLE
anything else (a bug; logged with its traceback)         INTERNAL
=======================================================  ======================

Messages are the ones HTTP answers with; errors are logged and counted as HTTP's are.
"""

from __future__ import annotations

import logging

import grpc

from gruserve import errors as e

log = logging.getLogger(__name__)

Code = grpc.StatusCode
STATUS: dict[type[e.GruServeError], grpc.StatusCode] = {
    e.InvalidInput: Code.INVALID_ARGUMENT,
    e.PayloadTooLarge: Code.RESOURCE_EXHAUSTED,
    e.TooManySessions: Code.RESOURCE_EXHAUSTED,
    e.ModelNotFound: Code.NOT_FOUND,
    e.SessionNotFound: Code.NOT_FOUND,
    e.SequenceNotStarted: Code.NOT_FOUND,
    e.SessionNotOnModel: Code.NOT_FOUND,
    e.ModelVersionGone: Code.NOT_FOUND,  # HTTP's 410: gRPC has no "gone"
    e.SessionExists: Code.ALREADY_EXISTS,
    e.StepOutOfOrder: Code.FAILED_PRECONDITION,
    e.StepMismatch: Code.FAILED_PRECONDITION,
    e.SessionModelMismatch: Code.FAILED_PRECONDITION,
    e.SessionConflict: Code.ABORTED,
    e.MissingApiKey: Code.UNAUTHENTICATED,
    e.InvalidApiKey: Code.UNAUTHENTICATED,
    e.AdminOnly: Code.PERMISSION_DENIED,
    e.ModelUnavailable: Code.UNAVAILABLE,
    e.StoreUnavailable: Code.UNAVAILABLE,
}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The code and message ``exc`` is answered with; logs it (the caller counts it:
    :func:`gruserve.api.errors.count_answered`)."""
    if isinstance(exc, e.GruServeError):
        code = next(
            (STATUS[k] for k in type(exc).__mro__ if k in STATUS),
            Code.INTERNAL,  # type: ignore[index]
        )
        kind, message = type(exc).__name__, str(exc)
        level = logging.WARNING if code in (Code.UNAVAILABLE, Code.INTERNAL) else logging.INFO
        log.log(level, "answered gRPC %s %s: %s", code.name, kind, message)
        return code, message
    log.error("unexpected error answering a gRPC call", exc_info=exc)
    return Code.INTERNAL, "internal server error; the server log has the details"
