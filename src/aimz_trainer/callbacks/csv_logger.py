"""The fit's scalars as a CSV file, for people without TensorBoard."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING

from aimz_trainer.callbacks.logger import MetricLogger, as_path, writable_directory
from aimz_trainer.errors import ConfigurationError

if TYPE_CHECKING:
    from aimz_trainer.callbacks.context import FitContext

__all__ = ["CSVLogger"]

COLUMNS = ("step", "epoch", "metric", "value")


class CSVLogger(MetricLogger):
    """Writes the scalars of :mod:`aimz_trainer.callbacks.logger` to ``path``, one row per
    value (long format: ``step,epoch,metric,value``), one whole line at a time.

    A fresh fit replaces the file; a resumed fit keeps the rows before its resume step;
    ``Trainer.validate``/``test`` add rows.
    ``pandas.read_csv(path).pivot_table(index="step", columns="metric", values="value")``
    gives one column per metric.

    Example:
        >>> import tempfile, os
        >>> logger = CSVLogger(os.path.join(tempfile.mkdtemp(), "metrics.csv"))
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = as_path(path, "path")
        if self.is_writer:
            if self.path.is_dir():
                raise ConfigurationError(f"path={str(path)!r} is a directory; pass a file path such as 'metrics.csv'.")
            writable_directory(self.path.parent, "path's directory")
        self._file: IO[str] | None = None
        self._writer: csv.DictWriter[str] | None = None

    def open(self, fit: FitContext, resume_step: int | None) -> None:
        if resume_step is None and self.path.exists():  # an evaluation adds rows
            mode = "a"
        elif resume_step and self.path.exists():
            with self.path.open(newline="") as previous:
                kept = [row for row in csv.DictReader(previous) if int(row["step"]) < resume_step]
            # The rows before the resume step survive whole or not at all: replace, then append.
            staging = self.path.with_name(self.path.name + ".tmp")
            with staging.open("w", newline="") as file:
                writer = csv.DictWriter(file, COLUMNS)
                writer.writeheader()
                writer.writerows(kept)
            os.replace(staging, self.path)
            mode = "a"
        else:
            mode = "w"
        # Line buffering: every row reaches the file whole, even if the process dies after it.
        self._file = self.path.open(mode, newline="", buffering=1)
        self._writer = csv.DictWriter(self._file, COLUMNS)
        if mode == "w":
            self._writer.writeheader()

    def write(self, step: int, epoch: int, scalars: Mapping[str, float]) -> None:
        assert self._writer is not None
        for name, value in scalars.items():
            self._writer.writerow({"step": step, "epoch": epoch, "metric": name, "value": repr(float(value))})

    def close(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = self._writer = None
