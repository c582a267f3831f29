"""The Triton-style model configuration served at ``GET /v2/models/{m}/config``.

Triton tools (client libraries, perf_analyzer, model_analyzer) read a model's
config to learn how it batches and whether it is stateful. gruserve answers with
the config Triton would hold for the same ONNX model on its ONNX Runtime backend,
written as Triton's own JSON (protobuf field names, ``TYPE_*`` datatypes):

- ``max_batch_size`` > 0, so every ``dims`` leaves out the batch axis; a dynamic
  time axis is -1. It is the model's batcher size (steps of different sessions per
  run); a stateless request may still carry more sequences.
- ``sequence_batching`` (not ``dynamic_batching``: Triton's config allows one
  scheduler) declares the model stateful. Its ``oldest`` strategy is what the
  batcher does, batching the next step of many sequences within
  ``max_queue_delay_microseconds``; ``max_sequence_idle_microseconds`` is the
  session TTL; each recurrent state is a ``state`` entry (Triton's implicit
  state) pairing ``initial_state/<key>`` with ``final_state/<key>``, starting at
  zeros. No control inputs: the start / end flags travel as request parameters.
"""

from __future__ import annotations

from typing import Any

from gruserve.api.v2.model import TensorSpec, WireModel

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
_TYPES = {"FP32": "TYPE_FP32", "INT64": "TYPE_INT64", "BOOL": "TYPE_BOOL"}


def _dims(spec: TensorSpec) -> list[int]:
    return list(spec.shape[1:])  # without the batch axis, as max_batch_size > 0 implies


def _input(spec: TensorSpec, optional: bool) -> dict[str, Any]:
    return {
        "name": spec.name,
        "data_type": _TYPES[spec.datatype],
        "format": "FORMAT_NONE",
        "dims": _dims(spec),
        "is_shape_tensor": False,
        "allow_ragged_batch": False,
        "optional": optional,
    }


def _output(spec: TensorSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "data_type": _TYPES[spec.datatype],
        "dims": _dims(spec),
        "label_filename": "",
        "is_shape_tensor": False,
    }


def _state(initial: TensorSpec, final: TensorSpec) -> dict[str, Any]:
    return {
        "input_name": initial.name,
        "output_name": final.name,
        "data_type": _TYPES[initial.datatype],
        "dims": _dims(initial),
        "initial_state": [
            {
                "name": "zeros",
                "data_type": _TYPES[initial.datatype],
                "dims": _dims(initial),
                "zero_data": True,
            }
        ],
        "use_same_buffer_for_input_output": False,
        "use_growable_memory": False,
    }


def model_config(
    wire: WireModel,
    *,
    max_batch_size: int,
    max_delay_s: float,
    session_ttl_s: float,
    max_sessions: int,
    provider: str,
) -> dict[str, Any]:
    """Triton's ``ModelConfig`` JSON for ``wire``.

    Args:
        max_batch_size, max_delay_s: the model's batcher.
        session_ttl_s: idle seconds before a session (sequence) expires.
        max_sessions: sessions the store holds at most.
        provider: ``cpu`` or ``cuda``, where onnxruntime runs the model.
    """
    return {
        "name": wire.name,
        "platform": PLATFORM,
        "backend": BACKEND,
        "version_policy": {"specific": {"versions": [wire.version]}},
        "max_batch_size": max_batch_size,
        "input": [_input(wire.values, optional=False), _input(wire.mask, optional=True)],
        "output": [_output(o) for o in wire.outputs],
        "sequence_batching": {
            "max_sequence_idle_microseconds": round(session_ttl_s * 1e6),
            "control_input": [],
            "state": [
                _state(i, f) for i, f in zip(wire.initial_states, wire.final_states, strict=True)
            ],
            "oldest": {
                "max_candidate_sequences": max_sessions,
                "preferred_batch_size": [max_batch_size],
                "max_queue_delay_microseconds": round(max_delay_s * 1e6),
                "preserve_ordering": True,
            },
        },
        "instance_group": [
            {
                "name": f"{wire.name}_0",
                "kind": "KIND_GPU" if provider == "cuda" else "KIND_CPU",
                "count": 1,
            }
        ],
        "default_model_filename": "model.onnx",
        "model_transaction_policy": {"decoupled": False},
    }
