"""Writing a model into the repository: ``models/NAME/VERSION/{model.onnx,model.json}``.

Everything is built and verified in memory and in a hidden temporary folder
beside the target; only a finished, parity-checked version is renamed into
place, so a failed export leaves the repository exactly as it was.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from gruserve import __version__
from gruserve.errors import ExportError, ParityError, RepositoryError, WeightShapeError
from gruserve.export.model_graph import BuiltGraph, build_model_graph
from gruserve.export.parity import ATOL, RTOL, describe_failure, parity_report, unverified_report
from gruserve.layers.model import ModelSpec, is_recurrent
from gruserve.manifest import MANIFEST_FILE, ONNX_FILE, LayerInfo, Manifest, StateInfo, TensorInfo
from gruserve.repository import next_version, validate_model_name

DEFAULT_BATCHING = {"max_batch_size": 64, "max_delay_ms": 2.0}


@dataclass(frozen=True)
class ExportResult:
    path: Path
    manifest: Manifest


def check_weights(spec: ModelSpec, weights: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Every weight the spec implies is present with its Keras shape, and nothing else."""
    expected = spec.weight_shapes()
    for layer, shapes in expected.items():
        given = weights.get(layer, {})
        for key, shape in shapes.items():
            if key not in given:
                raise WeightShapeError(layer, f"missing weight {key!r} (expected shape {shape})")
            if tuple(np.shape(given[key])) != tuple(shape):
                raise WeightShapeError(
                    layer,
                    f"weight {key!r} has shape {tuple(np.shape(given[key]))}, expected {shape}",
                )
        extra = sorted(set(given) - set(shapes))
        if extra:
            raise WeightShapeError(layer, f"unexpected weights {extra}; expected {sorted(shapes)}")
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        raise WeightShapeError("model", f"weights for unknown layers {unknown}")


def export_model(
    spec: ModelSpec,
    weights: Mapping[str, Mapping[str, np.ndarray]],
    *,
    models_dir: Path,
    name: str,
    version: int | None = None,
    source: dict[str, Any] | None = None,
    preprocessing: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    reference: str = "auto",
    strategy: str = "auto",
    atol: float = ATOL,
    rtol: float = RTOL,
    verify: bool = True,
) -> ExportResult:
    """Build, verify and atomically write one model version.

    Args:
        strategy: ``auto`` (per layer, see
            :func:`~gruserve.export.recurrent.choose_strategy`), or ``native``,
            ``loop`` or ``unrolled`` forced on every recurrent layer. Under
            ``auto``, a graph with native GRU nodes that fails the check is
            rebuilt with the loop, which computes Keras's formulas exactly as
            written, and checked again.
        atol, rtol: the tolerance of the parity check
            (:mod:`gruserve.export.parity`).
        verify: ``False`` writes without the check; the manifest records
            the version as unverified.

    Raises:
        ExportError: the graph could not be built, or (ParityError) it
            disagrees with Keras's float64 math.
        RepositoryError: bad name, or the version already exists.
    """
    validate_model_name(name)
    check_weights(spec, weights)
    models_dir = Path(models_dir)
    model_dir = models_dir / name
    version = version if version is not None else next_version(model_dir)
    if version < 1:
        raise RepositoryError(f"version must be a positive integer, got {version}")
    target = model_dir / str(version)
    if target.exists():
        raise RepositoryError(f"{target} already exists; choose another --version")

    weights32 = {
        layer: {k: np.asarray(v, np.float32) for k, v in w.items()} for layer, w in weights.items()
    }
    built = build_model_graph(spec, weights32, strategy)
    onnx_bytes = built.model.SerializeToString()
    if not verify:
        parity = unverified_report("written with --no-verify")
    else:

        def check(graph: BuiltGraph, data: bytes) -> dict[str, Any]:
            return parity_report(
                spec,
                weights32,
                data,
                static_timesteps=graph.static_timesteps,
                reference=reference,
                atol=atol,
                rtol=rtol,
            )

        parity = check(built, onnx_bytes)
        if not parity["passed"] and strategy == "auto" and _has_native(built):
            retry = build_model_graph(spec, weights32, "loop")
            retry_bytes = retry.model.SerializeToString()
            retry_parity = check(retry, retry_bytes)
            if retry_parity["passed"]:
                for plan in retry.layers.values():
                    plan.notes.append("the native GRU node missed Keras's float64 result: loop")
                built, onnx_bytes, parity = retry, retry_bytes, retry_parity
        if not parity["passed"]:
            where = f"{(source or {}).get('path', name)} -> {target}"
            raise ParityError(
                f"{where}: the exported graph disagrees with Keras's math: "
                f"{describe_failure(parity)}; nothing was written "
                "(loosen --atol/--rtol, or write it anyway with --no-verify)"
            )
    manifest = _manifest(
        spec, built, onnx_bytes, name, version, parity, source, preprocessing, metrics
    )
    _write_atomically(target, {ONNX_FILE: onnx_bytes, MANIFEST_FILE: manifest.to_json().encode()})
    return ExportResult(target, manifest)


def _has_native(built: BuiltGraph) -> bool:
    return any("native" in plan.strategy for plan in built.layers.values())


def _manifest(
    spec, built, onnx_bytes, name, version, parity, source, preprocessing, metrics
) -> Manifest:  # type: ignore[no-untyped-def]
    sig = built.signature
    return Manifest(
        name=name,
        version=version,
        onnx_sha256=hashlib.sha256(onnx_bytes).hexdigest(),
        opset=built.model.opset_import[0].version,
        ir_version=built.model.ir_version,
        inputs=[TensorInfo(s.name, s.dtype, list(s.shape)) for s in sig.inputs],
        outputs=[TensorInfo(s.name, s.dtype, list(s.shape)) for s in sig.outputs],
        states=[
            StateInfo(s.key, s.layer, s.path, s.units, i.name, o.name)
            for s, i, o in zip(spec.states(), sig.state_inputs, sig.state_outputs, strict=True)
        ],
        layers=[
            LayerInfo(
                layer.name,
                layer.class_name,
                layer.to_config(),
                built.layers[layer.name].as_dict() if is_recurrent(layer) else None,
            )
            for layer in spec.layers
        ],
        time_major=spec.time_major,
        output_per_timestep=spec.returns_sequences(),
        static_timesteps=built.static_timesteps,
        keras_version=spec.keras_version,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        producer={"name": "gruserve", "version": __version__},
        parity=parity,
        source=dict(source or {}),
        model_config=spec.to_config(),
        preprocessing=preprocessing,
        metrics=dict(metrics or {}),
        batching=dict(DEFAULT_BATCHING),
    )


def _write_atomically(target: Path, files: dict[str, bytes]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        for filename, data in files.items():
            with open(staging / filename, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        staging.chmod(0o755)  # mkdtemp makes it 0700; a server running as another user must read it
        os.rename(staging, target)  # atomic on one filesystem; fails if target appeared meanwhile
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ExportError(f"could not write {target}: {exc}") from exc
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        _remove_empty(target.parent)


def _remove_empty(model_dir: Path) -> None:
    """Drop a model folder this export created but never filled."""
    try:
        if model_dir.is_dir() and not any(model_dir.iterdir()):
            model_dir.rmdir()
    except OSError:
        pass
