"""A tqdm progress bar per epoch, updated once per compiled chunk."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from aimz_trainer.callbacks.base import Callback

if TYPE_CHECKING:
    from aimz_trainer.callbacks.context import FitContext, FitProgress

__all__ = ["ProgressBar", "progress_bar_wanted"]


def progress_bar_wanted() -> bool:
    """Bars only for a person watching: stdout is a terminal and ``CI`` is not set."""
    return sys.stdout.isatty() and not os.environ.get("CI")


class ProgressBar(Callback):
    """Shows the epoch's progress with the latest loss and steps/s.

    Example:
        >>> bar = ProgressBar()
    """

    def __init__(self) -> None:
        self._bar: tqdm | None = None

    def on_train_epoch_start(self, fit: FitContext, progress: FitProgress) -> None:
        self._close()
        done = progress.step - progress.epoch * fit.steps_per_epoch  # > 0 when resumed mid-epoch
        self._bar = tqdm(total=fit.steps_per_epoch, initial=done, desc=f"epoch {progress.epoch}", leave=True)

    def on_train_chunk_end(self, fit: FitContext, progress: FitProgress, losses: np.ndarray, steps: range) -> None:
        if self._bar is not None:
            self._bar.update(len(steps))
            self._bar.set_postfix(
                loss=f"{progress.metrics.get('train_loss', float('nan')):.4g}",
                steps_per_sec=f"{progress.metrics.get('steps_per_sec', float('nan')):.0f}",
                refresh=False,
            )

    def on_train_epoch_end(self, fit: FitContext, progress: FitProgress) -> None:
        self._close()

    def teardown(self, fit: FitContext) -> None:
        self._close()

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
