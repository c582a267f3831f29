"""What v2 answers, whatever carried it: readiness, model lookup and config, inference.

The HTTP routes (:mod:`gruserve.api.v2.routes`) and the gRPC service
(:mod:`gruserve.api.v2.grpc_service`) decode their own framing into the same
:class:`~gruserve.api.v2.request.InferRequest` and hand it here, so both transports
share the model lookup, the tensor binding, the sequence id -> session mapping
(:mod:`gruserve.api.v2.params`) and the call into the session service or predictor.
Each transport only encodes the :class:`Inferred` it gets back.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from gruserve.api.v2.model import Produced, bind, produced, sequence_outputs, wire_model
from gruserve.api.v2.params import flag, sequence_control
from gruserve.api.v2.request import InferRequest
from gruserve.api.v2.triton_config import model_config
from gruserve.errors import GruServeError, InvalidInput, ModelNotFound
from gruserve.runtime.model import LoadedModel
from gruserve.services import Services
from gruserve.sessions import sequences
from gruserve.sessions.owner import Caller

T = TypeVar("T")
Wait = Callable[[Awaitable[Any]], Awaitable[Any]]
"""How a transport awaits the core call (HTTP: cancelled when the client disconnects)."""


async def _plain(work: Awaitable[T]) -> T:
    return await work


@dataclass(frozen=True)
class Inferred:
    """What one inference produced: the requested outputs, the version that computed them
    (a sequence's own), and the sequence's parameters (``sequence_id``, ``session_id``,
    ``step``) for a step of a sequence, else None."""

    model: LoadedModel
    version: int
    outputs: Produced
    parameters: dict[str, Any] | None


async def find_model(services: Services, name: str, version: str | None) -> LoadedModel:
    """The served model: its default version, or the requested version ("" is none, as
    gRPC's default ``model_version``), loaded first when it is on disk only."""
    registry = services.registry
    model = registry.get(name)
    if not version:
        return model
    if not (version.isascii() and version.isdigit()):
        raise InvalidInput("version", f"expected a version number, got {version!r}")
    try:
        return await registry.ensure(name, int(version), field="version")
    except InvalidInput:
        served = [f"{name} version {v}" for v in registry.versions_loaded(name)]
        raise ModelNotFound(name, int(version), served) from None


async def server_ready(services: Services) -> bool:
    """Ready when a model is loaded and the session store answers (as ``/readyz``)."""
    if not any(st.ready for st in services.registry.statuses()):
        return False
    try:
        await services.store.ping()
    except GruServeError:
        return False
    return True


def config_of(services: Services, model: LoadedModel) -> dict[str, Any]:
    """The model's Triton-style config (``model_config`` in its JSON form)."""
    batcher = services.batchers.of(model)
    return model_config(
        wire_model(model),
        max_batch_size=batcher.max_batch_size,
        max_delay_s=batcher.max_delay_s,
        session_ttl_s=services.settings.session_ttl_s,
        max_sessions=services.settings.max_sessions,
        provider=model.provider,
    )


async def infer(
    services: Services,
    model: LoadedModel,
    parsed: InferRequest,
    caller: Caller,
    wait: Wait = _plain,
    pinned: bool = False,
) -> Inferred:
    """Run ``parsed`` on ``model``: a stateless predict, or one step of its sequence.

    ``pinned``: the request named ``model``'s version (a path's ``/versions/{v}``): the
    predict runs on it and a sequence it starts lives on it; otherwise the default version
    predicts and a sequence continues on the version it started on.

    Raises:
        InvalidInput: tensors that do not fit the model, bad sequence parameters.
        GruServeError: whatever the session service or predictor raises.
    """
    sequence = sequence_control(parsed.parameters, model.name)
    if (
        sequence is not None
        and not sequence.start
        and not pinned
        and len(services.registry.versions_loaded(model.name)) > 1
    ):
        # A sequence continues on its own version, whose tensors may differ from the
        # default's: bind against that one (one more store read, so only while several
        # versions are loaded; a session on a version since unloaded binds against the
        # default, and its step then checks the inputs against its own version: a 4xx if
        # they do not fit, never another version's numbers).
        model = await sequences.model_of(services.sessions, model.name, sequence.session_id, caller)
    wire = wire_model(model)
    call = bind(wire, parsed, flag(parsed.parameters, "binary_data_output"))
    if sequence is None:
        names, keys = call.wanted(wire)
        work = services.predictor.predict(
            model.name,
            call.inputs,
            call.mask,
            call.states,
            outputs=names,
            states=keys,
            version=model.version if pinned else None,
        )
        result = await wait(work)
        outputs = produced(wire, call, result.outputs, result.states)
        return Inferred(model, model.version, outputs, None)
    one = call.one_sequence()
    step = await wait(
        sequences.step(
            services.sessions,
            model.name,
            sequence.session_id,
            one.inputs,
            one.mask,
            start=sequence.start,
            end=sequence.end,
            initial_state=one.states,
            step_number=sequence.step_number,
            caller=caller,
            version=model.version if pinned else None,
        )
    )
    about = {
        "sequence_id": sequence.sequence_id,
        "session_id": sequence.session_id,
        "step": step.step,
    }
    outputs = sequence_outputs(wire, call, step, model.signature)
    return Inferred(model, step.record.version, outputs, about)
