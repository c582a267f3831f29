"""A tqdm progress bar per epoch: batches done, ETA, running loss and metrics."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, TextIO

from tqdm import tqdm

from gruserve.train.callbacks import Callback, Logs

if TYPE_CHECKING:
    from gruserve.train.loop import Trainer


def _format(logs: Logs) -> dict[str, str]:
    return {k: f"{v:.4g}" for k, v in logs.items() if k != "learning_rate"}


class ProgressBar(Callback):
    """Keras's ``verbose=1`` line, drawn by tqdm on stderr (one line per epoch)."""

    def __init__(self, epochs: int, steps: int, stream: TextIO | None = None) -> None:
        self.epochs = epochs
        self.steps = steps
        self.stream = stream or sys.stderr
        self.bar: Any = None

    def on_epoch_begin(self, epoch: int, trainer: Trainer) -> None:
        self.bar = tqdm(
            total=self.steps,
            desc=f"Epoch {epoch + 1}/{self.epochs}",
            unit="batch",
            file=self.stream,
            dynamic_ncols=True,
            leave=True,
        )

    def on_batch_end(self, batch: int, logs: Logs, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.set_postfix(_format(logs), refresh=False)
            self.bar.update(1)

    def on_epoch_end(self, epoch: int, logs: Logs, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.set_postfix(_format(logs))
            self.bar.close()
            self.bar = None

    def on_train_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
