"""A CSV file as named numeric columns, with missing values handled on request.

Only the columns a config names are converted to numbers, so a date or a
comment column does not stop training. Missing cells (empty, ``NA``, ``nan``)
are an error unless ``data.missing`` says what to do, because a silently
zero-filled gap teaches a forecaster the wrong thing.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gruserve.errors import ConfigError

MISSING_POLICIES = ("error", "drop", "ffill", "interpolate")
_MISSING_TOKENS = {"", "na", "nan", "null", "none", "n/a"}


@dataclass(frozen=True)
class Table:
    """The header and the text cells of one CSV file."""

    path: Path
    header: list[str]
    rows: list[list[str]]

    def __len__(self) -> int:
        return len(self.rows)

    def numeric(self, names: list[str], where: str) -> np.ndarray:
        """The named columns as float64 (rows, len(names)); missing cells are NaN.

        Raises:
            ConfigError: a name that is not a column, or a cell that is not a number.
        """
        missing = [n for n in names if n not in self.header]
        if missing:
            raise ConfigError(
                where,
                f"column(s) {', '.join(repr(m) for m in missing)} not in {self.path.name}; "
                f"columns: {', '.join(self.header)}",
            )
        index = [self.header.index(n) for n in names]
        out = np.empty((len(self.rows), len(names)), np.float64)
        for r, row in enumerate(self.rows):
            for c, i in enumerate(index):
                cell = row[i].strip() if i < len(row) else ""
                if cell.lower() in _MISSING_TOKENS:
                    out[r, c] = np.nan
                    continue
                try:
                    out[r, c] = float(cell)
                except ValueError:
                    raise ConfigError(
                        where,
                        f"column {names[c]!r} of {self.path.name} is not numeric: "
                        f"row {r + 2} holds {cell!r}",
                    ) from None
        return out


def read_table(path: Path, delimiter: str = ",", where: str = "data.file") -> Table:
    """Read a CSV file with a header row."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            lines = [row for row in reader if row and any(cell.strip() for cell in row)]
    except OSError as exc:
        raise ConfigError(where, f"cannot read {path}: {exc.strerror or exc}") from None
    if not lines:
        raise ConfigError(where, f"{path} is empty")
    header = [name.strip() for name in lines[0]]
    if len(set(header)) != len(header):
        raise ConfigError(where, f"{path.name} repeats a column name in its header: {header}")
    return Table(Path(path), header, lines[1:])


def handle_missing(values: np.ndarray, names: list[str], policy: str, where: str) -> np.ndarray:
    """Apply ``data.missing`` to the used columns (rows, columns) of one table.

    ``drop`` removes every row with a gap in any used column; ``ffill``
    repeats the last value (leading gaps take the first value); ``interpolate``
    draws a straight line between neighbours.
    """
    gaps = np.isnan(values)
    if not gaps.any():
        return values
    if policy == "error":
        row, col = np.argwhere(gaps)[0]
        raise ConfigError(
            where,
            f"column {names[col]!r} has {int(gaps[:, col].sum())} missing value(s), the first "
            f"at data row {row + 1}; set data.missing to one of {', '.join(MISSING_POLICIES[1:])}",
        )
    if policy == "drop":
        return values[~gaps.any(axis=1)]
    out = values.copy()
    rows = np.arange(len(values))
    for c in range(values.shape[1]):
        known = ~gaps[:, c]
        if not known.any():
            raise ConfigError(where, f"column {names[c]!r} has no values at all")
        if policy == "interpolate":
            out[:, c] = np.interp(rows, rows[known], values[known, c])
        else:
            last = np.maximum.accumulate(np.where(known, rows, -1))
            first = int(np.argmax(known))
            out[:, c] = values[np.where(last < 0, first, last), c]
    return out
