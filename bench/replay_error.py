"""What an upgrade with ``replay: W`` costs in accuracy, on the bundled demo model.

    python -m bench.replay_error [--steps 500] [--after 20] [--scale 0.2]

A session streams ``--steps`` yearly sunspot numbers (the demo's input: the bundled
series, 309 years, cycled to make a long stream) on version 1 of the demo, is moved to
version 2 with ``POST /v1/sessions/{id}/upgrade`` and ``replay: W``, then steps
``--after`` more years. Its outputs are compared with those of the same session replayed
in full on version 2: a session created on version 2 that streamed every year from the
start (what ``replay: all`` gives too). The error (max abs and RMS, in sunspot numbers,
the demo's output unit) is what a W-step replay leaves over a full one. Five streams start
at different phases of the series (offsets 0, 60, 120, 180, 240 years) and the figures
cover all of them.

Version 2 is version 1 with perturbed weights: every weight multiplied by
``1 + scale * N(0, 1)`` (seed 2), exported by the production exporter with version 1's
preprocessing; a retrained model differs from its predecessor in the same way (weights
near the old ones, same inputs and outputs). The server is the production app
(``create_app``, memory store, ``GRUSERVE_SESSION_HISTORY`` = the whole stream) called in
process over ASGI: the numbers do not depend on the transport or the machine's speed.

Writes ``bench/replay_error.json`` and ``bench/replay_error.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx

from gruserve.export.exporter import export_model
from gruserve.keras_io.writer import onnx_weights, spec_of_manifest
from gruserve.manifest import Manifest
from gruserve.server import create_app
from gruserve.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "demo" / "1"
SERIES = REPO / "service" / "gruserve" / "train" / "demo" / "sunspots.csv"
OFFSETS = (0, 60, 120, 180, 240)
WINDOWS: tuple[int | str, ...] = (0, 8, 16, 32, 128, "all")  # 16: where the error vanishes


def make_repository(root: Path, scale: float) -> Path:
    """``root/demo/{1,2}``: the bundled demo and its perturbed version 2."""
    shutil.copytree(DEMO, root / "demo" / "1")
    manifest = Manifest.read(DEMO / "model.json")
    spec = spec_of_manifest(manifest)
    weights = onnx_weights(onnx.load(str(DEMO / manifest.onnx_file)), spec)
    rng = np.random.default_rng(2)
    perturbed = {
        layer: {
            path: (w * (1 + scale * rng.normal(size=w.shape))).astype(np.float32)
            for path, w in values.items()
        }
        for layer, values in weights.items()
    }
    export_model(
        spec,
        perturbed,
        models_dir=root,
        name="demo",
        version=2,
        source={"kind": "bench/replay_error.py", "perturbed": "demo v1", "scale": scale},
        preprocessing=manifest.preprocessing,
    )
    return root


def series() -> np.ndarray:
    with SERIES.open() as f:
        return np.array([float(row["SUNACTIVITY"]) for row in csv.DictReader(f)], np.float32)


async def _post(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = await client.post(path, json=body)
    if r.status_code not in (200, 201):
        raise RuntimeError(f"{path}: {r.status_code} {r.text}")
    return dict(r.json())


async def _stream(client: httpx.AsyncClient, sid: str, xs: np.ndarray, version: int) -> None:
    await _post(client, "/v1/models/demo/sessions", {"session_id": sid, "version": version})
    for start in range(0, len(xs), 100):
        chunk = xs[start : start + 100, None]
        await _post(client, f"/v1/sessions/{sid}/step", {"inputs": chunk.tolist()})


async def measure(repo: Path, steps: int, after: int) -> dict[str, Any]:
    settings = Settings(
        _env_file=None,
        models_dir=repo,
        provider="cpu",
        session_history=steps,
        grpc_port=0,
        model_version_policy={"demo": "all"},
    )
    app = create_app(settings)
    years = series()
    errors: dict[str, list[np.ndarray]] = {str(w): [] for w in WINDOWS}
    scale: list[np.ndarray] = []
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            for offset in OFFSETS:
                stream = np.resize(np.roll(years, -offset), steps + after)
                head, tail = stream[:steps], stream[steps:, None].tolist()
                await _stream(client, f"full-{offset}", head, 2)
                full = await _post(client, f"/v1/sessions/full-{offset}/step", {"inputs": tail})
                want = np.asarray(full["outputs"], np.float64)[:, 0]
                scale.append(want)
                for w in WINDOWS:
                    sid = f"w{w}-{offset}"
                    await _stream(client, sid, head, 1)
                    replay = steps if w == "all" else w
                    moved = await _post(client, f"/v1/sessions/{sid}/upgrade", {"replay": replay})
                    if moved["version"] != 2 or moved["replayed"] != replay:
                        raise RuntimeError(f"unexpected upgrade reply {moved}")
                    got = await _post(client, f"/v1/sessions/{sid}/step", {"inputs": tail})
                    errors[str(w)].append(np.asarray(got["outputs"], np.float64)[:, 0] - want)
    rows = []
    for w in WINDOWS:
        e = np.stack(errors[str(w)])  # (streams, after)
        rows.append(
            {
                "replay": w,
                "max_abs": float(np.abs(e).max()),
                "rms": float(np.sqrt((e**2).mean())),
                "abs_by_step": np.abs(e).max(axis=0).tolist(),
            }
        )
    return {
        "steps": steps,
        "after": after,
        "offsets": list(OFFSETS),
        "output_rms": float(np.sqrt((np.concatenate(scale) ** 2).mean())),
        "rows": rows,
    }


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    x = np.arange(1, result["after"] + 1)
    floor = 1e-7  # a log axis cannot show 0 (replay: all matches to float32 rounding)
    for row in result["rows"]:
        y = np.maximum(np.asarray(row["abs_by_step"]), floor)
        ax.semilogy(x, y, marker="o", markersize=3, label=f"replay {row['replay']}")
    ax.set_xticks(x[::2] if len(x) > 10 else x)
    ax.set_xlabel("steps after the upgrade (replay all: exactly 0, drawn at 1e-7)")
    ax.set_ylabel("max |error| over 5 streams (sunspot number)")
    ax.set_title(f"demo v1 -> v2 after {result['steps']} steps: upgraded vs full replay on v2")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--after", type=int, default=20)
    parser.add_argument("--scale", type=float, default=0.2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "replay_error.json")
    args = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    with tempfile.TemporaryDirectory() as tmp:
        repo = make_repository(Path(tmp), args.scale)
        result = asyncio.run(measure(repo, args.steps, args.after))
    result["version_2"] = f"demo v1, every weight x (1 + {args.scale} N(0,1)), seed 2"
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    for row in result["rows"]:
        print(f"replay {row['replay']!s:>4}: max abs {row['max_abs']:.4g}  rms {row['rms']:.4g}")
    print(f"(outputs' RMS {result['output_rms']:.4g})")


if __name__ == "__main__":
    main()
