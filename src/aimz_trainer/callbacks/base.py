"""The callback contract: a base class of documented no-op hooks, and their dispatch.

Every hook receives the running fit's :class:`~aimz_trainer.callbacks.context.FitContext`
(what a callback may read and do: step, epoch, metrics, mesh, parameters, posterior draws,
``log``, ``request_stop``) and a :class:`FitProgress` of host values, so a hook never forces a
device sync or a recompilation. Callbacks run in the order they were given, except that
callbacks which *monitor* metrics (``monitors_metrics = True``: early stopping) run after all
the others, and callbacks that *save checkpoints* (``saves_checkpoints = True``) run last of
all, for every hook: monitors see every metric logged at that point, values logged earlier in
the same hook included, and a checkpoint holds every other callback's state after that point.

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
``on_exception``           when fit raises (KeyboardInterrupt included, and FitPreempted
                           after ``on_fit_end`` when a signal stopped the fit), before
                           re-raising
``teardown``               always, last: close files here
=========================  ==========================================================

A callback stops the fit with ``fit.request_stop(reason)``; the fit ends at the next chunk
boundary and ``on_fit_end`` still runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from aimz_trainer._checks import is_int_at_least
from aimz_trainer.errors import ConfigurationError

if TYPE_CHECKING:
    from aimz_trainer.callbacks.context import FitContext, FitProgress

__all__ = [
    "Callback",
    "CallbackList",
    "calling_order",
    "check_callbacks",
    "overrides_state",
    "state_key_of",
]


def state_key_of(callback: object, **arguments: Any) -> str:
    """The key of a callback's state in a checkpoint: its class name and the ``arguments``
    that tell two instances of one fit apart.

    Example:
        >>> state_key_of(Callback(), monitor="val_loss", mode="min")
        "Callback{'monitor': 'val_loss', 'mode': 'min'}"
    """
    return f"{type(callback).__name__}{arguments!r}" if arguments else type(callback).__name__


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
        ...     def on_train_chunk_end(self, fit, progress, losses, steps):
        ...         self.chunks += 1
        ...         fit.log("chunks_seen", self.chunks)  # a curve in every logger
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
        """The key of this callback's :meth:`state_dict` in a checkpoint. Override it with
        :func:`state_key_of` (folding in the distinguishing arguments) when one fit may hold
        several instances."""
        return state_key_of(self)

    def step_interval(self, fit: FitContext) -> int | None:
        """Steps between the points where this callback must see the fit (e.g. a checkpoint
        every N steps): compiled chunks end at every multiple, so the hooks see the state exactly
        there (the next chunk already runs on the devices meanwhile; a stop requested then drops
        it). ``None``: epoch ends are enough. Asked once, before
        the fit is planned (``fit.settings`` and ``fit.mesh`` are there, ``fit.plan`` not yet)."""
        return None

    def checkpoint_directory(self) -> Path | None:
        """The directory this callback writes checkpoints to, where ``fit(ckpt_path="last")``
        and ``fit(ckpt_path=<step>)`` look; ``None`` for callbacks that write none."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """What this callback needs to continue after a resume (saved in checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def on_fit_start(self, fit: FitContext, progress: FitProgress) -> None:
        """Called once, before the first step."""

    def on_train_epoch_start(self, fit: FitContext, progress: FitProgress) -> None:
        """Called before the first chunk of each epoch."""

    def on_train_chunk_end(self, fit: FitContext, progress: FitProgress, losses: np.ndarray, steps: range) -> None:
        """Called after each compiled chunk with its per-step ``losses`` for global ``steps``
        (per-step metrics of the chunk: ``fit.step_metrics``)."""

    def on_validation_end(self, fit: FitContext, progress: FitProgress) -> None:
        """Called after each validation pass; ``progress.metrics`` holds its results."""

    def on_train_epoch_end(self, fit: FitContext, progress: FitProgress) -> None:
        """Called after the last chunk of each epoch and after that epoch's validation."""

    def on_save_checkpoint(self, fit: FitContext, progress: FitProgress, checkpoint: dict[str, Any]) -> None:
        """Called when a checkpoint is assembled; may add entries to ``checkpoint``."""

    def on_load_checkpoint(self, fit: FitContext, progress: FitProgress, checkpoint: dict[str, Any]) -> None:
        """Called when a fit resumes from ``checkpoint``, before the first step."""

    def on_fit_end(self, fit: FitContext, progress: FitProgress) -> None:
        """Called once after the last step, also when a stop was requested."""

    def on_exception(self, fit: FitContext, progress: FitProgress, exception: BaseException) -> None:
        """Called when ``fit`` raises, before the exception propagates."""

    def teardown(self, fit: FitContext) -> None:
        """Called last, whether ``fit`` succeeded or not: release files and handles here."""


def overrides_state(callback: Callback) -> bool:
    """Whether ``callback`` keeps state of its own (it overrides :meth:`Callback.state_dict`)."""
    return type(callback).state_dict is not Callback.state_dict


def check_callbacks(callbacks: Sequence[Callback], fit: FitContext) -> None:
    """Refuse two callbacks that would save their state under one key, and step intervals
    that are not positive ints."""
    keys: dict[str, Callback] = {}
    for callback in callbacks:
        if not overrides_state(callback):
            continue
        other = keys.setdefault(callback.state_key, callback)
        if other is not callback:
            raise ConfigurationError(
                f"two callbacks, {type(other).__name__} and {type(callback).__name__}, save their state "
                f"under the same key {callback.state_key!r}, so a checkpoint could not tell them apart. "
                "Give one a different state_key (or remove the duplicate)."
            )
    bad = [type(c).__name__ for c in callbacks if (i := c.step_interval(fit)) is not None and not is_int_at_least(i, 1)]
    if bad:
        raise ConfigurationError(f"step_interval() must return a positive int or None; check {bad}.")


def calling_order(callbacks: Sequence[Callback]) -> list[Callback]:
    """``callbacks`` in the order hooks run: list order within each rank (others, monitors,
    checkpoint writers)."""
    return sorted(callbacks, key=lambda c: 2 if c.saves_checkpoints else int(c.monitors_metrics))


class CallbackList:
    """Calls one hook on every callback of a fit, in calling order, then hands what the hook
    logged to the loggers (``after_hook``). One method per hook: no hook is called by name."""

    def __init__(self, callbacks: Sequence[Callback], fit: FitContext, after_hook: Callable[[], None]) -> None:
        self.callbacks = calling_order(callbacks)
        self._fit = fit
        self._after_hook = after_hook

    def _progress(self) -> FitProgress:
        return self._fit.progress()

    def on_fit_start(self) -> None:
        progress = self._progress()
        for callback in self.callbacks:
            callback.on_fit_start(self._fit, progress)
        self._after_hook()

    def on_train_epoch_start(self) -> None:
        progress = self._progress()
        for callback in self.callbacks:
            callback.on_train_epoch_start(self._fit, progress)
        self._after_hook()

    def on_train_chunk_end(self, losses: np.ndarray, steps: range) -> None:
        progress = self._progress()
        for callback in self.callbacks:
            callback.on_train_chunk_end(self._fit, progress, losses, steps)
        self._after_hook()

    def on_validation_end(self) -> None:
        progress = self._progress()
        for callback in self.callbacks:
            callback.on_validation_end(self._fit, progress)
        self._after_hook()

    def on_train_epoch_end(self) -> None:
        progress = self._progress()
        for callback in self.callbacks:
            callback.on_train_epoch_end(self._fit, progress)
        self._after_hook()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        progress = self._progress()
        for callback in self.callbacks:
            callback.on_save_checkpoint(self._fit, progress, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        progress = self._progress()
        for callback in self.callbacks:
            callback.on_load_checkpoint(self._fit, progress, checkpoint)
        self._after_hook()

    def on_fit_end(self) -> None:
        progress = self._progress()
        for callback in self.callbacks:
            callback.on_fit_end(self._fit, progress)
        self._after_hook()

    def on_exception(self, exception: BaseException) -> None:
        """What was logged before the exception reaches the loggers; then every callback hears of
        the exception, even when another one's handler fails."""
        try:
            self._after_hook()
        except Exception as flush_error:
            warnings.warn(
                f"writing the logged values failed with {flush_error!r} while handling {exception!r}",
                RuntimeWarning,
                stacklevel=3,
            )
        progress = self._progress()
        for callback in self.callbacks:
            try:
                callback.on_exception(self._fit, progress, exception)
            except Exception as handler_error:
                warnings.warn(
                    f"{type(callback).__name__}.on_exception raised {handler_error!r} while handling {exception!r}",
                    RuntimeWarning,
                    stacklevel=3,
                )

    def teardown(self) -> None:
        for callback in self.callbacks:
            callback.teardown(self._fit)
