"""Structure of the exported graphs: which strategy, which attributes, which runtimes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from gruserve.export.model_graph import build_model_graph
from gruserve.export.recurrent import gru_node_names
from gruserve.layers import ModelSpec


def _spec(*layers: dict, shape: tuple = (None, 3)) -> ModelSpec:  # type: ignore[type-arg]
    configs = [{"class_name": "InputLayer", "config": {"batch_shape": [None, *shape]}}, *layers]
    return ModelSpec.from_layer_configs("m", configs)


def _weights(spec: ModelSpec, rng: np.random.Generator) -> dict:  # type: ignore[type-arg]
    return {
        layer: {k: rng.normal(size=s).astype(np.float32) * 0.3 for k, s in shapes.items()}
        for layer, shapes in spec.weight_shapes().items()
    }


def _ops(model: onnx.ModelProto) -> list[str]:
    found: list[str] = []

    def visit(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            found.append(node.op_type)
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)

    visit(model.graph)
    return found


def gru(**config: object) -> dict:  # type: ignore[type-arg]
    return {"class_name": "GRU", "config": {"name": "gru", "units": 4, **config}}


def test_default_gru_is_native_and_cudnn_eligible(rng: np.random.Generator) -> None:
    spec = _spec(gru())
    built = build_model_graph(spec, _weights(spec, rng))
    assert built.layers["gru"].strategy == "native" and built.layers["gru"].cudnn_eligible
    (node,) = gru_node_names(built.model)
    # cuDNN conditions of onnxruntime's CUDA EP: default activations, no alpha/beta/clip, layout 0.
    assert "activations" not in node and "activation_alpha" not in node and "clip" not in node
    assert node["linear_before_reset"] == 1 and node["layout"] == 0
    assert {"If", "Scan", "GRU"} <= set(_ops(built.model))  # holes fall back to the loop


@pytest.mark.parametrize(
    "config, strategy, cudnn",
    [
        ({"reset_after": False}, "native", False),
        ({"recurrent_activation": "hard_sigmoid"}, "native", False),
        ({"activation": "gelu"}, "loop", False),
        ({"unroll": True}, "unrolled", False),
    ],
)
def test_strategies(config: dict, strategy: str, cudnn: bool, rng: np.random.Generator) -> None:  # type: ignore[type-arg]
    spec = _spec(gru(**config), shape=(5, 3))
    built = build_model_graph(spec, _weights(spec, rng))
    assert built.layers["gru"].strategy == strategy and built.layers["gru"].cudnn_eligible is cudnn
    ops = _ops(built.model)
    for node in gru_node_names(built.model):
        assert "linear_before_reset" in node  # always written, also when 0
    if strategy == "loop":
        assert "Scan" in ops and "GRU" not in ops
    if strategy == "unrolled":
        assert "Scan" not in ops and "GRU" not in ops and ops.count("Tanh") == 5
        assert built.static_timesteps == 5


def test_go_backwards_reverses_within_lengths(rng: np.random.Generator) -> None:
    """No direction="reverse": onnxruntime's CUDA kernel reverses the padded axis for it."""
    spec = _spec(gru(go_backwards=True, return_sequences=True))
    built = build_model_graph(spec, _weights(spec, rng))
    assert [n["direction"] for n in gru_node_names(built.model)] == [b"forward"]
    assert _ops(built.model).count("ReverseSequence") == 2
    assert built.layers["gru"].cudnn_eligible


def test_unroll_needs_fixed_timesteps(rng: np.random.Generator) -> None:
    spec = _spec(gru(unroll=True))
    from gruserve.errors import ExportError

    with pytest.raises(ExportError, match="fixed number of timesteps"):
        build_model_graph(spec, _weights(spec, rng))


def test_bidirectional_uses_one_node(rng: np.random.Generator) -> None:
    spec = _spec(
        {
            "class_name": "Bidirectional",
            "config": {"name": "bi", "layer": gru(return_sequences=True)},
        }
    )
    built = build_model_graph(spec, _weights(spec, rng))
    nodes = gru_node_names(built.model)
    assert [n["direction"] for n in nodes] == [b"bidirectional"]
    assert built.layers["bi"].cudnn_eligible


def test_ir_version_and_checker(rng: np.random.Generator) -> None:
    spec = _spec(
        gru(activation="mish", return_sequences=True),
        {"class_name": "Dense", "config": {"units": 2}},
    )
    built = build_model_graph(spec, _weights(spec, rng))
    assert built.model.ir_version <= 10  # onnxruntime 1.31 reads IR <= 13
    onnx.checker.check_model(built.model, full_check=True)
    names = [i.name for i in built.model.graph.input]
    assert names == ["inputs", "mask", "initial_state/gru"]
    assert [o.name for o in built.model.graph.output] == ["outputs", "final_state/gru"]


def test_weights_are_stored_once_in_keras_layout(rng: np.random.Generator) -> None:
    spec = _spec(gru(units=8))
    built = build_model_graph(spec, _weights(spec, rng))
    shapes = {
        i.name: tuple(i.dims) for i in built.model.graph.initializer if i.name.startswith("gru/")
    }
    assert shapes == {"gru/kernel": (3, 24), "gru/recurrent_kernel": (8, 24), "gru/bias": (2, 24)}


@pytest.mark.cuda
@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(),
    reason="onnxruntime-gpu and a GPU are needed",
)
@pytest.mark.parametrize(
    "config",
    [
        {},
        {"go_backwards": True, "return_sequences": True},
        {"activation": "gelu"},
        {"reset_after": False},
    ],
)
def test_cuda_execution_provider_matches_cpu(config: dict, rng: np.random.Generator) -> None:  # type: ignore[type-arg]
    """The same graph on CUDA (cuDNN where eligible) gives the CPU's numbers, masks included."""
    spec = _spec(gru(**config, return_state=True))
    model = build_model_graph(spec, _weights(spec, rng)).model.SerializeToString()
    cpu = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    cuda = ort.InferenceSession(model, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    x = rng.normal(size=(5, 9, 3)).astype(np.float32)
    mask = np.arange(9)[None, :] < np.array([9, 7, 3, 1, 0])[:, None]
    holes = mask.copy()
    holes[0, 4] = False
    for m in (np.ones_like(mask), mask, holes):
        feeds = {
            "inputs": x,
            "mask": m,
            "initial_state/gru": rng.normal(size=(5, 4)).astype(np.float32),
        }
        for a, b in zip(cpu.run(None, feeds), cuda.run(None, feeds), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
