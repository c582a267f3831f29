"""The gRPC message codec: the raw-contents shortcut decodes and refuses as the general path."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from gruserve.api.v2 import grpc_codec
from gruserve.errors import InvalidInput

Tensor = pb.ModelInferRequest.InferInputTensor


def _request(tensor: Any, raw: bytes, **parameters: Any) -> Any:
    request = pb.ModelInferRequest(model_name="m", inputs=[tensor], raw_input_contents=[raw])
    for key, value in parameters.items():
        grpc_codec.set_parameter(request.parameters[key], value)
    return request


@pytest.mark.parametrize(
    ("datatype", "dtype", "shape"),
    [
        ("FP32", np.float32, [1, 1, 3]),
        ("INT64", np.int64, [2, 5]),
        ("FP64", np.float64, [4]),
        ("FP32", np.float32, [0, 3]),
    ],
)
def test_raw_contents_decode_as_the_general_path_decodes(
    datatype: str, dtype: Any, shape: list[int]
) -> None:
    values = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape) * 3 - 2
    raw = values.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    fast = _request(Tensor(name="x", datatype=datatype, shape=shape), raw, sequence_id=7)
    # a tensor parameter sends the same tensor down the general path (decode_input)
    general = _request(Tensor(name="x", datatype=datatype, shape=shape), raw, sequence_id=7)
    general.inputs[0].parameters["note"].string_param = "general path"
    a, b = grpc_codec.parse(fast), grpc_codec.parse(general)
    assert grpc_codec._raw_tensor("inputs[0]", fast.inputs[0], raw) is not None
    assert grpc_codec._raw_tensor("inputs[0]", general.inputs[0], raw) is None
    for got in (a, b):
        (tensor,) = got.inputs
        assert (tensor.name, tensor.datatype, tensor.field) == ("x", datatype, "inputs[0]")
        assert tensor.array.dtype == np.dtype(dtype) and tensor.array.shape == tuple(shape)
        np.testing.assert_array_equal(tensor.array, values)
        assert got.parameters == {"sequence_id": 7}
        assert (got.id, got.outputs) == (None, None)


def _refused(tensor: Any, raw: bytes) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        grpc_codec.parse(_request(tensor, raw))
    return info.value


def test_what_the_shortcut_leaves_is_refused_with_the_general_message() -> None:
    three = np.zeros(3, np.float32).tobytes()
    short = _refused(Tensor(name="x", datatype="FP32", shape=[1, 1, 3]), three[:8])
    assert short.field == "raw_input_contents[0]"
    assert "takes 12 bytes, got 8" in str(short)
    negative = _refused(Tensor(name="x", datatype="FP32", shape=[-1, 3]), three)
    assert negative.field == "inputs[0].shape"
    deep = _refused(Tensor(name="x", datatype="FP32", shape=[1] * 8 + [3]), three)
    assert deep.field == "inputs[0].shape"
    unnamed = _refused(Tensor(name="", datatype="FP32", shape=[3]), three)
    assert unnamed.field == "inputs[0].name"
    unknown = _refused(Tensor(name="x", datatype="FP24", shape=[3]), three)
    assert unknown.field == "inputs[0].datatype"
    bf16 = _refused(Tensor(name="x", datatype="BF16", shape=[3]), three[:6])
    assert bf16.field == "inputs[0].datatype" and "takes no BF16" in str(bf16)
    # BOOL bytes are checked (0 or 1) by the general path only
    flag = Tensor(name="x", datatype="BOOL", shape=[3])
    assert grpc_codec._raw_tensor("inputs[0]", flag, bytes([0, 1, 1])) is None
    not_a_flag = _refused(flag, bytes([0, 1, 2]))
    assert not_a_flag.field == "raw_input_contents[0]"
    assert "BOOL bytes must be 0 or 1" in str(not_a_flag), str(not_a_flag)
    both = Tensor(name="x", datatype="FP32", shape=[3])
    both.contents.fp32_contents.extend([1.0, 2.0, 3.0])
    assert _refused(both, three).field == "inputs[0].contents"


def test_a_reply_written_into_a_stream_message_is_the_reply() -> None:
    big_endian = np.array([[1.5, -2.0]], np.dtype(">f4"))
    outputs: list[tuple[str, np.ndarray, bool]] = [
        ("outputs", big_endian, True),
        ("count", np.array([3], np.int64), True),
    ]
    about = {"sequence_id": 9, "session_id": "v2:m:9", "step": 4}
    alone = grpc_codec.reply("m", 2, "r-1", outputs, about)
    stream = pb.ModelStreamInferResponse()
    grpc_codec.reply("m", 2, "r-1", outputs, about, into=stream.infer_response)
    assert stream.infer_response == alone
    assert (alone.model_name, alone.model_version, alone.id) == ("m", "2", "r-1")
    assert grpc_codec.parameters_of(alone.parameters) == about
    assert [(o.name, o.datatype, list(o.shape)) for o in alone.outputs] == [
        ("outputs", "FP32", [1, 2]),
        ("count", "INT64", [1]),
    ]
    assert alone.raw_output_contents[0] == np.array([1.5, -2.0], "<f4").tobytes()
    assert alone.raw_output_contents[1] == np.array([3], "<i8").tobytes()
