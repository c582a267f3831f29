"""The fit loop: Keras's ``train_step`` and ``fit`` for a gruserve torch model.

One step is what Keras's torch trainer does: forward in training mode,
``loss(y, y_pred) + sum(model.losses)`` (weight penalties and this call's
activity penalties), backward, the optimizer's update, then every weight's
constraint. The logged ``loss`` is that total, averaged over the epoch with
the batch size as weight; metrics are averaged per sample. With
``stateful=True`` the recurrent layers carry their state from one batch to the
next (detached: truncated back-propagation through time) and are reset at
the start of every epoch.

Ctrl-C ends :meth:`Trainer.fit` cleanly: the partial epoch is dropped, the
callbacks' files from the last complete epoch stay, and the returned
:class:`History` says ``interrupted``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from gruserve.nn.sequential import Sequential
from gruserve.train.callbacks import Callback, Logs
from gruserve.train.losses import Loss
from gruserve.train.metrics import Metric, get_metrics
from gruserve.train.optimizers import KerasOptimizer


class Batches(Protocol):
    def __len__(self) -> int: ...

    def epoch(self, number: int) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


Validation = Callable[["Trainer"], Logs]


@dataclass
class History:
    """Per-epoch logs, like Keras's ``History.history`` but one dict per epoch."""

    epochs: list[Logs] = field(default_factory=list)
    interrupted: bool = False

    def __getitem__(self, name: str) -> list[float]:
        return [logs[name] for logs in self.epochs if name in logs]

    @property
    def keys(self) -> list[str]:
        return list(self.epochs[0]) if self.epochs else []


class Trainer:
    """Trains one :class:`Sequential` with a Keras optimizer, loss and metrics.

    Args:
        model: the torch model (its stateful layers, if any, keep their states).
        optimizer: a :class:`KerasOptimizer` over ``model.parameters()``.
        loss: the compiled loss.
        metrics: metric names, resolved against the loss like Keras's compile.
        stateful: reset the recurrent states at the start of each epoch.
    """

    def __init__(
        self,
        model: Sequential,
        optimizer: KerasOptimizer,
        loss: Loss,
        metrics: Sequence[str] = (),
        stateful: bool = False,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.loss = loss
        self.metric_names = list(metrics)
        self.metrics = self.new_metrics()
        self.stateful = stateful
        self.stop_training = False
        self._loss_total = 0.0
        self._loss_count = 0.0

    def new_metrics(self) -> list[Metric]:
        return get_metrics(self.metric_names, self.loss.task)

    # -- one step ------------------------------------------------------------------------
    def train_step(self, x: np.ndarray, y: np.ndarray) -> Logs:
        """One optimizer step on one batch; returns the running epoch logs."""
        self.model.train()
        inputs, targets = torch.as_tensor(x), torch.as_tensor(y)
        outputs, mask = self.model.call_with_mask(inputs, None, training=True)
        y_pred = outputs[0]
        self.optimizer.zero_grad(set_to_none=True)
        total = self.loss(targets, y_pred, mask) + self.model.regularization_loss()
        total.backward()  # type: ignore[union-attr]
        self.optimizer.step()
        self.model.apply_constraints()
        batch = inputs.shape[0]
        self._loss_total += float(total.detach()) * batch  # type: ignore[union-attr]
        self._loss_count += batch
        for metric in self.metrics:
            metric.update(targets, y_pred.detach(), mask)
        return self.logs()

    def logs(self) -> Logs:
        logs = {"loss": self._loss_total / self._loss_count if self._loss_count else float("nan")}
        logs.update({m.name: m.result() for m in self.metrics})
        return logs

    def _reset_epoch(self) -> None:
        self._loss_total, self._loss_count = 0.0, 0.0
        for metric in self.metrics:
            metric.reset()

    # -- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: Sequential, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> Logs:
        """Keras's ``evaluate``: the same loss (with ``model.losses``) and metrics, no updates."""
        model.eval()
        metrics = self.new_metrics()
        total, count = 0.0, 0
        for x, y in batches:
            inputs, targets = torch.as_tensor(x), torch.as_tensor(y)
            outputs, mask = model.call_with_mask(inputs, None, training=False)
            value = self.loss(targets, outputs[0], mask) + model.regularization_loss()
            total += float(value) * inputs.shape[0]
            count += inputs.shape[0]
            for metric in metrics:
                metric.update(targets, outputs[0], mask)
        logs = {"loss": total / count if count else float("nan")}
        logs.update({m.name: m.result() for m in metrics})
        return logs

    # -- the loop ------------------------------------------------------------------------
    def fit(
        self,
        batches: Batches,
        epochs: int = 1,
        validation: Validation | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> History:
        """Train for ``epochs`` (or until a callback stops it, or Ctrl-C)."""
        history = History()
        self.stop_training = False
        for callback in callbacks:
            callback.on_train_begin(self)
        try:
            for epoch in range(epochs):
                if self.stateful:
                    self.model.reset_states()
                self._reset_epoch()
                for callback in callbacks:
                    callback.on_epoch_begin(epoch, self)
                for step, (x, y) in enumerate(batches.epoch(epoch)):
                    logs = self.train_step(x, y)
                    for callback in callbacks:
                        callback.on_batch_end(step, logs, self)
                logs = self.logs()
                if validation is not None:
                    logs.update({f"val_{k}": v for k, v in validation(self).items()})
                logs["learning_rate"] = self.optimizer.learning_rate
                history.epochs.append(logs)
                for callback in callbacks:
                    callback.on_epoch_end(epoch, logs, self)
                if self.stop_training or not np.isfinite(logs["loss"]):
                    break
        except KeyboardInterrupt:
            history.interrupted = True
        finally:
            for callback in callbacks:
                callback.on_train_end(self)
        return history
