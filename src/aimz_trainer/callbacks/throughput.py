"""ThroughputMonitor: steps and rows per second of training time, globally and per device, and
the fit's start-up time, logged to every logger."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from aimz_trainer.callbacks.base import Callback
from aimz_trainer.plan import Every

if TYPE_CHECKING:
    from aimz_trainer.callbacks.context import FitContext, FitProgress

__all__ = ["ThroughputMonitor"]


class ThroughputMonitor(Callback):
    """Logs the fit's throughput on training time only (see
    :class:`~aimz_trainer.callbacks.context.FitTiming`: compilation and validation passes are
    left out) through ``fit.log``, so every logger records it.

    ====================================  =======================================================
    metric                                value
    ====================================  =======================================================
    ``throughput/steps_per_sec``          SVI steps per second of training time
    ``throughput/rows_per_sec``           real rows per second: steps/s times the global batch
                                          size (padding columns are not rows)
    ``throughput/device/steps_per_sec``   steps/s divided by the mesh's device count
    ``throughput/device/rows_per_sec``    rows/s divided by the mesh's device count (each device
                                          works on its share of every batch)
    ``throughput/startup_s``              seconds from the ``fit`` call to the first chunk's
                                          results (checks, placement, compilation, first chunk)
    ====================================  =======================================================

    Cadence: the rates at every chunk that ends on a logging step (a multiple of the Trainer's
    ``log_every_n_steps``, where the plan always ends a chunk), averaged over the training time
    since the previous logging step, so a slowdown shows where it happens; ``startup_s`` once,
    after the first chunk (a rate needs a logging step after it). The values are host
    arithmetic on the loop's clock: the monitor adds no device work and no sync.

    Example:
        >>> from aimz_trainer import Trainer
        >>> trainer = Trainer(max_epochs=1, callbacks=[ThroughputMonitor()], enable_progress_bar=False)
    """

    def __init__(self) -> None:
        self._since: tuple[int, float] | None = None  # (train_steps, train_s) the window starts at
        self._logged_startup = False

    def on_fit_start(self, fit: FitContext, progress: FitProgress) -> None:
        self._since, self._logged_startup = None, False

    def on_train_chunk_end(self, fit: FitContext, progress: FitProgress, losses: np.ndarray, steps: range) -> None:
        timing = fit.timing
        if timing.startup_s is None:
            return
        if not self._logged_startup:
            fit.log("throughput/startup_s", timing.startup_s)
            self._logged_startup = True
        if not Every(steps=fit.log_every_n_steps).at_step(steps.stop):
            return
        since_steps, since_s = self._since or (0, 0.0)
        self._since = (timing.train_steps, timing.train_s)
        steps_done, seconds = timing.train_steps - since_steps, timing.train_s - since_s
        if steps_done <= 0 or seconds <= 0:  # only the start-up chunk so far: no rate yet
            return
        steps_per_sec = steps_done / seconds
        rows_per_sec = steps_per_sec * fit.plan.batch_size
        devices = fit.mesh.size
        fit.log_dict(
            {
                "throughput/steps_per_sec": steps_per_sec,
                "throughput/rows_per_sec": rows_per_sec,
                "throughput/device/steps_per_sec": steps_per_sec / devices,
                "throughput/device/rows_per_sec": rows_per_sec / devices,
            }
        )
