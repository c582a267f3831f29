"""Export-time parity: onnxruntime judged against Keras's math in float64.

float32 itself drifts from the exact result on chaotic dynamics (a tanh
recurrent activation, long sequences) and on diverging ones (relu gates), so
"onnxruntime equals the float32 reference" is the wrong question: it refuses
good exports and accepts ones that merely share float32's error. The check
therefore runs :mod:`gruserve.layers.forward` twice, in float64 (the exact
answer, numpy) and in float32 (what Keras itself computes: the torch module
when torch is installed, else numpy), and accepts the exported graph when
its error against float64 is

- within the tolerance, ``|got - exact| <= atol + rtol * |exact|``, or
- at most :data:`FLOAT32_FACTOR` times the float32 reference's own error on
  the same inputs, measured in the same units.

Cases cover full sequences, right padding (an all-masked sample included),
masks with holes, and inputs large enough to reach every activation's
large-value range (where exp overflows, gates saturate), all at the model's
own number of timesteps when it is fixed. A non-finite output is reported
as such, never as a difference.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnxruntime as ort

from gruserve.export.model_graph import INPUT, MASK, state_input_name, state_output_name
from gruserve.export.tolerance import ATOL, FLOAT32_FACTOR, RTOL, judge
from gruserve.layers.backend import NUMPY
from gruserve.layers.core import EmbeddingSpec
from gruserve.layers.forward import run_model
from gruserve.layers.model import ModelSpec

LARGE_INPUT_SCALE = 100.0
"""Standard deviation of the inputs of the ``large`` case: pre-activations past 88."""
DEFAULT_TIMESTEPS = 7
Reference = Callable[
    [
        ModelSpec,
        Mapping[str, Mapping[str, np.ndarray]],
        np.ndarray,
        np.ndarray,
        dict[str, list[np.ndarray]],
    ],
    tuple[list[np.ndarray], dict[str, list[np.ndarray]]],
]


def numpy_reference(spec, weights, x, mask, states):  # type: ignore[no-untyped-def]
    return run_model(NUMPY, spec, weights, x, mask, states)


# Typed, unlike the float32 references: parity_report unpacks its pair into _flat
# beside another argument, which mypy can only count when the pair is declared.
def float64_reference(
    spec: ModelSpec,
    weights: Mapping[str, Mapping[str, np.ndarray]],
    x: np.ndarray,
    mask: np.ndarray,
    states: dict[str, list[np.ndarray]],
) -> tuple[list[np.ndarray], dict[str, list[np.ndarray]]]:
    """The same layer math in float64: the exact answer float32 results are judged by."""
    w64 = {
        layer: {k: np.asarray(v, np.float64) for k, v in w.items()} for layer, w in weights.items()
    }
    x64 = x if x.dtype.kind in "iu" else x.astype(np.float64)
    s64 = {k: [np.asarray(s, np.float64) for s in v] for k, v in states.items()}
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return run_model(NUMPY, spec, w64, x64, mask, s64)


def torch_reference(spec, weights, x, mask, states):  # type: ignore[no-untyped-def]
    import torch

    from gruserve.nn.sequential import Sequential

    model = Sequential.from_spec(spec, weights).eval()
    with torch.no_grad():
        outputs, final = model.forward_with_states(
            torch.from_numpy(x),
            mask=torch.from_numpy(mask),
            states={k: [torch.from_numpy(s) for s in v] for k, v in states.items()},
        )
    return [o.numpy() for o in outputs], {k: [s.numpy() for s in v] for k, v in final.items()}


def pick_reference(name: str = "auto") -> tuple[str, Reference]:
    """The float32 reference: ``torch`` (Keras's own backend) when installed, else ``numpy``."""
    if name == "auto":
        name = "torch" if importlib.util.find_spec("torch") is not None else "numpy"
    return name, (torch_reference if name == "torch" else numpy_reference)


def float32_references(name: str = "auto") -> list[tuple[str, Reference]]:
    """Every float32 computation the yardstick takes: the chosen one, plus numpy's.

    Under ``auto`` with torch installed both run; their larger error is
    float32's error on those inputs (:func:`~gruserve.export.tolerance.judge`).
    """
    chosen = pick_reference(name)
    if name == "auto" and chosen[0] == "torch":
        return [chosen, ("numpy", numpy_reference)]
    return [chosen]


def _masks(batch: int, steps: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    lengths = np.array([steps, max(steps - 2, 1), 1, 0][:batch])
    right = np.arange(steps)[None, :] < lengths[:, None]
    holes = rng.random((batch, steps)) > 0.3
    holes[:, 0] = True
    full = np.ones((batch, steps), bool)
    return {"full": full, "right_padded": right, "holes": holes, "large": full}


def _inputs(
    spec: ModelSpec, batch: int, steps: int, rng: np.random.Generator, scale: float
) -> np.ndarray:
    first = spec.layers[0]
    if isinstance(first, EmbeddingSpec):
        low = 0 if first.mask_zero else 1
        return rng.integers(low, first.input_dim, size=(batch, steps)).astype(np.int64)
    features = int(spec.input_features or 0)
    return (rng.normal(size=(batch, steps, features)) * scale).astype(np.float32)


def _with_errstate(ref: Reference) -> Reference:
    def run(*args):  # type: ignore[no-untyped-def]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return ref(*args)

    return run


def _flat(outputs: list[np.ndarray], final: dict[str, list[np.ndarray]], spec: ModelSpec) -> list:  # type: ignore[type-arg]
    return list(outputs) + [s for layer in spec.recurrent_layers() for s in final[layer.name]]


def parity_report(
    spec: ModelSpec,
    weights: Mapping[str, Mapping[str, np.ndarray]],
    onnx_bytes: bytes,
    *,
    static_timesteps: int | None = None,
    reference: str = "auto",
    seed: int = 0,
    atol: float = ATOL,
    rtol: float = RTOL,
) -> dict[str, Any]:
    """Run every case through onnxruntime and both references; return the report.

    The report's ``max_abs_diff`` is the worst error against float64 over
    all cases and outputs, ``float32_max_abs_diff`` the float32 reference's
    own; ``passed`` says whether every case met the rule of this module.
    """
    references = [(n, _with_errstate(r)) for n, r in float32_references(reference)]
    rng = np.random.default_rng(seed)
    batch = 4
    steps = static_timesteps or spec.timesteps or DEFAULT_TIMESTEPS
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    output_names = spec.output_names() + [state_output_name(s.key) for s in spec.states()]
    cases = []
    for case, mask in _masks(batch, steps, rng).items():
        scale = LARGE_INPUT_SCALE if case == "large" else 1.0
        x = _inputs(spec, batch, steps, rng, scale)
        states: dict[str, list[np.ndarray]] = {}
        feeds: dict[str, np.ndarray] = {}
        for state in spec.states():
            value = (rng.normal(size=(batch, state.units)) * 0.5).astype(np.float32)
            states.setdefault(state.layer, []).append(value)
            feeds[state_input_name(state.key)] = value
        if spec.time_major:
            x, mask = np.swapaxes(x, 0, 1).copy(), mask.T.copy()
        feeds[INPUT], feeds[MASK] = x, mask
        got = session.run(output_names, feeds)
        exact = _flat(*float64_reference(spec, weights, x, mask, states), spec)
        singles = [_flat(*ref(spec, weights, x, mask, states), spec) for _, ref in references]
        verdicts = [
            judge(g, e, [np.asarray(s[i]) for s in singles], atol, rtol)
            for i, (g, e) in enumerate(zip(got, exact, strict=True))
        ]
        cases.append(
            {
                "case": case,
                "batch": batch,
                "timesteps": steps,
                "max_abs_diff": max(v["max_abs_diff"] for v in verdicts),
                "float32_max_abs_diff": max(v["float32_max_abs_diff"] for v in verdicts),
                "error_ratio": max(v["error_ratio"] for v in verdicts),
                "float32_error_ratio": max(v["float32_error_ratio"] for v in verdicts),
                "non_finite": " and ".join(sorted({v["non_finite"] for v in verdicts} - {""})),
                "passed": all(v["passed"] for v in verdicts),
            }
        )
    return {
        "verified": True,
        "reference": "numpy float64",
        "float32_reference": " and ".join(f"{n} float32" for n, _ in references),
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "max_abs_diff": max(c["max_abs_diff"] for c in cases),
        "float32_max_abs_diff": max(c["float32_max_abs_diff"] for c in cases),
        "atol": atol,
        "rtol": rtol,
        "float32_factor": FLOAT32_FACTOR,
        "passed": all(c["passed"] for c in cases),
        "cases": cases,
        "seed": seed,
    }


def unverified_report(reason: str) -> dict[str, Any]:
    """The parity block of a version written without the check (``--no-verify``)."""
    return {"verified": False, "passed": None, "reason": reason, "cases": []}


def describe_failure(report: Mapping[str, Any]) -> str:
    """One sentence naming the worst case: non-finite outputs by name, else the figures."""
    failed = [c for c in report["cases"] if not c["passed"]]
    worst = max(failed, key=lambda c: c["error_ratio"]) if failed else report["cases"][0]
    if worst["non_finite"]:
        what = f"outputs {worst['non_finite']} where Keras's float64 result is finite"
    else:
        what = f"max |diff| {worst['max_abs_diff']:.3g} from Keras's float64 result"
    return (
        f"case {worst['case']!r} ({worst['batch']}x{worst['timesteps']} steps): {what}; "
        f"Keras's float32 result is {worst['float32_max_abs_diff']:.3g} from it, "
        f"tolerance atol={report['atol']:g}, rtol={report['rtol']:g}"
    )
