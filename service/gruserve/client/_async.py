"""The asyncio client: :class:`AsyncClient` and its :class:`AsyncSession` (the same API as
:mod:`gruserve.client._sync`, awaited; ``stream`` is an async iterator)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, Literal, overload
from urllib.parse import quote

import httpx
import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from gruserve.client import _wire as w
from gruserve.client.errors import SessionNotFound, api_error


class AsyncClient:
    """A gruserve server (or a load balancer in front of replicas) over HTTP and WebSocket.

    Every request is retried, with exponential backoff, after a timeout, a refused or
    dropped connection, or a 502/503/504 answer; steps carry their number so that a
    resent step is applied once (see :meth:`Session.step`).

    Args:
        url: the server's base URL, e.g. ``"http://127.0.0.1:8000"``.
        api_key: sent as ``Authorization: Bearer <key>``; None when the server has no keys.
        timeout: seconds an attempt may take (connect, send, wait for the reply).
        retries: resends after the first attempt before giving up (0: none).

    Example:

    >>> async with AsyncClient("http://127.0.0.1:8000") as c:  # doctest: +SKIP
    ...     s = await c.create_session("demo")
    ...     await s.step([[40.5], [60.1]])
    array([[37.45446 ], [60.108566]], dtype=float32)
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        timeout: float = 5.0,
        retries: int = 5,
    ) -> None:
        w.Backoff("", retries)  # validates retries
        self.url, self.api_key, self.timeout, self.retries = (
            url.rstrip("/"),
            api_key,
            timeout,
            retries,
        )
        self._http = httpx.AsyncClient(
            base_url=self.url, timeout=timeout, headers=w.auth_headers(api_key)
        )
        self._layouts: dict[str, w.OutputLayout] = {}

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the pooled HTTP connections."""
        await self._http.aclose()

    # -- sessions and predict --------------------------------------------------------------
    async def create_session(
        self,
        model: str,
        session_id: str | None = None,
        initial_state: Mapping[str, Any] | Sequence[Any] | None = None,
    ) -> AsyncSession:
        """Create a session of ``model`` and return it, at step 0.

        Args:
            model: the model's name.
            session_id: the id to give it; None makes a random one here (not on the server),
                so that a create resent after a lost reply cannot make a second session.
            initial_state: ``{key: [units]}``, a list in manifest order, or, for a one-state
                model, its values; zeros when None.

        Raises:
            SessionExists: the id is taken by another create (the server answers a resend
                of this call, after a lost reply or a 503, with the session its first
                attempt made).
            ModelNotFound, InvalidInput, TooManySessions, ConnectionLost.
        """
        session_id = w.new_session_id() if session_id is None else session_id
        body: dict[str, Any] = {"session_id": session_id}
        if initial_state is not None:
            body["initial_state"] = w.states(initial_state)
        response, _ = await self._send(
            "POST",
            f"/v1/models/{quote(model, safe='')}/sessions",
            f"create session {session_id!r}",
            w.dumps(body),
        )
        return AsyncSession(self, w.reply(response.status_code, response.content, ok=201))

    async def session(self, session_id: str, model: str | None = None) -> AsyncSession:
        """Attach to an existing session: its next step is numbered from its step count.

        With ``model``, no request is made: the handle is for a session its first step
        creates in band (``step(x, create=True)``), numbered from 0.

        Raises:
            SessionNotFound, ConnectionLost.
        """
        if model is not None:
            return AsyncSession(self, {"session_id": session_id, "model": model, "step": 0})
        return AsyncSession(
            self, await self._json("GET", w.session_path(session_id), "get session")
        )

    async def upgrade(
        self, session_id: str, version: int | None = None, replay: int | None = None
    ) -> dict[str, Any]:
        """Move a session to another version of its model (``POST /v1/sessions/{id}/upgrade``).

        Args:
            session_id: the session.
            version: the version to move to; the model's default version when None.
            replay: start from the state the new version computes over the session's last
                ``replay`` inputs (the server keeps them when ``GRUSERVE_SESSION_HISTORY``
                is set); from the new version's zero state when None or 0.

        Returns:
            ``{"session_id", "model", "old_version", "version", "step", "replayed"}``.

        Raises:
            SessionNotFound, InvalidInput (naming ``version`` or ``replay``), ConnectionLost.
        """
        body = w.upgrade_body(version, replay)
        path = w.session_path(session_id, "/upgrade")
        return dict(await self._json("POST", path, "upgrade", body))

    @overload
    async def predict(
        self,
        model: str,
        X: Any,
        initial_state: Mapping[str, Any] | None = None,
        return_state: Literal[False] = False,
        mask: Any = None,
    ) -> w.Outputs: ...

    @overload
    async def predict(
        self,
        model: str,
        X: Any,
        initial_state: Mapping[str, Any] | None = None,
        *,
        return_state: Literal[True],
        mask: Any = None,
    ) -> tuple[w.Outputs, dict[str, np.ndarray]]: ...

    @overload
    async def predict(
        self,
        model: str,
        X: Any,
        initial_state: Mapping[str, Any] | None = None,
        return_state: bool = False,
        mask: Any = None,
    ) -> w.Outputs | tuple[w.Outputs, dict[str, np.ndarray]]: ...

    async def predict(
        self,
        model: str,
        X: Any,
        initial_state: Mapping[str, Any] | None = None,
        return_state: bool = False,
        mask: Any = None,
    ) -> w.Outputs | tuple[w.Outputs, dict[str, np.ndarray]]:
        """Run whole sequences, statelessly.

        Args:
            model: the model's name.
            X: [batch, timesteps, features] values (token ids: [batch, timesteps]).
            initial_state: ``{key: [batch, units]}``; zeros when None.
            return_state: also return the final states.
            mask: [batch, timesteps] booleans; False skips a timestep.

        Returns:
            The outputs, [batch, timesteps, D] (or [batch, D]), float32; a dict for a model
            with several outputs. With ``return_state``: ``(outputs, {key: [batch, units]})``.
        """
        body: dict[str, Any] = {"inputs": w.values(X), "return_state": return_state}
        if initial_state is not None:
            body["initial_state"] = w.states(initial_state)
        if mask is not None:
            body["mask"] = np.asarray(mask, dtype=bool)
        answer = await self._json(
            "POST", f"/v1/models/{quote(model, safe='')}/predict", "predict", w.dumps(body)
        )
        out = w.outputs(answer["outputs"])
        if not return_state:
            return out
        return out, {k: np.asarray(v, dtype=np.float32) for k, v in answer["states"].items()}

    # -- transport ---------------------------------------------------------------------------
    async def _send(
        self,
        method: str,
        path: str,
        what: str,
        content: bytes | None = None,
        params: dict[str, str] | None = None,
    ) -> tuple[httpx.Response, bool]:
        """One request, resent after transport failures and 502/503/504.

        Returns:
            The last response, and whether the request was sent more than once.
        """
        backoff = w.Backoff(what, self.retries)
        headers = None if content is None else w.JSON_HEADERS
        while True:
            try:
                response = await self._http.request(
                    method, path, content=content, params=params, headers=headers
                )
            except httpx.UnsupportedProtocol:
                raise
            except httpx.TransportError as exc:
                await asyncio.sleep(backoff.next_delay(exc))
                continue
            if response.status_code not in w.RETRYABLE_STATUS or backoff.spent:
                return response, backoff.attempts > 0
            await asyncio.sleep(backoff.next_delay(f"HTTP {response.status_code}"))

    async def _json(
        self,
        method: str,
        path: str,
        what: str,
        content: bytes | None = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        response, _ = await self._send(method, path, what, content, params)
        return w.reply(response.status_code, response.content)

    async def _layout(self, model: str) -> w.OutputLayout:
        if model not in self._layouts:
            description = await self._json("GET", f"/v1/models/{quote(model, safe='')}", "describe")
            self._layouts[model] = w.OutputLayout.of(description)
        return self._layouts[model]

    async def _connect(self, session_id: str) -> ClientConnection:
        return await connect(
            w.ws_url(self.url, session_id),
            subprotocols=[w.SUBPROTOCOL],  # type: ignore[list-item]
            additional_headers=w.auth_headers(self.api_key),
            compression=None,  # the server's fast path; deflate saves nothing on float32
            open_timeout=self.timeout,
            close_timeout=self.timeout,
            max_size=None,
        )


class AsyncSession:
    """One server-side session: its state stays on the server between steps.

    Attributes:
        session_id, model, version: as the server reported them.
    """

    def __init__(self, client: AsyncClient, description: dict[str, Any]) -> None:
        self._client = client
        self.session_id: str = description["session_id"]
        self.model: str = description["model"]
        self.version: int | None = description.get("version")  # None: not created yet
        self._step = int(description["step"])

    def __repr__(self) -> str:
        return f"AsyncSession({self.session_id!r}, model={self.model!r}, step={self._step})"

    @property
    def step_number(self) -> int:
        """Steps the session has applied, as of this client's last answer from it."""
        return self._step

    @overload
    async def step(
        self, x: Any, mask: Any = None, *, create: w.Create = None, end: bool | None = None
    ) -> w.Outputs: ...

    @overload
    async def step(
        self, x: Any, mask: Any = None, *, create: w.Create = None, end: w.End = None
    ) -> w.Outputs | tuple[w.Outputs, dict[str, np.ndarray]]: ...

    async def step(
        self, x: Any, mask: Any = None, *, create: w.Create = None, end: w.End = None
    ) -> w.Outputs | tuple[w.Outputs, dict[str, np.ndarray]]:
        """Apply one chunk of timesteps and return its outputs.

        The request carries ``"step": step_number``; after a timeout, a dropped connection
        or a 502/503/504 the very same request is resent (with backoff, up to the client's
        ``retries``), and the server applies it only if it has not already: it answers a
        resend of its last step with the outputs it kept. So a step is applied exactly once
        whatever the network loses.

        Args:
            x: [timesteps, features] or [features] (one timestep; token ids: [timesteps] or
                one id).
            mask: [timesteps] booleans; False leaves the state unchanged for that timestep.
            create: in-band create (README "Short sessions: create and end in band"): True
                (the handle's model), a model name, or ``{"model"?, "initial_state"?}``. The
                step creates the session if its id is free and steps it if it is your own
                live session on that model (so a resent create-step creates nothing more).
            end: True, or ``{"return_state": True}``: delete the session once this step is
                applied (an ended session keeps no result: a resend of an end step whose
                reply was lost raises SessionNotFound).

        Returns:
            [timesteps, D] float32 ([D] for a [features] step or a one-output-per-sequence
            model); a dict of them for a model with several outputs. With
            ``end={"return_state": True}``: ``(outputs, {key: [units]})``, the state the
            session ended in.

        Raises:
            SessionNotFound, InvalidInput, PayloadTooLarge, StepOutOfOrder (another client
            stepped this session meanwhile), SessionExists (``create`` of an id taken by
            another tenant or model), ConnectionLost; ValueError: ``create`` or ``end`` in
            none of the forms above.
        """
        body = w.step_body(x, mask, self._step, create, end, self.model)
        number = self._step
        answer = await self._client._json(
            "POST",
            w.session_path(self.session_id, "/step"),
            f"step {number} of session {self.session_id!r}",
            body,
        )
        self._step = int(answer["step"])
        self.version = answer.get("version", self.version)
        if "states" in answer:
            return w.outputs(answer["outputs"]), w.ended_states(answer)
        return w.outputs(answer["outputs"])

    async def stream(self, xs: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[w.Outputs]:
        """Step through ``xs`` over one WebSocket (binary frames), yielding each step's outputs.

        Each message carries its step number (the ``gruserve-step`` subprotocol). When the
        connection drops, is closed by a restarting server, or a reply takes longer than the
        client's ``timeout``, the stream reconnects (with backoff, up to ``retries`` times
        per step) and resends the step it was waiting for: it resumes exactly where it was,
        on whichever replica the new connection reaches.

        Args:
            xs: the steps, each as :meth:`step` takes it (an iterable or an async iterable).

        Raises:
            as :meth:`step`.
        """
        client = self._client
        layout = await client._layout(self.model)
        socket: ClientConnection | None = None
        try:
            async for x in _each(xs):
                number = self._step
                frame, timesteps = layout.frame(number, x)
                backoff = w.Backoff(
                    f"step {number} of session {self.session_id!r} (WebSocket)", client.retries
                )
                while True:
                    try:
                        if socket is None:
                            socket = await client._connect(self.session_id)
                        await socket.send(frame)
                        message = await asyncio.wait_for(socket.recv(), client.timeout)
                        break
                    except InvalidStatus as exc:
                        status = exc.response.status_code
                        if status not in w.RETRYABLE_STATUS:
                            raise api_error(status, exc.response.body or b"") from None
                        failure: BaseException = exc
                    except ConnectionClosed as exc:
                        if exc.rcvd is not None and exc.rcvd.code == 4404:
                            raise SessionNotFound(
                                404, "SessionNotFound", exc.rcvd.reason, None, None
                            ) from None
                        failure = exc
                    except (OSError, TimeoutError, InvalidHandshake) as exc:
                        failure = exc
                    if socket is not None:
                        await socket.close()
                        socket = None
                    await asyncio.sleep(backoff.next_delay(failure))
                if isinstance(message, str):
                    raise w.ws_error(message)
                self._step, outputs = layout.outputs(message, timesteps)
                yield outputs
        finally:
            if socket is not None:
                await socket.close()

    async def reset(
        self, states: Mapping[str, Any] | Sequence[Any] | None = None
    ) -> dict[str, Any]:
        """Set the state to zeros, or to ``states``; the step count starts again at 0.

        Returns:
            The session's description after the reset.
        """
        body = {} if states is None else {"states": w.states(states)}
        answer = await self._client._json(
            "POST", w.session_path(self.session_id, "/reset"), "reset", w.dumps(body)
        )
        self._step = int(answer["step"])
        return w.info(answer)

    async def upgrade(
        self, version: int | None = None, replay: int | None = None
    ) -> dict[str, Any]:
        """Move this session to another version of its model: see ``Client.upgrade``."""
        answer = await self._client.upgrade(self.session_id, version, replay)
        self.version, self._step = int(answer["version"]), int(answer["step"])
        return answer

    async def info(self, include_state: bool = False) -> dict[str, Any]:
        """The session's description (step, timesteps, times; ``states`` when asked)."""
        params = {"include_state": "true"} if include_state else None
        return w.info(
            await self._client._json(
                "GET", w.session_path(self.session_id), "get session", None, params
            )
        )

    async def delete(self) -> None:
        """Delete the session (a resend that finds it gone after a lost reply is fine)."""
        response, resent = await self._client._send(
            "DELETE", w.session_path(self.session_id), "delete session"
        )
        if response.status_code == 404 and resent:
            return
        w.reply(response.status_code, response.content, ok=204)


async def _each(xs: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(xs, AsyncIterable):
        async for x in xs:
            yield x
    else:
        for x in xs:
            yield x
