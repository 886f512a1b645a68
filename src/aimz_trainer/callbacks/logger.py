"""What a metrics logger records, and when; the concrete loggers only write.

A :class:`MetricLogger` turns the fit's hooks into rows of ``(step, epoch, {name: value})``:

===================  ================================  =================================
when                 scalars                           step they are written at
===================  ================================  =================================
every chunk          ``train_loss`` of each step s     s, for every s with
                     with ``(s + 1) % n == 0``         ``(s + 1) % log_every_n_steps == 0``
chunk ending at a    ``steps_per_sec``,                the chunk's last step
multiple of n        ``learning_rate`` (see below)
validation end       ``val_loss``, ``val_lpd``         the last step before validation
epoch end            ``train_loss_epoch``,             the epoch's last step
                     ``epoch_time``
===================  ================================  =================================

Steps are 0-based step indices, so the ``train_loss`` written at step s is ``losses[s]`` of
the fit's result. Only process 0 writes. A logger resumed at step r first discards what it
holds from step r on, so the resumed run's rows replace them.

The learning rate is read from the optimizer state when the optax optimizer is wrapped in
``optax.inject_hyperparams`` (the way optax exposes a scheduled learning rate), e.g.
``optax.inject_hyperparams(optax.adam)(learning_rate=optax.exponential_decay(...))``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from aimz_trainer.callbacks.base import Callback, FitProgress
from aimz_trainer.errors import ConfigurationError

if TYPE_CHECKING:
    from aimz_trainer.trainer import Trainer

__all__ = ["MetricLogger", "as_path", "learning_rate", "writable_directory"]

_EPOCH_METRICS = ("train_loss_epoch", "epoch_time")
_VALIDATION_METRICS = ("val_loss", "val_lpd")


def learning_rate(optim_state: Any) -> jax.Array | None:
    """The learning rate held in an ``optax.inject_hyperparams`` state, if there is one."""
    for node in jax.tree.leaves(optim_state, is_leaf=lambda x: hasattr(x, "hyperparams")):
        hyperparams = getattr(node, "hyperparams", None)
        if isinstance(hyperparams, Mapping) and "learning_rate" in hyperparams:
            return hyperparams["learning_rate"]
    return None


def as_path(path: Any, argument: str) -> Path:
    """``path`` as a :class:`~pathlib.Path`, or a :class:`ConfigurationError` naming ``argument``
    when it is no path: not a ``str`` or ``os.PathLike``, empty (``Path("")`` would be the
    working directory), or holding a NUL character (no file system takes one).

    Example:
        >>> as_path("runs/metrics.csv", "path")
        PosixPath('runs/metrics.csv')
    """
    text = os.fspath(path) if isinstance(path, str | os.PathLike) else None
    if not isinstance(text, str) or not text or "\x00" in text:
        raise ConfigurationError(f"{argument} must be a path (a non-empty str or os.PathLike); got {path!r}.")
    return Path(text)


def writable_directory(path: str | os.PathLike[str], argument: str) -> Path:
    """Create ``path`` if needed and prove it writable, or raise naming ``argument``."""
    directory = as_path(path, argument)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise ConfigurationError(
            f"{argument}={str(path)!r} cannot be written ({error.strerror or error}); pass a directory this "
            "process can create files in."
        ) from error
    return directory


class MetricLogger(Callback):
    """Base class of loggers: subclasses implement :meth:`open`, :meth:`write` and
    :meth:`close` (and may add to :meth:`on_train_epoch_end`)."""

    def __init__(self) -> None:
        self._open = False

    @property
    def is_writer(self) -> bool:
        """Only process 0 writes: every process sees the same metrics."""
        return jax.process_index() == 0

    def open(self, trainer: Trainer, resume_step: int) -> None:
        """Start writing; drop anything held at steps ``>= resume_step`` (0: a fresh run)."""
        raise NotImplementedError

    def write(self, step: int, epoch: int, scalars: Mapping[str, float]) -> None:
        """Record ``scalars`` at ``step``."""
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release the output; called once, whatever ended the fit."""
        raise NotImplementedError

    def on_fit_start(self, trainer: Trainer, progress: FitProgress) -> None:
        if self.is_writer:
            self.open(trainer, progress.step)
            self._open = True

    def on_train_chunk_end(self, trainer: Trainer, progress: FitProgress, losses: np.ndarray, steps: range) -> None:
        if not self._open:
            return
        every = trainer.log_every_n_steps
        for step in range(steps.start + (-(steps.start + 1)) % every, steps.stop, every):
            self.write(step, progress.epoch, {"train_loss": float(losses[step - steps.start])})
        if steps.stop % every == 0:
            scalars = {name: progress.metrics[name] for name in ("steps_per_sec",) if name in progress.metrics}
            rate = learning_rate(trainer.state.svi_state.optim_state)
            if rate is not None:
                scalars["learning_rate"] = float(rate)
            if scalars:
                self.write(steps.stop - 1, progress.epoch, scalars)

    def on_validation_end(self, trainer: Trainer, progress: FitProgress) -> None:
        self._write_present(progress, _VALIDATION_METRICS)

    def on_train_epoch_end(self, trainer: Trainer, progress: FitProgress) -> None:
        self._write_present(progress, _EPOCH_METRICS)

    def teardown(self, trainer: Trainer) -> None:
        if self._open:
            self._open = False
            self.close()

    def _write_present(self, progress: FitProgress, names: tuple[str, ...]) -> None:
        if self._open:
            scalars = {name: progress.metrics[name] for name in names if name in progress.metrics}
            self.write(progress.step - 1, progress.epoch, scalars)
