"""The callback contract: a base class of documented no-op hooks.

Hooks receive the trainer and a :class:`FitProgress` snapshot made of host values only, so a
hook never forces a device sync or a recompilation. Callbacks run in the order they were
given, except that callbacks which *monitor* metrics (``monitors_metrics = True``: early
stopping) run after all the others, and callbacks that *save checkpoints*
(``saves_checkpoints = True``) run last of all, for every hook: monitors see every metric
logged at that point, and a checkpoint holds every other callback's state after that point.

=========================  ==========================================================
hook                       when
=========================  ==========================================================
``on_fit_start``           after validation of the arguments and compilation, before
                           the first step
``on_train_epoch_start``   before the first chunk of an epoch
``on_train_chunk_end``     once per compiled chunk, with its per-step losses
``on_validation_end``      after a validation pass (``val_loss``, ``val_lpd`` are set)
``on_train_epoch_end``     after the last chunk of an epoch (and its validation)
``on_save_checkpoint``     when a checkpoint is written, with the dict being saved
``on_load_checkpoint``     when a fit resumes, with the dict that was loaded
``on_fit_end``             after the last step (also after a stop request)
``on_exception``           when fit raises (KeyboardInterrupt included), before re-raising
``teardown``               always, last: close files here
=========================  ==========================================================

A callback stops the fit with ``trainer.request_stop(reason)`` (or ``trainer.should_stop =
True``); the fit ends at the next chunk boundary and ``on_fit_end`` still runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

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

    Attributes:
        monitors_metrics: ``True`` for callbacks that act on metrics (they run after the
            others).
        saves_checkpoints: ``True`` for callbacks that write checkpoints (they run last).

    Example:
        >>> class CountChunks(Callback):
        ...     def __init__(self):
        ...         self.chunks = 0
        ...     def on_train_chunk_end(self, trainer, progress, losses, steps):
        ...         self.chunks += 1
        ...     def state_dict(self):
        ...         return {"chunks": self.chunks}
        ...     def load_state_dict(self, state):
        ...         self.chunks = state["chunks"]
        >>> CountChunks().state_key
        'CountChunks'
    """

    monitors_metrics: ClassVar[bool] = False
    saves_checkpoints: ClassVar[bool] = False

    @property
    def state_key(self) -> str:
        """The key of this callback's :meth:`state_dict` in a checkpoint. Override it (folding
        in the distinguishing arguments) when one fit may hold several instances."""
        return type(self).__name__

    def step_interval(self, trainer: Trainer) -> int | None:
        """Steps between the points where this callback must see the fit (e.g. a checkpoint
        every N steps): compiled chunks end at every multiple, and the fit waits for such a
        chunk before starting the next. ``None``: epoch ends are enough."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """What this callback needs to continue after a resume (saved in checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def on_fit_start(self, trainer: Trainer, progress: FitProgress) -> None:
        """Called once, before the first step."""

    def on_train_epoch_start(self, trainer: Trainer, progress: FitProgress) -> None:
        """Called before the first chunk of each epoch."""

    def on_train_chunk_end(self, trainer: Trainer, progress: FitProgress, losses: np.ndarray, steps: range) -> None:
        """Called after each compiled chunk with its per-step ``losses`` for global ``steps``."""

    def on_validation_end(self, trainer: Trainer, progress: FitProgress) -> None:
        """Called after each validation pass; ``progress.metrics`` holds its results."""

    def on_train_epoch_end(self, trainer: Trainer, progress: FitProgress) -> None:
        """Called after the last chunk of each epoch and after that epoch's validation."""

    def on_save_checkpoint(self, trainer: Trainer, progress: FitProgress, checkpoint: dict[str, Any]) -> None:
        """Called when a checkpoint is assembled; may add entries to ``checkpoint``."""

    def on_load_checkpoint(self, trainer: Trainer, progress: FitProgress, checkpoint: dict[str, Any]) -> None:
        """Called when a fit resumes from ``checkpoint``, before the first step."""

    def on_fit_end(self, trainer: Trainer, progress: FitProgress) -> None:
        """Called once after the last step, also when a stop was requested."""

    def on_exception(self, trainer: Trainer, progress: FitProgress, exception: BaseException) -> None:
        """Called when ``fit`` raises, before the exception propagates."""

    def teardown(self, trainer: Trainer) -> None:
        """Called last, whether ``fit`` succeeded or not: release files and handles here."""


def overrides_state(callback: Callback) -> bool:
    """Whether ``callback`` keeps state of its own (it overrides :meth:`Callback.state_dict`)."""
    return type(callback).state_dict is not Callback.state_dict
