"""The chunk loop: dispatch, pipelining, non-finite losses, metrics, hooks and stop requests.

Python orchestrates around one compiled function. Each call runs one chunk of K SVI steps;
the loop keeps one call in flight and runs the previous chunk's hooks while the devices work
on the next, so the host never waits on a single step and the devices never wait for the
hooks. A stop requested by a hook drops the call in flight: the fit ends exactly where it was
requested; whether to stop at a boundary is :func:`~aimz_trainer.preemption.stop_at_boundary`'s
call (the processes of a multi-process fit agree on it). The loop sees the fit through its
:class:`~aimz_trainer.callbacks.FitContext`, never the Trainer.

The loop also keeps the fit's clock (:class:`~aimz_trainer.callbacks.context.FitTiming`): the
first chunk is start-up (compilation), validation passes are not training, and
``steps_per_sec`` is computed on training time alone, so it measures the training steps and
does not drop when a validation pass is slow.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import numpy as np

from aimz_trainer.callbacks.base import CallbackList
from aimz_trainer.callbacks.context import FitContext
from aimz_trainer.callbacks.logger import MetricLog
from aimz_trainer.compile import ChunkOutputs
from aimz_trainer.errors import NonFiniteLossError
from aimz_trainer.plan import Chunk, Every
from aimz_trainer.preemption import stop_at_boundary
from aimz_trainer.resume import capture_boundary
from aimz_trainer.step import TrainState
from aimz_trainer.validation import Validator

__all__ = ["ChunkLoop", "Records"]

Record = dict[str, Any]


class Records:
    """The Grain records of a fit's chunks as global arrays, with the loader's state after
    each (what a checkpoint records).

    The loader is opened (Grain imported, its threads started), and the first record read, on
    first use: a fit compiles from ``like`` (a record of the same shapes, known without Grain)
    when it has one, and opens the loader while the training chunk compiles.
    """

    def __init__(
        self, open_loader: Callable[[], Any], to_global: Callable[[Record], Record], like: Record | None = None
    ) -> None:
        self._open_loader = open_loader
        self._to_global = to_global
        self._like = like
        self._first_taken = False

    @functools.cached_property
    def _opened(self) -> tuple[Any, Record, dict[str, Any]]:
        """The loader, its first record and its state after it."""
        loader = self._open_loader()
        return loader, self._to_global(next(loader)), loader.get_state()

    @property
    def first(self) -> Record:
        """The first record (the loader opened if it was not)."""
        return self._opened[1]

    @property
    def like(self) -> Record:
        """A record of the records' shapes, what the fit's programs are traced with."""
        return self.first if self._like is None else self._like

    def __next__(self) -> tuple[Record, dict[str, Any]]:
        loader, first, first_state = self._opened
        if not self._first_taken:
            self._first_taken = True
            return first, first_state
        record = self._to_global(next(loader))
        return record, loader.get_state()

    def __iter__(self) -> Iterator[tuple[Record, dict[str, Any]]]:
        return self


class _Pending(NamedTuple):
    """A dispatched chunk whose results the hooks have not seen yet."""

    chunk: Chunk
    state: TrainState
    outputs: ChunkOutputs
    loader_state: dict[str, Any]


@dataclass
class ChunkLoop:
    """Runs the chunks of a fit from ``start_index`` on.

    Attributes:
        fit: the fit's context (its state and metrics are updated here).
        metric_log: where the loop's curves go.
        hooks: the fit's callbacks.
        chunk_fn: the compiled chunk, ``(state, device_data, record) -> (state, ChunkOutputs)``.
        device_data: the training arrays on the devices (empty with host placement).
        records: the chunks' records.
        validator: the validation pass, or ``None``.
        losses: every loss so far (a resumed fit's included); the loop appends.
        timings: ``first_chunk_s`` is set here.
        started: when the fit started (``time.perf_counter``).
        start_index: the first chunk to run.
        loader_state: the loader's state after the last finished chunk.
    """

    fit: FitContext
    metric_log: MetricLog
    hooks: CallbackList
    chunk_fn: Callable[..., tuple[TrainState, ChunkOutputs]]
    device_data: dict[str, jax.Array]
    records: Records
    validator: Validator | None
    losses: list[np.ndarray]
    timings: dict[str, float]
    started: float
    start_index: int = 0
    loader_state: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._plan = self.fit.plan
        self._log_every = Every(steps=self.fit.settings.log_every_n_steps)
        self._rate_since = (0, 0.0)  # (step, training seconds) the steps/s average counts from
        self._clock_mark = self.started  # when the training clock last read the time
        self._paused_s = 0.0  # seconds since the mark that were not training (validation)
        self._in_flight: ChunkOutputs | None = None  # the chunk dispatched last
        self._epoch_started = self.started  # the first epoch's time includes compilation
        self._epoch_losses: list[np.ndarray] = []

    def run(self, state: TrainState) -> TrainState:
        """Dispatch chunk c, then run chunk c-1's hooks while c runs.

        Chunk c is speculative: when c-1's hooks stop the fit (or its loss was not finite), c's
        results are dropped and the fit ends on c-1's state, which the compiled chunk leaves
        intact (it does not donate its input). A stop thus takes effect exactly at the
        boundary where it was requested (or, before the Trainer's ``min_steps`` /
        ``min_epochs``, at the first boundary past them: :attr:`FitContext.stop_due`), and the
        devices never wait for the hooks.
        """
        fit, plan = self.fit, self._plan
        pending: _Pending | None = None
        for index in range(self.start_index, plan.num_chunks):
            chunk = plan.chunks[index]
            record, loader_state = next(self.records)
            new_state, outputs = self.chunk_fn(state, self.device_data, record)
            self._in_flight = outputs
            if pending is not None and (not self._finish(pending) or stop_at_boundary(fit)):
                return state
            # After the previous epoch's end hooks (a resumed fit starts its epoch too).
            if chunk.first_step % plan.steps_per_epoch == 0 or index == self.start_index:
                self._start_epoch(chunk)
                if stop_at_boundary(fit):
                    return state
            state = new_state
            pending = _Pending(chunk, state, outputs, loader_state)
        if pending is not None:
            self._finish(pending)
        return state

    def _start_epoch(self, chunk: Chunk) -> None:
        self.fit.state.epoch = chunk.epoch
        done = np.concatenate(self.losses) if self.losses else np.zeros(0, np.float32)
        self._epoch_losses = [done[chunk.epoch * self._plan.steps_per_epoch :]]  # the part before a resume
        self.hooks.on_train_epoch_start()

    def _finish(self, pending: _Pending) -> bool:
        """Bring a chunk's results to the host and run its hooks; ``False`` after a non-finite
        loss (in ``"warn"`` mode; ``"raise"`` raises)."""
        fit, chunk = self.fit, pending.chunk
        losses, step_metrics, rate = jax.device_get(
            (pending.outputs.losses, pending.outputs.step_metrics, pending.outputs.learning_rate)
        )
        losses = np.asarray(losses)[: chunk.num_steps]
        now = time.perf_counter()
        log = self.metric_log
        timing = fit._timing
        if timing.startup_s is None:  # compilation and start-up: not a rate
            self.timings["first_chunk_s"] = now - self.started
            fit._timing = timing._replace(startup_s=now - self.started)
            self._rate_since = (chunk.first_step + chunk.num_steps, 0.0)
        else:
            fit._timing = timing = timing._replace(
                train_s=timing.train_s + (now - self._clock_mark - self._paused_s),
                train_steps=timing.train_steps + chunk.num_steps,
            )
            # Averaged since the last epoch's last results: with a chunk in flight, the time
            # between two chunks' results alone says little.
            steps = chunk.first_step + chunk.num_steps - self._rate_since[0]
            if timing.train_s > self._rate_since[1]:
                log.metrics["steps_per_sec"] = steps / (timing.train_s - self._rate_since[1])
        self._clock_mark, self._paused_s = now, 0.0
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size:
            self.losses.append(losses[: bad[0]])
            fit.state.step = chunk.first_step + int(bad[0])
            fit.state.svi_state = pending.state.svi_state  # frozen before the bad step
            fit.state.params = pending.outputs.params
            error = NonFiniteLossError(fit.state.step, float(losses[bad[0]]))
            if fit.settings.nonfinite_loss == "raise":
                raise error
            warnings.warn(str(error), RuntimeWarning, stacklevel=5)
            return False
        self.losses.append(losses)
        self._epoch_losses.append(losses)
        fit.state.step = end = chunk.first_step + chunk.num_steps
        fit.state.svi_state = pending.state.svi_state
        fit.state.params = pending.outputs.params
        self.loader_state = pending.loader_state
        fit.step_metrics = {name: np.asarray(values)[: chunk.num_steps] for name, values in step_metrics.items()}
        self._log_chunk(chunk, losses, rate)
        self.hooks.on_train_chunk_end(losses, chunk.steps)
        epoch_end = self._plan.is_epoch_end(chunk)
        if epoch_end:  # epochs are timed from one's last results to the next's
            epoch_loss = float(np.concatenate(self._epoch_losses).mean())
            log.log("train_loss_epoch", epoch_loss)
            log.log("train_loss_per_row_epoch", epoch_loss / self._plan.num_rows)
            log.log("epoch_time", now - self._epoch_started)
            self._epoch_started = now
            self._rate_since = (end, fit._timing.train_s)
        validator = self.validator
        if validator is not None and validator.every.due(end, chunk.epoch + 1 if epoch_end else None):
            # The training clock stops for the pass and its hooks. The chunk in flight finishes
            # first: the pass would queue behind it on the devices, and its time is training's.
            if self._in_flight is not None:
                jax.block_until_ready(self._in_flight.losses)
            paused = time.perf_counter()
            fit.log_dict(validator.run(pending.outputs.params))
            self.hooks.on_validation_end()
            validation_s = time.perf_counter() - paused
            self._paused_s += validation_s
            fit._timing = fit._timing._replace(validation_s=fit._timing.validation_s + validation_s)
        if epoch_end:
            self.hooks.on_train_epoch_end()
        if fit.record_boundaries:  # the fit is consistent here: what a save on exception writes
            fit.last_boundary = capture_boundary(
                fit, loader_state=self.loader_state, losses=self.losses, callbacks=self.hooks.callbacks
            )
        return True

    def _log_chunk(self, chunk: Chunk, losses: np.ndarray, rate: Any) -> None:
        """The chunk's curves: each step metric's per-step values at the logging steps, their
        chunk means as the latest values, and the rate and learning rate at a logging step."""
        log, steps = self.metric_log, chunk.steps
        # Per training row, as val_loss is (divided by the same row count): the two curves overlay.
        # In float64, so that the value written is train_loss / num_rows correctly rounded.
        per_row = losses.astype(np.float64) / self._plan.num_rows
        curves = {"train_loss": losses, "train_loss_per_row": per_row, **self.fit.step_metrics}
        for name, values in curves.items():
            log.log_steps(name, values, steps, self._log_every)
            log.metrics[name] = float(values.mean())
        if self._log_every.at_step(steps.stop):
            at = steps.stop - 1
            if "steps_per_sec" in log.metrics:
                log.log("steps_per_sec", log.metrics["steps_per_sec"], step=at)
            if rate is not None:
                log.log("learning_rate", float(rate), step=at)
