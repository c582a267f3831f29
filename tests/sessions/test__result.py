"""The stored form of a step's result: compact, exact, and tolerant of what it does not know."""

from __future__ import annotations

import numpy as np

from gruserve.sessions import _result


def test_round_trip_keeps_shapes_and_every_bit() -> None:
    rng = np.random.default_rng(3)
    outputs = [
        rng.normal(size=(3, 2)).astype(np.float32),
        rng.normal(size=(4,)).astype(np.float32),
        np.array(np.float32(1.5)).reshape(()),
        np.zeros((0, 5), np.float32),
    ]
    data = _result.pack(2**40, outputs)
    assert _result.base_of(data) == 2**40
    back = _result.unpack(data)
    assert [b.shape for b in back] == [o.shape for o in outputs]
    for got, want in zip(back, outputs, strict=True):
        assert got.dtype == np.float32 and got.tobytes() == want.tobytes()
    # header 10 bytes + per output 1 + 4 x ndim + the values: no JSON, no names
    assert len(data) == 10 + (1 + 8) + (1 + 4) + 1 + (1 + 8) + 4 * (6 + 4 + 1)


def test_non_contiguous_and_other_dtypes_are_stored_as_float32() -> None:
    x = np.arange(12, dtype=np.float64).reshape(3, 4)[:, ::2]
    (back,) = _result.unpack(_result.pack(0, [x]))
    np.testing.assert_array_equal(back, x.astype(np.float32))


def test_nothing_stored_or_an_unknown_format_answers_no_base() -> None:
    assert _result.base_of(None) is None and _result.base_of(b"") is None
    data = bytearray(_result.pack(5, [np.ones(2, np.float32)]))
    data[0] = 99  # a format a later gruserve might write
    assert _result.base_of(bytes(data)) is None
    assert _result.base_of(b"\x01abc") is None  # too short to be one
