"""The logger interface: what every metrics logger implements, what it is sent, and the
:class:`MetricLog` that routes logged values to every logger.

A logger is a :class:`MetricLogger` callback: it implements :meth:`~MetricLogger.open`,
:meth:`~MetricLogger.write` and :meth:`~MetricLogger.close`; the fit decides what is written
and when, and sends every logger the same rows of ``(step, epoch, {name: value})``:

===================  ================================  =================================
when                 scalars                           step they are written at
===================  ================================  =================================
fit start            ``num_params`` (the default       0
                     ``ModelSummary``)
every chunk          ``train_loss``,                   s, for every s with
                     ``train_loss_per_row`` (and each  ``(s + 1) % log_every_n_steps == 0``
                     of the Trainer's
                     ``step_metrics``) of each step s
chunk ending at a    ``steps_per_sec``,                the chunk's last step
multiple of n        ``learning_rate`` (see below)
validation end       ``val_loss``, ``val_lpd``         the last step before validation
epoch end            ``train_loss_epoch``,             the epoch's last step
                     ``train_loss_per_row_epoch``,
                     ``epoch_time``
any hook             what callbacks ``fit.log(...)``   the last finished step
===================  ================================  =================================

``steps_per_sec`` is measured on the fit's training clock
(:class:`~aimz_trainer.callbacks.context.FitTiming`): the first chunk (compilation) and the
validation passes are left out, so a slow validation does not show as slow training.

Steps are 0-based step indices, so the ``train_loss`` written at step s is ``losses[s]`` of
the fit's result. Only process 0 writes. A logger resumed at step r first discards what it
holds from step r on, so the resumed run's rows replace them. A fit none of whose steps is
such an s writes no ``train_loss`` point; :func:`warn_if_no_train_loss_point` warns of it.

``train_loss`` is the step's negative ELBO, the model's own minibatch scaling included: a sum
over the whole data, so it grows with the row count. ``train_loss_per_row`` is that loss
divided by the number of training rows, the scale of ``val_loss`` (the held-out negative ELBO
divided by the same count), so the two curves overlay; ``train_loss_per_row_epoch`` is
``train_loss_epoch`` divided likewise.

The learning rate is read from the optimizer state when the optax optimizer is wrapped in
``optax.inject_hyperparams`` (the way optax exposes a scheduled learning rate), e.g.
``optax.inject_hyperparams(optax.adam)(learning_rate=optax.exponential_decay(...))``.
"""

from __future__ import annotations

import numbers
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from aimz_trainer.callbacks.base import Callback
from aimz_trainer.errors import ConfigurationError, LoggingWarning
from aimz_trainer.plan import Every, FitPlan

if TYPE_CHECKING:
    from aimz_trainer.callbacks.context import FitContext, TrainerState

__all__ = ["MetricLog", "MetricLogger", "as_path", "run_hparams", "warn_if_no_train_loss_point", "writable_directory"]


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
    """The logger interface: subclasses implement :meth:`open`, :meth:`write` and
    :meth:`close` (and may use any hook, e.g. for histograms). The fit opens every logger
    before ``on_fit_start``, writes to it after each hook, and closes it after ``teardown``.

    Example:
        >>> class PrintLogger(MetricLogger):
        ...     def open(self, fit, resume_step): pass
        ...     def write(self, step, epoch, scalars): print(step, dict(scalars))
        ...     def close(self): pass
    """

    @property
    def is_writer(self) -> bool:
        """Only process 0 writes: every process sees the same metrics."""
        return jax.process_index() == 0

    def open(self, fit: FitContext, resume_step: int | None) -> None:
        """Start writing; drop anything held at steps ``>= resume_step`` (0: a fresh run;
        ``None``: keep everything and add to it, as ``Trainer.validate``/``test`` do)."""
        raise NotImplementedError

    def write(self, step: int, epoch: int, scalars: Mapping[str, float]) -> None:
        """Record ``scalars`` at ``step``."""
        raise NotImplementedError

    def close(self) -> None:
        """Flush and release the output; called once, whatever ended the fit."""
        raise NotImplementedError


class MetricLog:
    """Routes logged values: into the fit's latest metrics at once (monitors that run later
    see them), and, after each hook, to every logger as a time series (process 0 only).

    A value is logged at the 0-based index of the last finished step (``step - 1``; 0 before
    the first step), the step the loggers' own curves use.
    """

    def __init__(self, metrics: dict[str, float], loggers: Sequence[MetricLogger], state: TrainerState) -> None:
        self.metrics = metrics
        self._loggers = [logger for logger in loggers if logger.is_writer]
        self._state = state
        self._pending: dict[int, dict[str, float]] = {}
        self._open: list[MetricLogger] = []

    def open(self, fit: FitContext, resume_step: int | None) -> None:
        """Start every logger; each drops what it holds at steps ``>= resume_step`` (``None``:
        nothing)."""
        for logger in self._loggers:
            logger.open(fit, resume_step)
            self._open.append(logger)

    def log(self, name: str, value: Any, *, step: int | None = None) -> None:
        """Record ``value`` as ``name``'s latest value and queue it for the loggers."""
        value = _scalar(name, value)
        self.metrics[name] = value
        at = max(self._state.step - 1, 0) if step is None else step
        self._pending.setdefault(at, {})[name] = value

    def log_steps(self, name: str, values: np.ndarray, steps: range, every: Every) -> None:
        """Queue per-step ``values`` (one per step of ``steps``) at the steps ``every`` picks."""
        for step in every.step_indices(steps):
            self._pending.setdefault(step, {})[name] = float(values[step - steps.start])

    def flush(self) -> None:
        """Write what is queued, step by step, to every open logger."""
        pending, self._pending = self._pending, {}
        for step in sorted(pending):
            for logger in self._open:
                logger.write(step, self._state.epoch, pending[step])

    def close(self) -> None:
        """Close every logger that was opened (once, whatever ended the fit)."""
        opened, self._open = self._open, []
        for logger in opened:
            logger.close()


def warn_if_no_train_loss_point(
    plan: FitPlan, start_index: int, log_every_n_steps: int, callbacks: Sequence[Callback]
) -> None:
    """Warn with a :class:`~aimz_trainer.errors.LoggingWarning` when a fit with loggers among
    ``callbacks`` will write no ``train_loss`` point: none of the steps it runs (from chunk
    ``start_index`` of ``plan``, where a resumed fit starts, to the end) is a step s with
    ``(s + 1) % log_every_n_steps == 0``. A fit with no step left to run is not warned about.

    Any ``log_every_n_steps`` of at most the number of steps run logs a point: n consecutive
    steps always hold one such s.

    Example:
        >>> import warnings
        >>> from aimz_trainer.callbacks import CSVLogger
        >>> plan = FitPlan.create(1000, 100, drop_last=False, max_epochs=3, max_steps=None, steps_per_chunk=None)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_if_no_train_loss_point(plan, 0, 50, [CSVLogger(tempfile.mkdtemp() + "/m.csv")])
        >>> print(caught[0].message)  # doctest: +ELLIPSIS
        this fit runs 30 steps (steps 0 to 29) and log_every_n_steps=50: ...
    """
    if not any(isinstance(callback, MetricLogger) for callback in callbacks):
        return  # nothing is written anyway
    start = plan.chunks[start_index].first_step if start_index < plan.num_chunks else plan.total_steps
    steps = range(start, plan.total_steps)
    if not steps or Every(steps=log_every_n_steps).step_indices(steps):
        return
    warnings.warn(
        f"this fit runs {len(steps)} steps (steps {steps.start} to {steps.stop - 1}) and "
        f"log_every_n_steps={log_every_n_steps}: the loggers get train_loss after every {log_every_n_steps}-th "
        "step only, so they will get no train_loss point (epoch means and validation metrics are still "
        f"written). Pass Trainer(log_every_n_steps=...) of at most {len(steps)}, or train longer.",
        LoggingWarning,
        stacklevel=3,
    )


def run_hparams(fit: FitContext) -> dict[str, Any]:
    """The settings of a fit that loggers record as its hyperparameters (those set: ``None``s
    are left out, as is the plan before a fit has one).

    Example:
        >>> from types import SimpleNamespace as S
        >>> fit = S(max_epochs=3, max_steps=None, settings=S(min_epochs=None, min_steps=None),
        ...         plan=S(batch_size=100, steps_per_epoch=10), log_every_n_steps=50, mesh=S(size=1))
        >>> run_hparams(fit)
        {'max_epochs': 3, 'batch_size': 100, 'steps_per_epoch': 10, 'log_every_n_steps': 50, 'num_devices': 1}
    """
    plan = fit.plan
    settings: dict[str, Any] = {
        "max_epochs": fit.max_epochs,
        "max_steps": fit.max_steps,
        "min_epochs": fit.settings.min_epochs,
        "min_steps": fit.settings.min_steps,
        "batch_size": None if plan is None else plan.batch_size,
        "steps_per_epoch": None if plan is None else plan.steps_per_epoch,
        "log_every_n_steps": fit.log_every_n_steps,
        "num_devices": fit.mesh.size,
    }
    return {name: value for name, value in settings.items() if value is not None}


def _scalar(name: Any, value: Any) -> float:
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"log: name must be a non-empty str; got {name!r}.")
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.ndarray | np.generic | jax.Array) and np.shape(value) == () and value.dtype.kind in "biuf":
        return float(value)  # a device scalar is fetched here: log host values in hot hooks
    raise ConfigurationError(
        f"log({name!r}, ...): the value must be a real number or a 0-d numeric array; got {value!r}."
    )
