"""The KServe v2 / Triton ``GRPCInferenceService``, on the same core as the HTTP routes.

Each RPC checks the API key (from the call's metadata: ``authorization: Bearer <key>``
or ``x-api-key``, the keys and tenants of HTTP), decodes its message
(:mod:`gruserve.api.v2.grpc_codec`), makes the one call :mod:`gruserve.api.v2.infer`
makes for HTTP, and encodes the reply; errors become status codes
(:mod:`gruserve.api.v2.grpc_status`). ``ServerLive`` and ``ServerReady`` need no key,
as ``/v2/health/live`` and ``/v2/health/ready`` need none; the repository RPCs need an
admin key (when keys are on), as ``/v2/repository/...`` do. Every answer is counted, timed
and traced (:mod:`gruserve.api.v2.grpc_telemetry`), each stream message as one request.

``ModelStreamInfer`` is Triton's bidirectional stream: requests are answered one by one
in the order sent, a sequence's steps through the same session mapping as HTTP (so one
sequence may move between HTTP, gRPC and replicas). A request that fails is answered with
``error_message`` and the stream goes on, as Triton does. When the server shuts down,
each stream finishes the request it is running, answers it, and ends with UNAVAILABLE,
so a client knows to reconnect (to another replica) and carry on; a stream whose
client goes away has its running step cancelled like an HTTP request whose client
disconnects, and leaves nothing locked.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2_grpc
from tritonclient.grpc import service_pb2 as pb

from gruserve import __version__
from gruserve.api._auth import ApiKeys
from gruserve.api.errors import count_answered
from gruserve.api.v2 import grpc_codec, grpc_status, repository
from gruserve.api.v2 import infer as v2_infer
from gruserve.api.v2.grpc_telemetry import Call, GrpcTelemetry
from gruserve.api.v2.model import wire_model
from gruserve.api.v2.routes import EXTENSIONS
from gruserve.api.v2.triton_config import PLATFORM
from gruserve.errors import GruServeError
from gruserve.services import Services
from gruserve.sessions.owner import ANYONE, Caller

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Unary = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]
STREAM = "ModelStreamInfer"
SHUTTING_DOWN = "the server is shutting down; reconnect and continue the sequence"


def _answers(method: Unary[Req, Resp]) -> Unary[Req, Resp]:
    """Answer an exception from ``method`` with its status code and message; count, time
    and trace the call (:mod:`gruserve.api.v2.grpc_telemetry`)."""

    name = method.__name__

    @functools.wraps(method)
    async def answer(
        self: InferenceService, request: Req, context: grpc.aio.ServicerContext
    ) -> Resp:
        with self.telemetry.call(name, context, request) as call:
            try:
                return await method(self, request, context)
            except Exception as exc:
                count_answered(self.services.metrics, [exc])
                call.code, message = grpc_status.status_of(exc)
        await context.abort(call.code, message)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    return answer


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    """``GRPCInferenceService`` over ``services``.

    Args:
        services: the serving objects HTTP uses.
        keys: the accepted API keys, or None when keys are off.
    """

    def __init__(self, services: Services, keys: ApiKeys | None) -> None:
        self.services = services
        self.telemetry = GrpcTelemetry(services.metrics, services.tracing)
        self._keys = keys
        self._stopping = False
        self._idle: set[asyncio.Task[Any]] = set()  # streams waiting for their next request

    def end_streams(self) -> None:
        """Have every stream end after the request it is running (shutdown): one waiting for
        its next request ends now (its wait is cancelled), one stepping once it answers."""
        self._stopping = True
        for stream in list(self._idle):
            stream.cancel()

    def _caller(self, context: grpc.aio.ServicerContext) -> Caller:
        if self._keys is None:
            return ANYONE
        headers = [
            (key.encode("latin-1"), value.encode("latin-1"))
            for key, value in context.invocation_metadata() or ()
            if isinstance(value, str)  # "-bin" metadata carries bytes: never a key
        ]
        found = self._keys.identify(headers)
        if isinstance(found, GruServeError):
            raise found
        return found

    # -- server ----------------------------------------------------------------------------
    @_answers
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Any
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_answers
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Any
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await v2_infer.server_ready(self.services))

    @_answers
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        self._caller(context)
        return pb.ServerMetadataResponse(
            name="gruserve", version=__version__, extensions=EXTENSIONS
        )

    # -- models ----------------------------------------------------------------------------
    @_answers
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Any
    ) -> pb.ModelReadyResponse:
        self._caller(context)
        await v2_infer.find_model(self.services, request.name, request.version)
        return pb.ModelReadyResponse(ready=True)

    @_answers
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        self._caller(context)
        model = await v2_infer.find_model(self.services, request.name, request.version)
        return json_format.ParseDict(
            wire_model(model).metadata(PLATFORM), pb.ModelMetadataResponse()
        )

    @_answers
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Any
    ) -> pb.ModelConfigResponse:
        self._caller(context)
        model = await v2_infer.find_model(self.services, request.name, request.version)
        config = json_format.ParseDict(
            v2_infer.config_of(self.services, model),
            model_config_pb2.ModelConfig(),
            ignore_unknown_fields=True,
        )
        return pb.ModelConfigResponse(config=config)

    # -- repository (admin keys only, as over HTTP) -----------------------------------------
    @_answers
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        repository.admin_only(self._caller(context))
        repository.the_repository(request.repository_name)
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                index(name=e.name, version=str(e.version), state=e.state, reason=e.reason or "")
                for e in self.services.registry.index()
                if not request.ready or e.state == "READY"
            ]
        )

    @_answers
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        repository.admin_only(self._caller(context))
        repository.the_repository(request.repository_name)
        await repository.reload(
            self.services, repository.model_name(self.services, request.model_name)
        )
        return pb.RepositoryModelLoadResponse()

    @_answers
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        repository.admin_only(self._caller(context))
        repository.the_repository(request.repository_name)
        repository.take_down(
            self.services, repository.model_name(self.services, request.model_name)
        )
        return pb.RepositoryModelUnloadResponse()

    # -- inference -------------------------------------------------------------------------
    async def _infer(
        self,
        request: pb.ModelInferRequest,
        caller: Caller,
        into: pb.ModelInferResponse | None = None,
    ) -> pb.ModelInferResponse:
        """The answer to ``request``, written ``into`` an empty response if given."""
        model = await v2_infer.find_model(self.services, request.model_name, request.model_version)
        parsed = grpc_codec.parse(request)
        pinned = bool(request.model_version)
        done = await v2_infer.infer(self.services, model, parsed, caller, pinned=pinned)
        return grpc_codec.reply(
            model.name, done.version, parsed.id, done.outputs, done.parameters, into
        )

    @_answers
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Any
    ) -> pb.ModelInferResponse:
        return await self._infer(request, self._caller(context))

    async def ModelStreamInfer(
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        try:
            caller = self._caller(context)
        except GruServeError as exc:
            count_answered(self.services.metrics, [exc])
            code, message = grpc_status.status_of(exc)
            self.telemetry.count(STREAM, code, 0.0)
            await context.abort(code, message)
        stream = asyncio.current_task()
        while not self._stopping:
            if stream is not None:
                self._idle.add(stream)
            try:
                request = await context.read()
            except asyncio.CancelledError:
                if not self._stopping or stream is None:
                    raise  # the client went away: gRPC cancels the call
                stream.uncancel()  # end_streams cancelled this wait: end the stream here
                break
            finally:
                self._idle.discard(stream)  # type: ignore[arg-type]
            if request is grpc.aio.EOF:
                return
            with self.telemetry.call(STREAM, context, request) as call:
                answer = await self._stream_answer(request, caller, call)
            yield answer
        context.set_code(grpc.StatusCode.UNAVAILABLE)
        context.set_details(SHUTTING_DOWN)

    async def _stream_answer(
        self, request: pb.ModelInferRequest, caller: Caller, call: Call
    ) -> pb.ModelStreamInferResponse:
        answer = pb.ModelStreamInferResponse()
        try:
            await self._infer(request, caller, answer.infer_response)
            return answer
        except Exception as exc:
            count_answered(self.services.metrics, [exc])
            call.code, message = grpc_status.status_of(exc)
            failed = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
            return pb.ModelStreamInferResponse(error_message=message, infer_response=failed)
