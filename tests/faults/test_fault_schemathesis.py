"""schemathesis against the app's own OpenAPI schema (v1 and v2), in process: thousands of
generated requests, valid and invalid, and not one answered with a 5xx.

Generated path parameters mostly name nothing (404), so each operation is also fuzzed
with real ones (a served model, a live session, version 1), which takes the generated
bodies and queries into the handlers. NDJSON bodies are serialised one JSON line per
generated object.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

import fixtures
from conftest import serving_settings
from gruserve.server import create_app

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.generation.modes import GenerationMode  # noqa: E402
from schemathesis.python import asgi  # noqa: E402

EXAMPLES = 60
MINIMUM = 2000
LIVE = {"model": "tokens", "session_id": "fuzzed", "version": "1"}  # ids in [0, 10): easy to hit


@schemathesis.serializer("application/x-ndjson")
def _ndjson(context: Any, value: Any) -> bytes:
    lines = value if isinstance(value, list) else [value]
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


@pytest.mark.slow
def test_no_generated_request_gets_a_server_error(
    models_dir: Path, tiny_models: dict[str, Any]
) -> None:
    app = create_app(serving_settings(models_dir, "memory", max_sessions=1000))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    wanted = {"POST /v1/sessions/{session_id}/step", "GET /v1/sessions",
              "POST /v2/models/{model}/infer", "POST /v1/sessions/{session_id}/stream"}  # fmt: skip
    assert wanted <= labels
    statuses: Counter[tuple[str, int]] = Counter()
    failures: list[str] = []

    with asgi.get_client(app) as client:

        def revive() -> None:  # a fuzzed DELETE or reset may have ended it
            client.delete(f"/v1/sessions/{LIVE['session_id']}")
            created = client.post(
                f"/v1/models/{LIVE['model']}/sessions", json={"session_id": LIVE["session_id"]}
            )
            assert created.status_code == 201, created.text

        for op in operations:
            live = {k: v for k, v in LIVE.items() if k in {p.name for p in op.path_parameters}}
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                for path_parameters in [None, live] if live else [None]:
                    revive()
                    strategy = op.as_strategy(mode, path_parameters=path_parameters)

                    @settings(
                        max_examples=EXAMPLES,
                        deadline=None,
                        database=None,
                        derandomize=True,
                        suppress_health_check=list(HealthCheck),
                        phases=[Phase.explicit, Phase.generate],
                    )
                    @given(case=strategy)
                    def call(case: Any) -> None:
                        response = case.call()
                        statuses[(case.operation.label, response.status_code)] += 1
                        if response.status_code >= 500:
                            failures.append(
                                f"{response.status_code} {case.as_curl_command()}\n"
                                f"{response.text[:300]}"
                            )

                    try:
                        call()
                    except Unsatisfiable:  # nothing to make invalid (no parameters, no body)
                        assert mode is GenerationMode.NEGATIVE, op.label

    total = sum(statuses.values())
    assert not failures, "\n\n".join(failures[:5])
    assert total >= MINIMUM, total
    reached = {label for (label, status), _ in statuses.items() if status < 400}
    # bodies were good enough to be answered by the handlers, not only refused
    # (predict and infer bodies need exact shapes, which the generator seldom hits: the
    # test below gives them well-shaped bodies with arbitrary values)
    for label in ("POST /v1/sessions/{session_id}/step", "POST /v1/sessions/{session_id}/stream",
                  "GET /v1/sessions"):  # fmt: skip
        assert label in reached, (label, sorted(statuses.items()))
    by_status = Counter(status for _, status in statuses.elements())
    print(f"schemathesis: {total} requests; by status: {sorted(by_status.items())}")


# any JSON number, the ones no float32 holds included, and now and then a non-number
_value = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([1e39, -1e39, 3.4e38, 1e-46, 0.0, -0.0]),
)
_odd = st.one_of(_value, st.sampled_from(["NaN", "Infinity", None, True, "1", [], {}]))


@st.composite
def _well_shaped(draw: Any) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """A predict body and the same tensor as a v2 infer body, shaped for ``simple``."""
    batch, steps = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    numeric = draw(st.booleans())
    flat = draw(st.lists(_value if numeric else _odd, min_size=batch * steps * fixtures.FEATURES,
                         max_size=batch * steps * fixtures.FEATURES))  # fmt: skip
    nested = [[flat[(b * steps + t) * fixtures.FEATURES:][: fixtures.FEATURES]
               for t in range(steps)] for b in range(batch)]  # fmt: skip
    predict: dict[str, Any] = {"inputs": nested}
    if draw(st.booleans()):
        predict["mask"] = draw(st.lists(st.lists(st.booleans(), min_size=steps, max_size=steps),
                                        min_size=batch, max_size=batch))  # fmt: skip
    infer = {"inputs": [{"name": "inputs", "shape": [batch, steps, fixtures.FEATURES],
                         "datatype": draw(st.sampled_from(["FP32", "FP64", "FP16", "INT64"])),
                         "data": flat}]}  # fmt: skip
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat)
    return predict, infer, numeric


@pytest.mark.slow
def test_well_shaped_bodies_with_any_values_get_no_server_error(
    models_dir: Path, tiny_models: dict[str, Any]
) -> None:
    """Out-of-range, huge, tiny and non-numeric values reach the handlers' own checks."""
    app = create_app(serving_settings(models_dir, "memory"))
    statuses: Counter[tuple[str, int]] = Counter()
    with asgi.get_client(app) as client:

        @settings(max_examples=300, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(bodies=_well_shaped())
        def call(bodies: tuple[dict[str, Any], dict[str, Any], bool]) -> None:
            predict, infer, numeric = bodies
            for label, url, body in (("predict", "/v1/models/simple/predict", predict),
                                     ("infer", "/v2/models/simple/infer", infer)):  # fmt: skip
                response = client.post(url, json=body)
                statuses[(label, response.status_code)] += 1
                assert response.status_code < 500, (url, body, response.text[:300])
                if response.status_code >= 400:
                    assert response.status_code == 422, response.text
                    continue
                if label == "predict":  # what float32 cannot hold was refused, not computed
                    assert numeric
                    values = np.asarray(body["inputs"], np.float64)
                    assert np.all(np.abs(values) <= np.finfo(np.float32).max), body

        call()
    for label in ("predict", "infer"):
        assert statuses[(label, 200)] > 0 and statuses[(label, 422)] > 0, sorted(statuses.items())
