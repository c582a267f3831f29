"""Chaos: 64 clients for 30 s against two replicas on one Redis, each misbehaving at random.

Every client owns a session and sends it numbered steps of one to three timesteps. At
random it also resends a step it already has the reply to, sends two copies of a step at
once (to either replica, so the copies race through compare-and-set), and gives up on a
step early (a client-side timeout, or the request cancelled mid-flight) and sends it
again. Every reply a client keeps must be a 200 whose outputs equal the other replies to
the same step; at the end every session's step count, state and every output its
client was given equal one predict call over the inputs the client sent, in order.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fault_helpers import (
    assert_session_matches,
    counter,
    replicas,
    running_redis,
    sequence,
    server_env,
)

DURATION_S = 30.0
CLIENTS = 64
REPLICAS = 2
MAX_TIMESTEPS = 3000  # per session: the reference is one predict call (at most 4096)
CHOICES = {"plain": 0.55, "resend": 0.15, "duplicate": 0.15, "timeout": 0.075, "cancel": 0.075}


@dataclass
class Session:
    session_id: str
    inputs: list[np.ndarray] = field(default_factory=list)  # [T, 1] per acknowledged step
    outputs: list[np.ndarray] = field(default_factory=list)
    actions: Counter[str] = field(default_factory=Counter)
    transport_errors: int = 0


class ChaosClient:
    """One client, its session and its own connections (one pool shared by 64 clients
    costs httpx more CPU than the servers spend)."""

    def __init__(self, index: int, urls: list[str], http: httpx.AsyncClient) -> None:
        self.urls, self.http = urls, http
        self.rnd = random.Random(index)
        self.rng = np.random.default_rng(index)
        self.session = Session(f"chaos-{index}")

    async def send(self, body: dict[str, Any], **kw: Any) -> np.ndarray:
        """POST one step to a random replica; the reply's outputs (must be a 200)."""
        sid = self.session.session_id
        url = f"{self.rnd.choice(self.urls)}/v1/sessions/{sid}/step"
        reply = await self.http.post(url, json=body, **kw)
        assert reply.status_code == 200, f"{sid} step={body['step']}: {reply.text}"
        answer = reply.json()
        assert answer["step"] == body["step"] + 1, (sid, body["step"], answer)
        return np.asarray(answer["outputs"], dtype=np.float64)

    async def deliver(self, body: dict[str, Any]) -> np.ndarray:
        """:meth:`send` until a reply comes (a kept-alive connection may close under it)."""
        for _ in range(5):
            try:
                return await self.send(body)
            except httpx.TransportError:
                self.session.transport_errors += 1
        raise AssertionError(f"{self.session.session_id} step={body['step']}: no reply")

    async def give_up_early(self, action: str, body: dict[str, Any]) -> np.ndarray | None:
        """Send a step and abandon it soon (the server may still apply it): a client-side
        timeout, or the request task cancelled mid-flight. Its outputs if it came back."""
        try:
            if action == "timeout":
                timeout = httpx.Timeout(self.rnd.uniform(0.001, 0.02))
                return await self.send(body, timeout=timeout)
            return await asyncio.wait_for(self.send(body), timeout=self.rnd.uniform(0, 0.02))
        except (httpx.TransportError, TimeoutError):  # httpx's timeouts included
            return None

    async def run(self, deadline: float) -> Session:
        session, rnd = self.session, self.rnd
        sid = session.session_id
        reply = await self.http.post(
            f"{rnd.choice(self.urls)}/v1/models/demo/sessions", json={"session_id": sid}
        )
        assert reply.status_code == 201, reply.text
        timesteps = 0
        while time.monotonic() < deadline and timesteps < MAX_TIMESTEPS - 3:
            chunk = sequence(self.rng, rnd.randint(1, 3))
            body = {"inputs": chunk.tolist(), "step": len(session.outputs)}
            action = rnd.choices(list(CHOICES), weights=list(CHOICES.values()))[0]
            session.actions[action] += 1
            early = None
            if action == "duplicate":  # two copies at once, to either replica
                first, second = await asyncio.gather(self.deliver(body), self.deliver(body))
                np.testing.assert_array_equal(first, second, err_msg=f"{sid} {body['step']}")
            elif action in ("timeout", "cancel"):
                early = await self.give_up_early(action, body)
                first = await self.deliver(body)
            else:
                first = await self.deliver(body)
            if action == "resend" or early is not None:  # a resend of an answered step
                again = early if early is not None else await self.deliver(body)
                np.testing.assert_array_equal(again, first, err_msg=f"{sid} {body['step']}")
            session.inputs.append(chunk)
            session.outputs.append(first)
            timesteps += len(chunk)
        return session


@pytest.mark.slow
def test_chaos_of_retries_duplicates_and_timeouts_applies_every_step_once(
    tmp_path: Path,
) -> None:
    with (
        running_redis(tmp_path / "redis", durable=False) as redis,
        replicas(REPLICAS, server_env(redis.url), tmp_path) as servers,
    ):
        urls = [r.url for r in servers]

        async def client(index: int, deadline: float) -> Session:
            async with httpx.AsyncClient(timeout=60) as http:
                return await ChaosClient(index, urls, http).run(deadline)

        async def main() -> list[Session]:
            deadline = time.monotonic() + DURATION_S
            return await asyncio.gather(*(client(i, deadline) for i in range(CLIENTS)))

        sessions = asyncio.run(main())
        for session in sessions:
            assert_session_matches(
                urls[0], session.session_id, np.concatenate(session.inputs), session.outputs
            )
        actions = sum((s.actions for s in sessions), Counter())
        replays = sum(counter(url, "gruserve_step_replays_total") for url in urls)
        conflicts = sum(counter(url, "gruserve_session_conflicts_total") for url in urls)
        # every resend and every second copy of a duplicate was answered from the stored result
        assert replays >= actions["resend"] + actions["duplicate"], (replays, actions)
        assert all(server.proc.poll() is None for server in servers)
        steps = sum(len(s.outputs) for s in sessions)
        transport_errors = sum(s.transport_errors for s in sessions)
        print(
            f"\nchaos: {steps} steps in {DURATION_S:.0f} s ({dict(actions)}); {replays:.0f} "
            f"replays, {conflicts:.0f} compare-and-set conflicts, {transport_errors} "
            "transport errors resent"
        )
