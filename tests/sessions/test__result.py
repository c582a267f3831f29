"""The stored form of a step's result: compact, exact, and tolerant of what it does not know."""

from __future__ import annotations

import struct

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
    applied = bytes(range(16))
    data = _result.pack(2**40, outputs, applied)
    assert _result.base_of(data) == 2**40 and _result.digest_of(data) == applied
    back = _result.unpack(data)
    assert [b.shape for b in back] == [o.shape for o in outputs]
    for got, want in zip(back, outputs, strict=True):
        assert got.dtype == np.float32 and got.tobytes() == want.tobytes()
    # header 26 bytes (10 + the digest) + per output 1 + 4 x ndim + the values: no JSON
    assert len(data) == 26 + (1 + 8) + (1 + 4) + 1 + (1 + 8) + 4 * (6 + 4 + 1)


def test_non_contiguous_and_other_dtypes_are_stored_as_float32() -> None:
    x = np.arange(12, dtype=np.float64).reshape(3, 4)[:, ::2]
    (back,) = _result.unpack(_result.pack(0, [x], bytes(16)))
    np.testing.assert_array_equal(back, x.astype(np.float32))


def test_nothing_stored_or_an_unknown_format_answers_no_base() -> None:
    assert _result.base_of(None) is None and _result.base_of(b"") is None
    data = bytearray(_result.pack(5, [np.ones(2, np.float32)], bytes(16)))
    data[0] = 99  # a format a later gruserve might write
    assert _result.base_of(bytes(data)) is None
    assert _result.base_of(b"\x01abc") is None  # too short to be one


def test_a_result_kept_before_digests_still_answers() -> None:
    """Format 1 (no digest field), as records written by an older server hold it: its base
    and outputs read as before, and it has no digest to compare (the resend is trusted)."""
    old = (
        struct.pack("<BQB", 1, 7, 1)
        + struct.pack("<BI", 1, 2)
        + np.array([1, 2], np.float32).tobytes()
    )
    assert _result.base_of(old) == 7 and _result.digest_of(old) is None
    assert [a.tolist() for a in _result.unpack(old)] == [[1.0, 2.0]]


def test_the_digest_tells_payloads_apart() -> None:
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    base = _result.digest(x, None, False)
    assert len(base) == 16 and base == _result.digest(x.copy(), np.ones(3, np.bool_), False)
    others = [
        _result.digest(x + np.float32(1e-6) * (x == 5), None, False),  # one value
        _result.digest(x, np.array([True, False, True]), False),  # the mask
        _result.digest(x.reshape(2, 3), None, False),  # the layout
        _result.digest(x, None, True),  # sent without a time axis
        _result.digest(x.astype(np.int64), None, False),  # token ids vs values
    ]
    assert base not in others and len(set(others)) == len(others)
