"""Malformed v2 requests: every one is a 4xx ``{"error": "..."}`` naming the fault, never a 5xx.

One app (memory store) serves the whole table; sequence semantics on both stores
are in test_v2.py.
"""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import pytest_asyncio
from test_v2 import HEADER, v2_body

from conftest import serve

pytestmark = pytest.mark.asyncio(loop_scope="module")

X = np.arange(6, dtype=np.float32).reshape(1, 2, 3) / 10  # fits model "simple": [1, 2, 3]
Request = tuple[bytes, dict[str, str]]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def v2(models_dir: Path, tiny_models: dict[str, Any]) -> AsyncIterator[httpx.AsyncClient]:
    async for served in serve(models_dir, "memory", max_request_bytes=1 << 20):
        yield served.client


def raw(head: dict[str, Any], binary: bytes = b"", length: int | str | None = None) -> Request:
    text = orjson.dumps(head)
    if length is None and not binary:
        return text, {}
    return text + binary, {HEADER: str(len(text) if length is None else length)}


def tensor(
    name: str = "inputs", datatype: str = "FP32", shape: Any = (1, 2, 3), **extra: Any
) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": list(shape), **extra}


def sized(size: int, **extra: Any) -> dict[str, Any]:
    return tensor(parameters={"binary_data_size": size}, **extra)


def json_x(**parameters: Any) -> Request:
    return v2_body([("inputs", "FP32", X)], parameters)


CASES: dict[str, tuple[Callable[[], Request], int, str]] = {
    # binary tensor data extension
    "wrong byte count": (lambda: raw({"inputs": [sized(32)]}, X.tobytes()), 422, "takes 24 bytes"),
    "body too short": (
        lambda: raw({"inputs": [sized(24)]}, X.tobytes()[:20]),
        422,
        "only 20 follow",
    ),
    "trailing bytes": (
        lambda: raw({"inputs": [sized(24)]}, X.tobytes() + b"xyz"),
        422,
        "add up to 24",
    ),
    "huge header length": (
        lambda: raw({"inputs": [sized(24)]}, X.tobytes(), length="9" * 40),
        422,
        "is more than",
    ),
    "header length past body": (lambda: raw({"inputs": []}, b"", length=10**6), 422, "more than"),
    "header length not a number": (
        lambda: raw({"inputs": [sized(24)]}, X.tobytes(), length="-5"),
        422,
        "length in bytes",
    ),
    "binary without header": (
        lambda: (orjson.dumps({"inputs": [sized(24)]}) + X.tobytes(), {}),
        422,
        "not valid JSON",
    ),
    "binary size, no binary": (lambda: raw({"inputs": [sized(24)]}), 422, "header missing?"),
    "data and binary": (
        lambda: raw({"inputs": [sized(24, data=[0] * 6)]}, X.tobytes()),
        422,
        "both data",
    ),
    "bool byte not 0/1": (
        lambda: raw(
            {"inputs": [sized(24), {**sized(2, name="mask", datatype="BOOL", shape=[1, 2])}]},
            X.tobytes() + b"\x01\x02",
        ),
        422,
        "must be 0 or 1",
    ),
    "binary NaN": (
        lambda: raw({"inputs": [sized(24)]}, np.full(6, np.nan, "<f4").tobytes()),
        422,
        "not a finite float32",
    ),
    # datatypes
    "unknown datatype": (
        lambda: raw({"inputs": [tensor(datatype="FP128", data=[0] * 6)]}),
        422,
        "unknown datatype",
    ),
    "wrong datatype": (
        lambda: v2_body([("inputs", "FP64", X.astype(np.float64))]),
        422,
        "is FP32, got FP64",
    ),
    "BYTES datatype": (
        lambda: raw({"inputs": [tensor(datatype="BYTES", data=["a"] * 6)]}),
        422,
        "takes no BYTES",
    ),
    "bool in FP32 data": (
        lambda: raw({"inputs": [tensor(data=[True] * 6)]}),
        422,
        "expected a number, got true",
    ),
    "NaN literal": (
        lambda: (orjson.dumps({"inputs": [tensor(data=[0] * 6)]}).replace(b"[0,", b"[NaN,"), {}),
        422,
        "got NaN",
    ),
    "UINT8 out of range": (
        lambda: raw({"inputs": [tensor(datatype="UINT8", data=[300] * 6)]}),
        422,
        "out of range for UINT8",
    ),
    # shapes
    "element count": (
        lambda: raw({"inputs": [tensor(data=[0.0] * 5)]}),
        422,
        "has 6 elements, data has 5",
    ),
    "nested shape": (
        lambda: raw({"inputs": [tensor(data=[[0] * 3] * 2)]}),
        422,
        "nested data of shape [2, 3]",
    ),
    "ragged": (
        lambda: raw({"inputs": [tensor(shape=[2, 3], data=[[0] * 3, [0] * 2])]}),
        422,
        "rectangular",
    ),
    "negative dim": (
        lambda: raw({"inputs": [tensor(shape=[1, -2, 3], data=[])]}),
        422,
        "sizes >= 0",
    ),
    "features": (
        lambda: v2_body([("inputs", "FP32", np.zeros((1, 2, 4), np.float32))]),
        422,
        "has shape [-1, -1, 3]",
    ),
    "rank": (lambda: v2_body([("inputs", "FP32", X[0])]), 422, "has shape [-1, -1, 3]"),
    "mask shape": (
        lambda: v2_body([("inputs", "FP32", X), ("mask", "BOOL", [[True] * 3])]),
        422,
        "to match inputs",
    ),
    "sequence batch": (
        lambda: v2_body(
            [("inputs", "FP32", np.zeros((2, 1, 3), np.float32))],
            {"sequence_id": 4, "sequence_start": True},
        ),
        422,
        "batch size 1",
    ),
    # names and structure
    "unknown input": (
        lambda: v2_body([("inputs", "FP32", X), ("x", "FP32", X)]),
        422,
        "has no input 'x'",
    ),
    "missing input": (
        lambda: v2_body([("mask", "BOOL", [[True, True]])]),
        422,
        "required input 'inputs' is missing",
    ),
    "duplicate input": (lambda: v2_body([("inputs", "FP32", X)] * 2), 422, "given twice"),
    "no inputs": (lambda: raw({"inputs": []}), 422, "non-empty list"),
    "not an object": (lambda: (b"[1, 2]", {}), 422, "expected a JSON object"),
    "unknown field": (lambda: raw({"inputs": [], "input": 1}), 422, "unknown field"),
    "invalid JSON": (lambda: (b'{"inputs": ', {}), 422, "not valid JSON"),
    "unknown output": (
        lambda: v2_body([("inputs", "FP32", X)], outputs=["y"]),
        422,
        "has no output 'y'",
    ),
    "classification": (
        lambda: v2_body(
            [("inputs", "FP32", X)],
            outputs=[{"name": "outputs", "parameters": {"classification": 2}}],
        ),
        422,
        "not supported",
    ),
    "shared memory": (
        lambda: raw({"inputs": [tensor(parameters={"shared_memory_region": "r"})]}),
        422,
        "shared memory",
    ),
    # sequence parameters
    "start without id": (lambda: json_x(sequence_start=True), 422, "non-zero sequence_id"),
    "flag not a bool": (
        lambda: json_x(sequence_id=5, sequence_start="yes"),
        422,
        "expected true or false",
    ),
    "float id": (lambda: json_x(sequence_id=1.5), 422, "uint64 or a string"),
    "bool id": (lambda: json_x(sequence_id=True), 422, "uint64 or a string"),
    "negative id": (lambda: json_x(sequence_id=-1), 422, "uint64"),
    "id above uint64": (
        lambda: (
            orjson.dumps({"inputs": [tensor(data=[0] * 6)]})[:-1]
            + b',"parameters":{"sequence_id":18446744073709551616}}',
            {},
        ),
        422,
        "uint64",
    ),
    "unknown sequence": (lambda: json_x(sequence_id=99), 404, "must set sequence_start=true"),
    "binary_data_output not a bool": (lambda: json_x(binary_data_output=1), 422, "true or false"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_malformed_request(v2: httpx.AsyncClient, case: str) -> None:
    build, status, fragment = CASES[case]
    content, headers = build()
    r = await v2.post("/v2/models/simple/infer", content=content, headers=headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == ["error"] and isinstance(body["error"], str)
    assert fragment in body["error"], body["error"]


async def test_transport_faults(v2: httpx.AsyncClient) -> None:
    content, _ = json_x()
    url = "/v2/models/simple/infer"
    r = await v2.post(url, content=content, headers={"Content-Encoding": "br"})
    assert r.status_code == 422 and "gzip or deflate" in r.json()["error"]
    bomb = gzip.compress(b" " * (4 << 20))  # 4 MiB of padding inflates past the 1 MiB limit
    r = await v2.post(url, content=bomb, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 413 and "inflated" in r.json()["error"]
    r = await v2.post(url, content=b"garbage", headers={"Content-Encoding": "gzip"})
    assert r.status_code == 422 and "cannot inflate" in r.json()["error"]
    cut = gzip.compress(content)[:-12]
    r = await v2.post(url, content=cut, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 422 and "truncated" in r.json()["error"]
    r = await v2.post("/v2/models/simple/versions/9/infer", content=content)
    assert r.status_code == 404 and "version 9" in r.json()["error"]
    r = await v2.post("/v2/models/nope/infer", content=content)
    assert r.status_code == 404 and "'nope' is not served" in r.json()["error"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the limit trips mid-body
        for _ in range(3):
            yield b"x" * (1 << 19)

    r = await v2.post(url, content=chunks())
    assert r.status_code == 413 and "above the limit" in r.json()["error"]


async def test_content_length_over_the_limit_in_v2_shape(v2: httpx.AsyncClient) -> None:
    r = await v2.post("/v2/models/simple/infer", content=b"x" * (2 << 20))
    assert r.status_code == 413 and isinstance(r.json()["error"], str)
