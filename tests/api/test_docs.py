"""The OpenAPI schema and the docs pages (api/docs.py), up to a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Served, free_port, serve
from test_server import BIN, _env, _start, _stop

KEY = "docs-test-key"
HTTP_METHODS = {"get", "post", "put", "delete", "patch"}


@pytest.fixture
async def guarded(models_dir: Path, tiny_models: dict[str, Any]) -> AsyncIterator[Served]:
    async for s in serve(models_dir, api_keys=KEY):
        yield s


async def test_the_schema_says_what_the_routes_take(guarded: Served) -> None:
    schema = (await guarded.client.get("/openapi.json")).json()
    names = set(schema["components"]["schemas"])
    assert not [n for n in names if "__" in n], names  # no module-qualified names
    assert "$defs" not in json.dumps(schema)  # every reference resolves in the document
    assert {"ErrorResponse", "V2ErrorResponse"} <= names
    operations = {
        (method, path): op
        for path, ops in schema["paths"].items()
        for method, op in ops.items()
        if method in HTTP_METHODS
    }
    versions = [
        p
        for op in operations.values()
        for p in op.get("parameters", [])
        if p["name"] == "version" and p["in"] == "path"
    ]
    assert len(versions) == 4 and all(p["schema"]["type"] == "integer" for p in versions)
    # every field of these bodies is optional, and the routes take no body at all
    for route in ("/v1/models/{model}/sessions", "/v1/sessions/{session_id}/reset"):
        assert operations["post", route]["requestBody"]["required"] is False
    assert operations["post", "/v1/sessions/{session_id}/step"]["requestBody"]["required"]
    # keys: both ways declared, every operation secured but the probes
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert schema["components"]["securitySchemes"]["apiKey"]["name"] == "X-API-Key"
    open_ = {path for (_, path), op in operations.items() if op.get("security") == []}
    assert open_ == {"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"}
    assert "/v1/sessions/{session_id}/ws" in schema["info"]["description"]


async def test_the_schema_matches_the_routes(guarded: Served) -> None:
    """What the schema calls optional or integer is what the server takes."""
    headers = {"x-api-key": KEY}
    created = await guarded.client.post("/v1/models/simple/sessions", headers=headers)
    assert created.status_code == 201  # no body at all
    sid = created.json()["session_id"]
    reset = await guarded.client.post(f"/v1/sessions/{sid}/reset", headers=headers)
    assert reset.status_code == 200
    version = (await guarded.client.get("/v2/models/simple", headers=headers)).json()["versions"]
    ready = await guarded.client.get(
        f"/v2/models/simple/versions/{version[0]}/ready", headers=headers
    )
    assert ready.status_code == 200
    for probe in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
        assert (await guarded.client.get(probe)).status_code == 200, probe


async def test_the_pages_load_nothing_from_elsewhere(guarded: Served) -> None:
    for page in ("/docs", "/redoc"):
        html = (await guarded.client.get(page)).text
        sources = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert sources and all(s.startswith("/docs/assets/") for s in sources), sources
        for source in sources:
            asset = await guarded.client.get(source)
            assert asset.status_code == 200 and len(asset.content) > 1000, source


# -- a real browser -----------------------------------------------------------------------------
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found is not None:
            return found
    pytest.skip("chromium is not installed (Debian: apt-get install chromium)")


@pytest.fixture
def keyed_server(models_dir: Path, tiny_models: dict[str, Any], tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = _start(
        [str(BIN / "gruserve"), "serve", "--port", str(port)],
        _env(models_dir, GRUSERVE_API_KEYS=KEY),
        port,
        tmp_path,
    )
    yield f"http://127.0.0.1:{port}"
    _stop(proc)


def _rendered(chromium: str, url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran (virtual time: no wall-clock wait to guess)."""
    result = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",  # tests run as root here
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={profile}",
            # offline: any host but the test server fails to resolve (no CDN to fall back to)
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            "--virtual-time-budget=30000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_swagger_ui_lists_every_operation_in_chromium(keyed_server: str, tmp_path: Path) -> None:
    import httpx

    chromium = _chromium()
    schema = httpx.get(f"{keyed_server}/openapi.json", timeout=10).json()
    expected = {
        (method.upper(), path)
        for path, ops in schema["paths"].items()
        for method in ops
        if method in HTTP_METHODS
    }
    dom = _rendered(chromium, f"{keyed_server}/docs", tmp_path / "profile")
    listed = set(
        re.findall(r'class="opblock-summary-method">(\w+)</span>.*?data-path="([^"]+)"', dom, re.S)
    )
    assert listed == expected
    assert "btn authorize" in dom  # the key schemes are declared: the Authorize button
    assert "/v1/sessions/{session_id}/ws" in dom  # the WebSocket route, in the description

    redoc = _rendered(chromium, f"{keyed_server}/redoc", tmp_path / "profile")
    assert "/v1/sessions/{session_id}/step" in redoc and "Authorization" in redoc
