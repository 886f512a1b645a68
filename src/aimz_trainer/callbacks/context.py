"""What a callback sees of a running fit: the :class:`FitContext` and :class:`FitProgress`.

A hook gets the context, not the Trainer: the fit's position and metrics, its settings and
mesh, where its time went (:class:`FitTiming`), the current parameters, posterior draws, and
the three things a callback may do to a fit: ``log`` values, ``request_stop``, and
(checkpointing callbacks) take a ``snapshot``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh
from numpyro.infer.svi import SVIState

from aimz_trainer._checks import as_key, is_int_at_least
from aimz_trainer.errors import ConfigurationError
from aimz_trainer.plan import FitPlan

if TYPE_CHECKING:
    from aimz_trainer.resume import Boundary

__all__ = ["FitContext", "FitProgress", "FitTiming", "TrainerSettings", "TrainerState"]

Params = dict[str, jax.Array]


class FitProgress(NamedTuple):
    """Where a running fit is, in host values.

    Attributes:
        step: number of SVI steps finished so far.
        epoch: the current epoch, counted from 0.
        metrics: the latest value of each metric (``train_loss``, ``steps_per_sec``, and
            whatever callbacks logged), read-only and current: a value logged by a callback
            that ran earlier in the same hook is already here.
    """

    step: int
    epoch: int
    metrics: Mapping[str, float]


class FitTiming(NamedTuple):
    """Where a fit's wall time went, in seconds, as of the newest chunk whose results reached
    the host: start-up once, then a training clock that stops during validation.

    The first chunk's time is start-up, not training: it holds the argument checks, the data
    placement, compilation, a checkpoint's restore, the ``on_fit_start`` hooks and the first
    chunk's own steps. From its results on, every second is training time except the
    validation passes (each with its ``on_validation_end`` hooks; the chunk in flight when a
    pass is due finishes first and counts as training). Hooks of other kinds run while the
    devices work on the next chunk, and their time counts as training: what they cost shows in
    the rate.

    Attributes:
        startup_s: from the ``fit`` call to the first chunk's results; ``None`` before them.
        train_s: training seconds since then.
        train_steps: the steps ``train_s`` covers: every step finished after the first chunk.
        validation_s: seconds spent in validation passes (the first pass's compilation
            included).

    Example:
        >>> timing = FitTiming(startup_s=2.5, train_s=4.0, train_steps=1000, validation_s=1.0)
        >>> timing.steps_per_sec
        250.0
    """

    startup_s: float | None = None
    train_s: float = 0.0
    train_steps: int = 0
    validation_s: float = 0.0

    @property
    def steps_per_sec(self) -> float:
        """``train_steps / train_s``: the training rate since start-up (NaN before a timed step)."""
        return self.train_steps / self.train_s if self.train_s > 0 else float("nan")


@dataclass
class TrainerState:
    """The trainer's live state: where the fit is and the newest SVI state.

    Attributes:
        step: SVI steps finished.
        epoch: current epoch, from 0.
        svi_state: the ``SVIState`` after ``step`` steps; after a non-finite loss, the last
            good one.
        rng_key: the key the fit's randomness derives from.
        params: the constrained variational parameters of ``svi_state``.
    """

    step: int
    epoch: int
    svi_state: SVIState | None
    rng_key: jax.Array
    params: Params | None = None


class TrainerSettings(NamedTuple):
    """The Trainer's settings that shape a fit (recorded in checkpoints and hyperparameters)."""

    max_epochs: int | None
    max_steps: int | None
    log_every_n_steps: int
    check_val_every_n_epoch: int | None
    val_check_interval: int | float | None
    steps_per_chunk: int | None
    nonfinite_loss: str
    step_metrics: tuple[str, ...]
    min_epochs: int | None = None
    min_steps: int | None = None


@dataclass
class FitContext:
    """What a callback may read of a running fit, and do to it.

    Read: :attr:`step`, :attr:`epoch`, :attr:`metrics`, :attr:`mesh`, :attr:`plan` (batch size,
    steps per epoch, chunks), :attr:`timing`, the Trainer's :attr:`settings`, :attr:`step_metrics` of the last
    chunk, :meth:`current_params`, :meth:`sample_posterior`. Do: :meth:`log` /
    :meth:`log_dict` (a time series in every logger), :meth:`request_stop`, and, for
    checkpointing callbacks, :meth:`snapshot`.

    :attr:`stop_signal` is the signal a fit stopped on (:mod:`aimz_trainer.preemption`), set at
    the chunk boundary where it stops. A callback that must be able to save the fit's last
    consistent state after an exception sets :attr:`record_boundaries` (in ``on_fit_start``);
    the fit then keeps :attr:`last_boundary` at every chunk boundary, and
    ``snapshot(last_boundary)`` makes a checkpoint of it.

    Example:
        >>> from aimz_trainer import Callback
        >>> class GapToBest(Callback):
        ...     def on_validation_end(self, fit, progress):
        ...         fit.log("val_gap", progress.metrics["val_loss"] - progress.metrics["train_loss"])
    """

    state: TrainerState
    mesh: Mesh
    settings: TrainerSettings
    has_validation: bool
    posterior_key: jax.Array
    _metrics: dict[str, float]
    _log: Callable[[str, Any], None]
    plan: FitPlan = None  # type: ignore[assignment]  # set once planned, before any hook
    _sample: Callable[[SVIState, jax.Array, int], dict[str, jax.Array]] | None = None
    _snapshot: Callable[[Boundary | None], dict[str, Any]] | None = None
    step_metrics: Mapping[str, np.ndarray] = field(default_factory=dict)
    should_stop: bool = False
    stop_reason: str | None = None
    stop_forced: bool = False
    _draws: dict[int, tuple[int, dict[str, jax.Array]]] = field(default_factory=dict)
    # Where the fit's checkpointing callbacks write (``Callback.checkpoint_directory``), for
    # loggers that upload the checkpoints.
    checkpoint_directories: tuple[Path, ...] = ()
    # Written by the chunk loop only; callbacks read it through ``timing``.
    _timing: FitTiming = field(default_factory=FitTiming)
    # The signal the fit stopped on at a chunk boundary (every process agrees on it); None when
    # it did not stop on one (aimz_trainer.preemption).
    stop_signal: int | None = None
    _received_signal: int | None = None  # set by the signal handler: received, maybe not acted on
    # A callback that may have to save the last consistent state after an exception sets it.
    record_boundaries: bool = False
    last_boundary: Boundary | None = None

    @property
    def step(self) -> int:
        """SVI steps finished."""
        return self.state.step

    @property
    def epoch(self) -> int:
        """The current epoch, from 0."""
        return self.state.epoch

    @property
    def metrics(self) -> Mapping[str, float]:
        """The latest value of every metric, read-only and current."""
        return MappingProxyType(self._metrics)

    @property
    def timing(self) -> FitTiming:
        """Start-up, training and validation seconds so far (a :class:`FitTiming`, read-only):
        ``fit.timing.steps_per_sec`` is the training rate with validation and compilation left
        out."""
        return self._timing

    @property
    def callback_metrics(self) -> Mapping[str, float]:
        """:attr:`metrics`, under the Trainer's name for them."""
        return self.metrics

    @property
    def svi_state(self) -> SVIState:
        """The ``SVIState`` after :attr:`step` steps."""
        assert self.state.svi_state is not None
        return self.state.svi_state

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    @property
    def max_epochs(self) -> int | None:
        return self.settings.max_epochs

    @property
    def max_steps(self) -> int | None:
        return self.settings.max_steps

    @property
    def log_every_n_steps(self) -> int:
        return self.settings.log_every_n_steps

    def progress(self) -> FitProgress:
        """A :class:`~aimz_trainer.callbacks.FitProgress` of where the fit is now."""
        return FitProgress(self.state.step, self.state.epoch, self.metrics)

    def log(self, name: str, value: float) -> None:
        """Log ``value`` (a number, or a 0-d array) as metric ``name`` at the current step:
        every logger records it as a time series (process 0 writes), it becomes
        ``trainer.callback_metrics[name]``, and callbacks that run after this one in the same
        hook (monitors such as ``EarlyStopping``) already see it. A resumed fit's loggers drop
        what they hold from the resume step on, so values are logged once per step."""
        self._log(name, value)

    def log_dict(self, values: Mapping[str, float]) -> None:
        """:meth:`log` each item of ``values``."""
        if not isinstance(values, Mapping):
            raise ConfigurationError(f"log_dict takes a mapping of names to values; got {type(values).__name__}.")
        for name, value in values.items():
            self._log(name, value)

    def request_stop(self, reason: str | None = None, *, force: bool = False) -> None:
        """Ask the fit to stop at the next chunk boundary (``on_fit_end`` still runs).

        Before the Trainer's ``min_steps`` and ``min_epochs`` are done, the fit goes on and
        stops at the first boundary past them (early stopping cannot cut a fit shorter than
        asked); ``force=True`` stops at the next boundary regardless (time limits, preemption).
        """
        self.should_stop = True
        self.stop_reason = reason
        self.stop_forced = self.stop_forced or force

    @property
    def minimum_done(self) -> bool:
        """Whether the Trainer's ``min_steps`` and ``min_epochs`` are done."""
        settings, step = self.settings, self.state.step
        if settings.min_steps is not None and step < settings.min_steps:
            return False
        return settings.min_epochs is None or step >= settings.min_epochs * self.plan.steps_per_epoch

    @property
    def stop_due(self) -> bool:
        """Whether a requested stop takes effect at this boundary (see :meth:`request_stop`)."""
        return self.should_stop and (self.stop_forced or self.minimum_done)

    def current_params(self) -> Params:
        """The constrained variational parameters at :attr:`step`, as the compiled chunk that
        produced them computed them (free: no device work)."""
        assert self.state.params is not None
        return self.state.params

    def sample_posterior(self, num_samples: int, rng_key: jax.Array | None = None) -> dict[str, jax.Array]:
        """``num_samples`` draws from the guide at :attr:`step` (compiled once per count).

        Args:
            num_samples: number of draws (a positive int).
            rng_key: defaults to the fit's posterior key, so the same fit gives the same draws;
                with it, a second call at the same step returns the same draws, not a copy.
        """
        if not is_int_at_least(num_samples, 1):
            raise ConfigurationError(f"num_samples must be a positive int; got {num_samples!r}.")
        num_samples = int(num_samples)
        if self._sample is None or self.state.svi_state is None:
            raise ConfigurationError("sample_posterior() needs a compiled fit: call it from a hook or after fit.")
        if rng_key is not None:
            return self._sample(self.svi_state, as_key(rng_key), num_samples)
        cached = self._draws.get(num_samples)
        if cached is None or cached[0] != self.state.step:
            self._draws.pop(num_samples, None)  # re-inserted: the newest last
            cached = self._draws[num_samples] = (
                self.state.step,
                self._sample(self.svi_state, self.posterior_key, num_samples),
            )
        return cached[1]

    def final_draws(self) -> dict[str, jax.Array] | None:
        """The newest draws taken with the posterior key at the current step, if any."""
        taken = [draws for step, draws in self._draws.values() if step == self.state.step]
        return taken[-1] if taken else None

    def snapshot(self, boundary: Boundary | None = None) -> dict[str, Any]:
        """The fit as it stands, as a checkpoint: ``{"state": named arrays, "meta": JSON}``,
        after every callback's ``on_save_checkpoint`` (checkpointing callbacks hand it to
        :func:`aimz_trainer.checkpoint.save_args`). Only while the fit runs its chunks.

        Args:
            boundary: a checkpoint of the fit as it stood at this earlier chunk boundary instead
                (:attr:`last_boundary`).
        """
        if self._snapshot is None:
            raise ConfigurationError("snapshot() is for hooks of a running fit (from on_fit_start on).")
        return self._snapshot(boundary)
