"""``model.json``: the contract between the exporter and the server.

The exporter writes it next to ``model.onnx``; the server reads only these
two files. Nothing here imports onnx or torch, so the serving image can parse
manifests. ``format_version`` changes whenever a field changes meaning; a
server refuses versions newer than :data:`FORMAT_VERSION`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gruserve.errors import ManifestVersionError, RepositoryError

FORMAT_VERSION = 1
MANIFEST_FILE = "model.json"
ONNX_FILE = "model.onnx"


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output: dims are ints, or names for dynamic axes."""

    name: str
    dtype: str
    shape: list[int | str]


@dataclass(frozen=True)
class StateInfo:
    """One recurrent state: which graph input feeds it and which output returns it."""

    key: str
    layer: str
    path: str
    units: int
    input: str
    output: str


@dataclass(frozen=True)
class LayerInfo:
    """A layer's Keras config and, for recurrent layers, how it was exported."""

    name: str
    class_name: str
    config: dict[str, Any]
    export: dict[str, Any] | None = None


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    onnx_sha256: str
    opset: int
    ir_version: int
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    states: list[StateInfo]
    layers: list[LayerInfo]
    time_major: bool
    output_per_timestep: bool
    static_timesteps: int | None
    keras_version: int
    created_at: str
    producer: dict[str, str]
    parity: dict[str, Any]
    source: dict[str, Any] = field(default_factory=dict)
    model_config: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    batching: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    onnx_file: str = ONNX_FILE

    # -- convenience for the runtime -------------------------------------------------
    @property
    def input(self) -> TensorInfo:
        return self.inputs[0]

    @property
    def mask(self) -> TensorInfo:
        return self.inputs[1]

    @property
    def features(self) -> int | None:
        """Features per timestep, or None when the model takes token ids."""
        last = self.input.shape[-1]
        return last if self.input.dtype == "float32" and isinstance(last, int) else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model.json") -> Manifest:
        version = data.get("format_version")
        if not isinstance(version, int):
            raise RepositoryError(f"{where}: no integer format_version; not a gruserve manifest")
        if version > FORMAT_VERSION:
            raise ManifestVersionError(
                f"{where}: format_version {version} is newer than this gruserve understands "
                f"({FORMAT_VERSION}); upgrade gruserve or re-export the model"
            )
        try:
            return cls(
                **{
                    **data,
                    "inputs": [TensorInfo(**t) for t in data["inputs"]],
                    "outputs": [TensorInfo(**t) for t in data["outputs"]],
                    "states": [StateInfo(**s) for s in data["states"]],
                    "layers": [LayerInfo(**layer) for layer in data["layers"]],
                }
            )
        except (KeyError, TypeError) as exc:
            raise RepositoryError(f"{where}: malformed manifest ({exc})") from exc

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RepositoryError(f"{path}: cannot read manifest ({exc})") from exc
        if not isinstance(data, dict):
            raise RepositoryError(f"{path}: manifest must be a JSON object")
        return cls.from_dict(data, str(path))
