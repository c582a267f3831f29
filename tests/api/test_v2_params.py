"""How v2 sequence parameters map to sessions: ids never collide across kinds or models."""

from __future__ import annotations

import pytest

from gruserve.api.v2.params import UINT64_MAX, flag, sequence_control, session_id_for
from gruserve.errors import InvalidInput
from gruserve.sessions.service import SESSION_ID


def test_numbers_strings_and_models_get_distinct_readable_session_ids() -> None:
    ids = {
        session_id_for("demo", 42): "v2:demo:42",
        session_id_for("demo", "42"): "v2:demo:s:42",
        session_id_for("other", 42): "v2:other:42",
        session_id_for("demo", UINT64_MAX): f"v2:demo:{UINT64_MAX}",
        session_id_for("demo", "user-7:a.b_c"): "v2:demo:s:user-7:a.b_c",
    }
    for got, want in ids.items():
        assert got == want and SESSION_ID.match(got)


def test_other_strings_are_hashed_into_valid_session_ids() -> None:
    odd = ["a b", "é", "x/y", "a" * 200, "s:42"]
    mapped = [session_id_for("m" * 64, s) for s in odd]
    assert all(SESSION_ID.match(m) for m in mapped)
    assert len(set(mapped)) == len(odd)
    assert mapped[0].startswith("v2:" + "m" * 64 + ":h:") and mapped[0] != session_id_for(
        "m", "a b"
    )
    assert session_id_for("m", "s:42") == "v2:m:s:s:42"  # readable, and still not "42"


def test_sequence_control() -> None:
    assert sequence_control({}, "m") is None
    assert sequence_control({"sequence_id": 0}, "m") is None
    assert sequence_control({"sequence_id": ""}, "m") is None
    control = sequence_control({"sequence_id": 9, "sequence_end": True}, "m")
    assert control is not None
    assert (control.session_id, control.start, control.end) == ("v2:m:9", False, True)
    for bad in (
        {"sequence_id": UINT64_MAX + 1},
        {"sequence_id": None},
        {"sequence_id": [1]},
        {"sequence_end": True},
        {"sequence_id": 1, "sequence_end": 1},
    ):
        with pytest.raises(InvalidInput):
            sequence_control(bad, "m")
    assert flag({"binary_data_output": True}, "binary_data_output")
    assert not flag({}, "binary_data_output")
