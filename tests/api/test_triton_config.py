"""The Triton-style config: stateful (sequence_batching, implicit states), dims without batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gruserve.api.v2.model import wire_model
from gruserve.api.v2.triton_config import model_config
from gruserve.runtime.registry import ModelRegistry


def config_of(models_dir: Path, name: str) -> dict[str, Any]:
    model = ModelRegistry.load(models_dir, ["CPUExecutionProvider"]).get(name)
    return model_config(
        wire_model(model),
        max_batch_size=16,
        max_delay_s=0.002,
        session_ttl_s=60.5,
        max_sessions=1000,
        provider=model.provider,
    )


def test_config_declares_a_stateful_batched_model(
    models_dir: Path, tiny_models: dict[str, Any]
) -> None:
    config = config_of(models_dir, "tokens")
    assert (config["platform"], config["backend"], config["max_batch_size"]) == (
        "onnxruntime_onnx",
        "onnxruntime",
        16,
    )
    assert "dynamic_batching" not in config  # Triton's config allows one scheduler
    assert [(i["name"], i["data_type"], i["dims"], i["optional"]) for i in config["input"]] == [
        ("inputs", "TYPE_INT64", [-1], False),
        ("mask", "TYPE_BOOL", [-1], True),
    ]
    assert [(o["name"], o["dims"]) for o in config["output"]] == [("outputs", [-1, 5])]
    sequence = config["sequence_batching"]
    assert sequence["max_sequence_idle_microseconds"] == 60_500_000
    assert sequence["oldest"]["max_queue_delay_microseconds"] == 2000
    (state,) = sequence["state"]
    assert (state["input_name"], state["output_name"], state["data_type"], state["dims"]) == (
        "initial_state/gru",
        "final_state/gru",
        "TYPE_FP32",
        [5],
    )
    assert state["initial_state"][0]["zero_data"] is True
    assert config["instance_group"][0]["kind"] == "KIND_CPU"


def test_one_output_per_sequence_has_no_time_dim(
    models_dir: Path, tiny_models: dict[str, Any]
) -> None:
    config = config_of(models_dir, "last_only")
    assert config["input"][0]["dims"] == [-1, 3] and config["output"][0]["dims"] == [2]
