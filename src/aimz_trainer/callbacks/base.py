"""The callback contract: a base class of documented no-op hooks.

Hooks run in the order the callbacks were given. They receive the trainer and a
:class:`FitProgress` snapshot made of host values only, so a hook never forces a device sync
or a recompilation.

=========================  ==========================================================
hook                       when
=========================  ==========================================================
``on_fit_start``           after validation and compilation, before the first step
``on_train_epoch_start``   before the first chunk of an epoch
``on_train_chunk_end``     once per compiled chunk, with its per-step losses
``on_train_epoch_end``     after the last chunk of an epoch
``on_fit_end``             after the last step (also after a stop request)
``on_exception``           when fit raises (KeyboardInterrupt included), before re-raising
``teardown``               always, last
=========================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from aimz_trainer.trainer import Trainer

__all__ = ["Callback", "FitProgress"]


class FitProgress(NamedTuple):
    """A read-only snapshot of a running fit.

    Attributes:
        step: number of SVI steps finished so far.
        epoch: the current epoch, counted from 0.
        metrics: latest value of each metric (``train_loss``, ``steps_per_sec``, ...).
    """

    step: int
    epoch: int
    metrics: Mapping[str, float]


class Callback:
    """Base class of trainer callbacks; override the hooks you need.

    Example:
        >>> class CountChunks(Callback):
        ...     def __init__(self):
        ...         self.chunks = 0
        ...     def on_train_chunk_end(self, trainer, progress, losses, steps):
        ...         self.chunks += 1
    """

    def on_fit_start(self, trainer: Trainer, progress: FitProgress) -> None:
        """Called once, before the first step."""

    def on_train_epoch_start(self, trainer: Trainer, progress: FitProgress) -> None:
        """Called before the first chunk of each epoch."""

    def on_train_chunk_end(self, trainer: Trainer, progress: FitProgress, losses: np.ndarray, steps: range) -> None:
        """Called after each compiled chunk with its per-step ``losses`` for global ``steps``."""

    def on_train_epoch_end(self, trainer: Trainer, progress: FitProgress) -> None:
        """Called after the last chunk of each epoch."""

    def on_fit_end(self, trainer: Trainer, progress: FitProgress) -> None:
        """Called once after the last step, also when a stop was requested."""

    def on_exception(self, trainer: Trainer, progress: FitProgress, exception: BaseException) -> None:
        """Called when ``fit`` raises, before the exception propagates."""

    def teardown(self, trainer: Trainer) -> None:
        """Called last, whether ``fit`` succeeded or not: release files and handles here."""
