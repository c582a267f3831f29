"""What the exported graph costs over a bare ONNX GRU node with the same weights.

The exported graph adds what Keras semantics need around the operator: the
mask (an If that sends masks with holes to the Scan loop), Keras's restoring
of masked outputs, and explicit state outputs. This measures one onnxruntime
call for a single timestep (the serving case) and for 32 timesteps, at batch
1 and 64, for a default-config GRU (F=32, U=128).

Run: ``python -m bench.export_overhead`` (prints a Markdown table).
"""

from __future__ import annotations

import functools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from gruserve.export.exporter import export_model
from gruserve.layers import ModelSpec

FEATURES, UNITS = 32, 128


def exported_model(rng: np.random.Generator, models_dir: Path) -> tuple[ort.InferenceSession, dict]:  # type: ignore[type-arg]
    spec = ModelSpec.from_layer_configs(
        "bench",
        [
            {"class_name": "InputLayer", "config": {"batch_shape": [None, None, FEATURES]}},
            {
                "class_name": "GRU",
                "config": {"name": "gru", "units": UNITS, "return_sequences": True},
            },
        ],
    )
    weights = {
        "gru": {
            k: (rng.normal(size=s) * 0.1).astype(np.float32)
            for k, s in spec.weight_shapes()["gru"].items()
        }
    }
    result = export_model(spec, weights, models_dir=models_dir, name="bench")
    return _session(result.path / "model.onnx"), weights["gru"]


def bare_gru(weights: dict, path: Path) -> ort.InferenceSession:  # type: ignore[type-arg]
    """One GRU node, layout 0, same weights: the floor for any exporter."""
    w = weights["kernel"].T[None]
    r = weights["recurrent_kernel"].T[None]
    b = weights["bias"].reshape(1, -1)
    node = helper.make_node(
        "GRU",
        ["X", "W", "R", "B", "", "H0"],
        ["Y", "Y_h"],
        hidden_size=UNITS,
        linear_before_reset=1,
    )
    graph = helper.make_graph(
        [node],
        "bare",
        [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, ["T", "B", FEATURES]),
            helper.make_tensor_value_info("H0", TensorProto.FLOAT, [1, "B", UNITS]),
        ],
        [
            helper.make_tensor_value_info("Y", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("Y_h", TensorProto.FLOAT, None),
        ],
        initializer=[numpy_helper.from_array(a, n) for a, n in ((w, "W"), (r, "R"), (b, "B"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.save(model, path)
    return _session(path)


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _paired_medians(first, second, repeats: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Median µs of each, measured alternately so that machine noise hits both alike."""
    for _ in range(20):
        first()
        second()
    a: list[float] = []
    b: list[float] = []
    for _ in range(repeats):
        for run, samples in ((first, a), (second, b)):
            start = time.perf_counter()
            run()
            samples.append(time.perf_counter() - start)
    return statistics.median(a) * 1e6, statistics.median(b) * 1e6


def main() -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        exported, weights = exported_model(rng, Path(tmp))
        bare = bare_gru(weights, Path(tmp) / "bare.onnx")
        print(f"onnxruntime {ort.__version__}, CPU EP, 1 intra-op thread, F={FEATURES} U={UNITS}")
        print("| batch | timesteps | bare GRU node (µs) | exported model (µs) | ratio |")
        print("|---:|---:|---:|---:|---:|")
        for batch in (1, 64):
            for steps in (1, 32):
                x = rng.normal(size=(batch, steps, FEATURES)).astype(np.float32)
                h = np.zeros((batch, UNITS), np.float32)
                feeds = {"inputs": x, "mask": np.ones((batch, steps), bool), "initial_state/gru": h}
                bare_feeds = {"X": np.ascontiguousarray(x.transpose(1, 0, 2)), "H0": h[None]}
                repeats = 2000 if batch * steps < 256 else 300
                t_bare, t_exported = _paired_medians(
                    functools.partial(bare.run, None, bare_feeds),
                    functools.partial(exported.run, None, feeds),
                    repeats,
                )
                ratio = t_exported / t_bare
                print(f"| {batch} | {steps} | {t_bare:.1f} | {t_exported:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
