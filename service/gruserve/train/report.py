"""``history.json`` and a loss/metric curve PNG for one training run.

The PNG is drawn with matplotlib's object API on an Agg canvas, so no global
backend is touched and no display is needed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from gruserve.train.loop import History

HISTORY_FILE = "history.json"
CURVES_FILE = "curves.png"


def write_history(directory: Path, history: History, extra: dict[str, Any]) -> Path:
    """Per-epoch logs plus run facts (seed, best epoch, held-out error) as JSON."""
    epochs = [{"epoch": i + 1, **logs} for i, logs in enumerate(history.epochs)]
    document = {**extra, "interrupted": history.interrupted, "epochs": epochs}
    path = Path(directory) / HISTORY_FILE
    _write_text(path, json.dumps(_finite(document), indent=2) + "\n")
    return path


def plot_curves(directory: Path, history: History, title: str = "") -> Path | None:
    """One panel per logged quantity (training and validation lines); None without epochs."""
    if not history.epochs:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [k for k in history.keys if not k.startswith("val_") and k != "learning_rate"]
    figure = Figure(figsize=(5.5 * len(names), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(names), squeeze=False)[0]
    epochs = list(range(1, len(history.epochs) + 1))
    for ax, name in zip(axes, names, strict=True):
        ax.plot(epochs, history[name], label=f"training {name}")
        if history[f"val_{name}"]:
            ax.plot(epochs, history[f"val_{name}"], label=f"validation {name}")
        ax.set_xlabel("epoch")
        ax.set_title(name)
        if name == "loss" and min(history[name] + history[f"val_{name}"]) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        figure.suptitle(title)
    path = Path(directory) / CURVES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def _finite(value: Any) -> Any:
    """JSON has no NaN: write null instead (a diverged loss must still be readable)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(text)
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)
