"""One loaded model version: an onnxruntime session and one blocking :meth:`LoadedModel.run`.

``run`` takes batch-major numpy arrays whatever the graph's layout, applies the
manifest's preprocessing, pads to the model's static number of timesteps when
it was exported unrolled, and returns outputs and final states. It blocks: the
batcher and the predictor call it from a worker thread, never on the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from gruserve.repository import ModelVersion
from gruserve.runtime.provider import short_name
from gruserve.runtime.signature import ModelSignature

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunResult:
    """``outputs``: one array per graph output, (B, T, D) or (B, D); ``states``: (B, U) each."""

    outputs: list[np.ndarray]
    states: list[np.ndarray]


def right_pad(x: np.ndarray, mask: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad (B, T, ...) inputs and their (B, T) mask to ``length`` steps with masked zeros."""
    pad = length - x.shape[1]
    if pad <= 0:
        return x, mask
    x_pad = np.zeros((x.shape[0], length, *x.shape[2:]), x.dtype)
    x_pad[:, : x.shape[1]] = x
    m_pad = np.zeros((x.shape[0], length), np.bool_)
    m_pad[:, : x.shape[1]] = mask
    return x_pad, m_pad


class LoadedModel:
    """An onnxruntime session plus its :class:`ModelSignature`.

    Args:
        version: a verified repository entry.
        providers: onnxruntime providers, most preferred first.
        intra_op_threads: threads inside one run (0 = onnxruntime's default).
    """

    def __init__(
        self, version: ModelVersion, providers: Sequence[str], intra_op_threads: int = 1
    ) -> None:
        self.signature = ModelSignature(version.manifest)
        self.name, self.version = version.name, version.version
        self.size_bytes = len(version.onnx_bytes) or version.onnx_path.stat().st_size
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._session = ort.InferenceSession(  # the bytes the repository verified
            version.onnx_bytes or str(version.onnx_path), options, providers=list(providers)
        )
        self.provider = short_name(self._session.get_providers()[0])
        sig = self.signature
        self._input_name, self._mask_name = (t.name for t in version.manifest.inputs)
        self._state_inputs = [s.input for s in version.manifest.states]
        self._fetch = sig.output_names + [s.output for s in version.manifest.states]
        self._n_out = len(sig.output_names)

    def run(
        self, inputs: np.ndarray, mask: np.ndarray | None, states: Sequence[np.ndarray]
    ) -> RunResult:
        """Run a batch once (blocking).

        Args:
            inputs: (B, T, F) float32 raw values, or (B, T) int64 token ids.
            mask: (B, T) bool, or None for all steps valid.
            states: one (B, U) float32 array per state, manifest order.

        Returns:
            Outputs in raw units, (B, T, D) per timestep or (B, D), and final states.
        """
        sig = self.signature
        batch, steps = inputs.shape[0], inputs.shape[1]
        if sig.input_scaling is not None:
            inputs = ((inputs - sig.input_scaling.mean) / sig.input_scaling.scale).astype(
                np.float32
            )
        if mask is None:
            mask = np.ones((batch, steps), np.bool_)
        static = sig.static_timesteps
        if static is not None and steps < static:
            inputs, mask = right_pad(inputs, mask, static)
        if sig.time_major:
            inputs = np.ascontiguousarray(np.swapaxes(inputs, 0, 1))
            mask = np.ascontiguousarray(mask.T)
        feed = {self._input_name: inputs, self._mask_name: mask}
        for name, state in zip(self._state_inputs, states, strict=True):
            feed[name] = state
        fetched = self._session.run(self._fetch, feed)
        outputs = fetched[: self._n_out]
        if sig.per_timestep:
            if sig.time_major:
                outputs = [np.swapaxes(o, 0, 1) for o in outputs]
            if outputs[0].shape[1] != steps:  # undo the static padding
                start = 0 if sig.pad_alignment == "start" else outputs[0].shape[1] - steps
                outputs = [o[:, start : start + steps] for o in outputs]
        if sig.output_scaling is not None:
            outputs = [o * sig.output_scaling.scale + sig.output_scaling.mean for o in outputs]
        return RunResult(outputs, fetched[self._n_out :])

    def warm_up(self) -> None:
        """One tiny run, so the first request does not pay for onnxruntime's lazy set-up."""
        sig = self.signature
        steps = 1
        x = (
            np.zeros((1, steps), np.int64)
            if sig.takes_token_ids
            else np.zeros((1, steps, sig.features or 0), np.float32)
        )
        self.run(x, None, [np.zeros((1, u), np.float32) for u in sig.state_units])
