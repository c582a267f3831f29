"""Validation during training and the held-out forecast error reported at the end.

Evaluation always runs the *inference* model (:func:`inference_spec`: no
stateful buffers) built from the current weights, so what is measured is what
gets exported. A model that returns sequences is evaluated the way the server
runs it: the whole series is streamed from its first step with the state
carried, and only the steps of the split being scored count. A model that
returns one vector per window is scored on that split's windows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from gruserve.layers.model import ModelSpec
from gruserve.nn.sequential import Sequential
from gruserve.train.windows import ArrayBatches, window_starts

if TYPE_CHECKING:
    from gruserve.train.data import PreparedData
    from gruserve.train.loop import Logs, Trainer


def inference_model(spec: ModelSpec, weights: Mapping[str, Mapping[str, np.ndarray]]) -> Sequential:
    return Sequential.from_spec(spec, weights).eval()


class WindowValidation:
    """``val_*`` logs from the validation windows, in batches of ``batch_size``."""

    def __init__(self, spec: ModelSpec, x: np.ndarray, y: np.ndarray, batch_size: int) -> None:
        self.spec, self.batches = spec, ArrayBatches(x, y, batch_size)

    def __call__(self, trainer: Trainer) -> Logs:
        model = inference_model(self.spec, trainer.model.get_weights())
        return trainer.evaluate(model, self.batches.epoch(0))


class StreamValidation:
    """``val_*`` logs from streaming the series up to the split's end (stateful training)."""

    def __init__(self, spec: ModelSpec, data: PreparedData, split: str = "validation") -> None:
        self.spec, self.data = spec, data
        self.begin, self.end = data.split(split)

    @torch.no_grad()
    def __call__(self, trainer: Trainer) -> Logs:
        model = inference_model(self.spec, trainer.model.get_weights())
        inputs = torch.as_tensor(self.data.x[None, : self.end])
        targets = torch.as_tensor(self.data.y[None, self.begin : self.end])
        outputs, _ = model.call_with_mask(inputs, None, training=False)
        y_pred = outputs[0][:, self.begin : self.end]
        logs = {"loss": float(trainer.loss(targets, y_pred) + model.regularization_loss())}
        for metric in trainer.new_metrics():
            metric.update(targets, y_pred)
            logs[metric.name] = metric.result()
        return logs


@torch.no_grad()
def predict_split(
    data: PreparedData, spec: ModelSpec, weights: Mapping[str, Any], split: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Forecasts, targets and naive forecasts (raw units) for every scored step of a split."""
    model = inference_model(spec, weights)
    begin, end = data.split(split)
    if data.sequence_output:
        output = model(torch.as_tensor(data.x[None, :end]))
        predicted = output[0, begin:end].numpy()  # type: ignore[index]
        index = np.arange(begin, end)
    else:
        c = data.config
        starts = window_starts(begin, end, c.window, 1, False)  # score every step
        x = data.x[starts[:, None] + np.arange(c.window)[None, :]]
        predicted = model(torch.as_tensor(x)).numpy()  # type: ignore[union-attr]
        index = starts + c.window - 1
    return data.outputs.invert(predicted), data.raw_targets[index], data.naive[index]


def forecast_report(
    data: PreparedData, spec: ModelSpec, weights: Mapping[str, Any], task: str
) -> dict[str, Any]:
    """Held-out error in the data's units, next to the naive last-value forecast.

    Scores the test split, or the validation split when there is no test split.
    """
    split = "test" if data.size("test") else "validation"
    if data.size(split) == 0:
        return {}
    predicted, actual, naive = predict_split(data, spec, weights, split)
    report: dict[str, Any] = {
        "heldout_split": split,
        "heldout_steps": len(actual),
        "heldout_evaluation": (
            "streamed from the first step with state carried, as the server runs it"
            if data.sequence_output
            else "one forecast per window"
        ),
        "targets": list(data.config.targets),
        "horizon": data.config.horizon,
    }
    known = ~np.isnan(naive).any(axis=1)
    if task == "regression":
        report.update(_errors("heldout", predicted, actual))
        report.update(_errors("naive_last_value", naive[known], actual[known]))
        report["beats_naive_mae"] = bool(report["heldout_mae"] < report["naive_last_value_mae"])
    else:
        classes = predicted.argmax(-1) if task != "binary" else (predicted > 0.5).astype(float)
        labels = actual[:, 0] if task == "sparse" else actual
        report["heldout_accuracy"] = float(np.mean(classes.reshape(labels.shape) == labels))
    return report


def _errors(prefix: str, predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    diff = np.asarray(predicted, np.float64) - np.asarray(actual, np.float64)
    return {
        f"{prefix}_mae": float(np.mean(np.abs(diff))),
        f"{prefix}_rmse": float(np.sqrt(np.mean(diff * diff))),
    }
