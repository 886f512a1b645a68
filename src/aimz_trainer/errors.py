"""The library's exception types, in one place.

Every error raised on purpose by aimz_trainer derives from :class:`AimzTrainerError`, and each
also derives from the built-in type a Python user would expect (``ValueError`` for bad
arguments), so ``except ValueError`` keeps working. Every warning derives from
:class:`AimzWarning`; the reference library's names (``KernelValidationError``,
``NotFittedError``, ``AimzWarning``, ``FitWarning``, ``OutputWarning``,
``PerformanceWarning``) are here with the same bases, so its users' ``except`` clauses and
warning filters keep working.

One exception type is not an error: :class:`FitPreempted`, raised when a fit stops on a
preemption signal, derives from ``SystemExit`` (not from ``Exception``), so that ``except
Exception`` does not swallow it and, uncaught, it ends the process with the exit status a job
scheduler expects of a process ended by that signal.
"""

from __future__ import annotations

import signal
from pathlib import Path

__all__ = [
    "AimzTrainerError",
    "AimzWarning",
    "CheckpointError",
    "CheckpointWarning",
    "CommandLineError",
    "ConfigurationError",
    "DataError",
    "DistributedError",
    "FitPreempted",
    "FitWarning",
    "KernelArgumentError",
    "KernelValidationError",
    "LoggingWarning",
    "MetricNotFoundError",
    "MinibatchScalingWarning",
    "NonFiniteLossError",
    "NonFinitePredictionError",
    "NotFittedError",
    "OutputWarning",
    "PerformanceWarning",
    "SamplingNoiseWarning",
    "StoreError",
    "StoreWarning",
]


class AimzTrainerError(Exception):
    """Base class of every error aimz_trainer raises on purpose."""


class CheckpointError(AimzTrainerError, OSError):
    """A checkpoint cannot be found, read, or used for this fit (nothing was changed on disk)."""


class ConfigurationError(AimzTrainerError, ValueError):
    """A Trainer or fit argument has a value the library cannot use."""


class CommandLineError(ConfigurationError):
    """The ``aimz-trainer`` command was given an option, a config key or a value it cannot use
    (the command exits with status 2); the message names the option and what it accepts."""


class DataError(AimzTrainerError, ValueError):
    """The training data do not fit the model or the requested batching."""


class NonFiniteLossError(AimzTrainerError, FloatingPointError):
    """The ELBO loss became NaN or infinite.

    Attributes:
        step: the global step (0-based) whose loss was not finite; the trainer's state is the
            one from before that step.
        loss: the offending loss value.
    """

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(
            f"the ELBO loss at step {step} is {loss}; training stopped and trainer.state holds "
            "the state from before that step. Lower the learning rate, check the data for "
            "NaN/inf, or pass nonfinite_loss='warn' to stop with a warning instead."
        )
        self.step = step
        self.loss = loss


class NonFinitePredictionError(AimzTrainerError, FloatingPointError):
    """A batch of predictions holds NaN or infinite values that the model computed from finite
    inputs and draws (an overflow, a log of a negative number, ...); the store is left
    incomplete, holding only the batches before it.

    Attributes:
        rows: the batch's first and last row (``(start, stop)``).
        counts: site -> how many of its values in the batch are not finite (for a discrete
            site: draws from NaN parameters, which would read as a plausible 0).
    """

    def __init__(self, rows: tuple[int, int], counts: dict[str, int], store: str) -> None:
        found = "; ".join(f"{site!r}: {count:,}" for site, count in counts.items())
        super().__init__(
            f"the predictions of rows {rows[0]:,} to {rows[1]:,} hold non-finite values ({found}), computed from "
            f"finite data and draws: the model overflows or takes a log/sqrt of a negative number there. The store "
            f"{store!r} holds the batches before them and is marked incomplete. Pass check_finite=False to the "
            "Predictor to write NaN instead."
        )
        self.rows = rows
        self.counts = counts


class MetricNotFoundError(AimzTrainerError, KeyError):
    """A callback monitors a metric the fit does not log.

    Attributes:
        monitor: the requested name.
        available: the metric names that exist at that point.
    """

    def __init__(self, monitor: str, available: list[str], owner: str) -> None:
        super().__init__(monitor)
        self.monitor = monitor
        self.available = available
        self.owner = owner

    def __str__(self) -> str:
        hint = " (val_* metrics exist only when the fit gets val_data)" if self.monitor.startswith("val_") else ""
        return (
            f"{self.owner} monitors {self.monitor!r}, which this fit does not log{hint}. "
            f"Available metrics: {self.available}."
        )


class StoreError(AimzTrainerError, OSError):
    """A prediction store is incomplete, damaged, or cannot be continued."""


class NotFittedError(AimzTrainerError, ValueError, AttributeError):
    """A method needs a fitted model (posterior draws) and ``fit`` has not run yet.

    A ``ValueError`` and an ``AttributeError``, as in the reference library, so code that
    catches either there catches it here."""


class DistributedError(AimzTrainerError, RuntimeError):
    """The processes of a multi-process run cannot join, or disagree on the run."""


class FitPreempted(SystemExit):
    """A fit stopped on a preemption signal (SIGTERM, SIGUSR1; see :mod:`aimz_trainer.preemption`)
    after saving a checkpoint where it stopped; ``trainer.fit(..., ckpt_path="last")`` in a new
    process continues it as if it had never stopped.

    A ``SystemExit``: uncaught, it ends the process without a traceback, with exit status
    ``128 + signal`` (143 for SIGTERM), which is what a job scheduler sees of a process the
    signal killed, so a pipeline never mistakes a preempted fit for a finished one. Catch it
    (``except FitPreempted``) to act before exiting; ``except Exception`` does not catch it.

    Attributes:
        signal: the signal the fit stopped on (every process of a multi-process fit reports the
            same one, whichever process received it).
        step: the step the fit stopped at, where its checkpoint is.
        checkpoint: the step directory of that checkpoint (that of the fit's first
            :class:`~aimz_trainer.callbacks.ModelCheckpoint`), or ``None`` when there is none: the
            fit has no ModelCheckpoint, or it stopped before its first chunk (there is nothing new
            to save).
        code: the exit status, ``128 + signal``.

    Example:
        >>> error = FitPreempted(signal.SIGTERM, 120, Path("checkpoints/120"))
        >>> error.code, isinstance(error, Exception)
        (143, False)
        >>> print(error)
        the fit stopped on SIGTERM at step 120 and saved checkpoints/120; continue it with fit(..., ckpt_path='last')
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        super().__init__(128 + int(signum))
        self.signal = signal.Signals(signum)
        self.step = step
        self.checkpoint = checkpoint

    def __str__(self) -> str:
        if self.checkpoint is None:
            return f"the fit stopped on {self.signal.name} at step {self.step} without a checkpoint of that step"
        return (
            f"the fit stopped on {self.signal.name} at step {self.step} and saved {self.checkpoint}; continue it "
            "with fit(..., ckpt_path='last')"
        )


class KernelValidationError(ConfigurationError):
    """A kernel cannot be used as an ``ImpactModel``'s: its signature (variable or
    positional-only arguments, a missing input or output parameter, defaults) or its sites (no
    output site, an unobserved output, a reserved or invalid site name)."""


class KernelArgumentError(AimzTrainerError, TypeError):
    """A keyword argument meant for the kernel is not one of its parameters, or is one the
    method sets itself (the input or the output parameter)."""


class AimzWarning(UserWarning):
    """Base class of every warning aimz_trainer issues."""


class FitWarning(AimzWarning, RuntimeWarning):
    """A fit ran, but its result may be unreliable."""


class LoggingWarning(FitWarning):
    """A fit runs, but its loggers will miss a curve they would be expected to hold: no
    ``train_loss`` point, when none of the fit's steps is one that ``log_every_n_steps`` logs."""


class OutputWarning(AimzWarning):
    """An output may differ from what was expected."""


class PerformanceWarning(AimzWarning):
    """A call runs correctly, but by a fallback or slower path."""


class MinibatchScalingWarning(FitWarning):
    """A model's observed site is not inside a subsampled plate, so the likelihood of a
    minibatch is not scaled up to the whole data (the prior weighs too much)."""


class CheckpointWarning(AimzWarning):
    """A checkpoint is used, but not quite as asked: a damaged newer checkpoint was skipped for
    an older one, or a resumed fit trains on other data or with other optimizer settings than
    the fit that wrote it."""


class StoreWarning(AimzWarning):
    """A prediction store is continued, but not from where it was recorded: written chunks that
    are missing or damaged are computed again."""


class SamplingNoiseWarning(OutputWarning):
    """An effect is estimated from two prediction trees drawn with different random keys or
    posterior draws: the difference carries their sampling noise, not the effect alone."""
