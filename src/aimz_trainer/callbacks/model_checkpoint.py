"""Save checkpoints during a fit with orbax-checkpoint; keep the last and the best."""

from __future__ import annotations

import datetime
import logging
import math
import os
import shutil
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import jax

from aimz_trainer._checks import is_int_at_least, require_bool, require_choice
from aimz_trainer.callbacks.base import Callback, state_key_of
from aimz_trainer.callbacks.logger import writable_directory
from aimz_trainer.checkpoint import checkpoint_steps, newest_checkpoint, read_meta, save_args, warn_checkpoint
from aimz_trainer.errors import (
    CheckpointError,
    ConfigurationError,
    FitPreempted,
    MetricNotFoundError,
    NonFiniteLossError,
)
from aimz_trainer.plan import Every

if TYPE_CHECKING:
    import orbax.checkpoint as ocp
    from orbax.checkpoint.checkpoint_managers import BestN

    from aimz_trainer.callbacks.context import FitContext, FitProgress

__all__ = ["ModelCheckpoint"]


class ModelCheckpoint(Callback):
    """Writes a checkpoint every N epochs and/or every N steps; keeps the best and the last.

    A checkpoint holds everything a fit needs to continue bit for bit (see
    :mod:`aimz_trainer.checkpoint`). Saves are asynchronous: the loop only copies the state to
    the host (its arrays are small and ready) and hands it to a writer thread, which runs the
    orbax ``CheckpointManager`` save, one at a time, while the devices keep training. The fit
    waits for the last save before it returns, and a failed save raises from ``fit`` (at the
    next save or at the end). Resume with ``trainer.fit(..., ckpt_path="last")``; ``save_top_k``
    then also ranks the checkpoints already in ``dirpath`` (by the score each one recorded), so
    a resumed fit leaves the same checkpoints as an uninterrupted one.

    Outside its schedule it saves when the fit stops on a preemption signal (SIGTERM, SIGUSR1:
    :mod:`aimz_trainer.preemption`), the state the fit stopped at; with ``save_on_exception``,
    also when ``fit`` raises. Such a save before ``monitor`` is first logged is kept unranked
    (``last_model_score`` is ``None``); keep ``save_last`` on so that ``save_top_k`` keeps it.

    Args:
        dirpath: the directory of the checkpoints (``<dirpath>/<step>``), created if needed.
        every_n_epochs: save after every N-th epoch (``None`` or 0: not at epoch ends).
        every_n_train_steps: save every N steps (chunks end there).
        monitor: a metric to rank checkpoints by (e.g. ``"val_loss"``); ``None``: keep the
            newest ones.
        mode: ``"min"`` or ``"max"``: which values of ``monitor`` are better.
        save_top_k: how many checkpoints to keep (the best ones by ``monitor``, else the
            newest); ``-1`` keeps all.
        save_last: also keep the newest checkpoint, whatever its rank.
        async_save: write in the background (``False``: the loop waits for every save).
        save_on_exception: when ``fit`` raises (``KeyboardInterrupt``, a
            :class:`~aimz_trainer.errors.NonFiniteLossError`, a callback's error), save the fit as
            it stood at its last chunk boundary, before the exception propagates. Not the state
            at the moment of the exception: it may have come in the middle of a chunk's results
            or of a hook, and that state is not one a fit can continue from; at the boundary,
            parameters, optimizer, loader, losses and every callback's state belong together, so
            ``ckpt_path="last"`` continues from it bit for bit. Nothing is written when that
            boundary is saved already, or when the fit raised before finishing a chunk. In a
            multi-process fit only an exception that every process raises at the same point is
            saved (a ``NonFiniteLossError``): another one may have come in one process alone,
            which cannot write a checkpoint without the others (a warning says so). Costs a copy
            of the callbacks' states at every chunk boundary.

    Attributes:
        best_model_path: the step directory of the best checkpoint so far (of the newest one
            when nothing is monitored).
        best_model_score: its ``monitor`` value.
        last_model_path: the newest checkpoint.
        last_model_score: its ``monitor`` value (each checkpoint records its own).

    Example:
        >>> import tempfile
        >>> checkpoint = ModelCheckpoint(tempfile.mkdtemp(), monitor="val_loss", save_top_k=2)
        >>> checkpoint.state_key
        "ModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': None, 'every_n_epochs': 1}"
    """

    monitors_metrics = True
    saves_checkpoints = True

    def __init__(
        self,
        dirpath: str | os.PathLike[str],
        every_n_epochs: int | None = 1,
        every_n_train_steps: int | None = None,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        save_top_k: int = 1,
        save_last: bool = True,
        *,
        async_save: bool = True,
        save_on_exception: bool = False,
    ) -> None:
        for name, value in [("every_n_epochs", every_n_epochs), ("every_n_train_steps", every_n_train_steps)]:
            if value is not None and not is_int_at_least(value, 0):
                raise ConfigurationError(f"ModelCheckpoint {name} must be an int >= 0 or None; got {value!r}.")
        require_choice("ModelCheckpoint mode", mode, ("min", "max"))
        require_bool("ModelCheckpoint save_last", save_last)
        require_bool("ModelCheckpoint async_save", async_save)
        require_bool("ModelCheckpoint save_on_exception", save_on_exception)
        if isinstance(save_top_k, bool) or not isinstance(save_top_k, int) or save_top_k < -1 or save_top_k == 0:
            raise ConfigurationError(
                f"ModelCheckpoint save_top_k must be a positive int or -1 (all); got {save_top_k!r}."
            )
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ConfigurationError(f"ModelCheckpoint monitor must be a metric name or None; got {monitor!r}.")
        self.dirpath = writable_directory(dirpath, "dirpath").resolve()
        self.every_n_epochs = every_n_epochs or None
        self.every_n_train_steps = every_n_train_steps or None
        self.every = Every(steps=self.every_n_train_steps, epochs=self.every_n_epochs)
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = save_top_k
        self.save_last = save_last
        self.async_save = async_save
        self.save_on_exception = save_on_exception
        self.best_model_path: str | None = None
        self.best_model_score: float | None = None
        self.last_model_path: str | None = None
        self.last_model_score: float | None = None
        self._scores: dict[int, float] = {}  # step -> monitor value of the checkpoints in dirpath
        self._manager: ocp.CheckpointManager | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None
        self._last_saved_step: int | None = None

    @property
    def state_key(self) -> str:
        return state_key_of(
            self,
            monitor=self.monitor,
            mode=self.mode,
            every_n_train_steps=self.every_n_train_steps,
            every_n_epochs=self.every_n_epochs,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_model_path": self.best_model_path,
            "best_model_score": self.best_model_score,
            "last_model_path": self.last_model_path,
            "last_model_score": self.last_model_score,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_model_path = state["best_model_path"]
        self.best_model_score = state["best_model_score"]
        self.last_model_path = state["last_model_path"]
        self.last_model_score = state["last_model_score"]

    def step_interval(self, fit: FitContext) -> int | None:
        return self.every_n_train_steps

    def checkpoint_directory(self) -> Path:
        return self.dirpath

    def on_fit_start(self, fit: FitContext, progress: FitProgress) -> None:
        import orbax.checkpoint as ocp  # here, not at module level: its import takes a quarter of a second

        self._last_saved_step = progress.step if progress.step else None  # a resume: that one exists
        if self.save_on_exception:
            fit.record_boundaries = True  # the fit keeps its last consistent state: what on_exception saves
        # A resume ranks the checkpoints its run wrote before; a fresh fit leaves others' alone.
        ranks_saved = progress.step > 0 and self.monitor is not None and self.save_top_k != -1
        self._scores = self._saved_scores() if ranks_saved else {}
        options = ocp.CheckpointManagerOptions(
            # Our writer thread is the asynchrony: orbax's own (a thread and event loops per
            # save) cost 5 ms more CPU per save and still held the loop for 9 ms.
            enable_async_checkpointing=False,
            preservation_policy=self._preservation_policy(),
            enable_background_delete=True,  # removing a superseded checkpoint must not stall training
            create=False,  # made here: orbax cannot with several processes
            # Several processes: orbax's barriers go through the distributed runtime's
            # key-value store. Its default, a collective on the devices, would run on the writer
            # thread beside the training step's collectives, and two threads issuing
            # collectives in different orders on different processes deadlock.
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                active_processes=set(range(jax.process_count())) if jax.process_count() > 1 else None
            ),
        )
        self.dirpath.mkdir(parents=True, exist_ok=True)
        logging.getLogger("absl").addFilter(_FAILED_SAVE_LOGS)
        self._manager = ocp.CheckpointManager(self.dirpath, options=options)
        if self.async_save:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aimz-checkpoint")

    def _preservation_policy(self) -> Any:
        from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN, preservation_policy

        if self.save_top_k == -1:
            return preservation_policy.PreserveAll()
        if self.monitor is None:
            return LatestN(self.save_top_k)
        monitor = self.monitor
        best = BestN(get_metric_fn=lambda metrics: metrics[monitor], reverse=self.mode == "min", n=self.save_top_k)
        ranked = _RankedByScores(best, monitor, self._scores)
        return AnyPreservationPolicy([ranked, LatestN(1)]) if self.save_last else ranked

    def _saved_scores(self) -> dict[int, float]:
        """The score of each checkpoint already in ``dirpath``, from its meta (this callback's
        ``last_model_score``). One without (unreadable, or written by another callback) is not
        ranked, and so is kept."""
        scores = {}
        for step in checkpoint_steps(self.dirpath):
            try:
                state = read_meta(self.dirpath / str(step))["callbacks"].get(self.state_key)
            except CheckpointError:
                continue
            if state is not None and state.get("last_model_score") is not None:
                scores[step] = state["last_model_score"]
        return scores

    def on_train_chunk_end(self, fit: FitContext, progress: FitProgress, losses: Any, steps: range) -> None:
        if self.every.at_step(steps.stop):
            self.save(fit, progress)

    def on_train_epoch_end(self, fit: FitContext, progress: FitProgress) -> None:
        if self.every.at_epoch_end(progress.epoch + 1):
            self.save(fit, progress)

    def save(self, fit: FitContext, progress: FitProgress) -> None:
        """Write a checkpoint of the fit as it is now (in the background unless ``async_save``
        is off); raises the error of a previous save that failed."""
        self._save(progress.step, progress.metrics, fit.snapshot)

    def save_now(self, fit: FitContext) -> Path | None:
        """Write a checkpoint of the fit as it is now, outside the schedule: what a fit stopped by
        a preemption signal does (:mod:`aimz_trainer.preemption`). A ``monitor`` not logged yet
        leaves it unranked.

        Returns:
            The step directory of this callback's checkpoint of the fit's step, written now or
            before (a resumed fit's own), or ``None`` when there is none: a fit that has not
            finished a chunk yet has nothing to save.
        """
        if fit.step > 0:
            self._save(fit.step, fit.metrics, fit.snapshot, unranked_without_monitor=True)
        path = self.dirpath / str(fit.step)
        return path if self.last_model_path == str(path) else None

    def _save(
        self,
        step: int,
        metrics: Mapping[str, float],
        take_snapshot: Callable[[], dict[str, Any]],
        *,
        unranked_without_monitor: bool = False,
        in_background: bool = True,
    ) -> None:
        """Write the checkpoint ``take_snapshot`` makes of ``step``, with the ``metrics`` of that
        step; raises the error of a previous save that failed."""
        if self._manager is None or step == self._last_saved_step:
            return
        self._wait_for_pending()
        scores = None
        if self.monitor is not None:
            if self.monitor in metrics:
                scores = {self.monitor: float(metrics[self.monitor])}
            elif not unranked_without_monitor:
                raise MetricNotFoundError(self.monitor, sorted(metrics), "ModelCheckpoint")
        path = str(self.dirpath / str(step))
        # The attributes first: they are part of this callback's state in the checkpoint.
        self.last_model_path = path
        if self.monitor is None:
            self.best_model_path = path
        elif scores is None:  # unranked: kept until it is superseded
            self.last_model_score = None
            self._scores.pop(step, None)
        else:
            self.last_model_score = self._scores[step] = scores[self.monitor]
            if self._improves(self.last_model_score):
                self.best_model_path, self.best_model_score = path, self.last_model_score
        checkpoint = take_snapshot()
        # Its own state as this save left it (a snapshot of an earlier boundary holds the one before).
        checkpoint["meta"]["callbacks"][self.state_key] = self.state_dict()
        args = save_args(checkpoint["state"], checkpoint["meta"])
        if self._writer is None or not in_background:
            self._write(self._manager, step, args, scores)
        else:
            self._pending = self._writer.submit(self._write, self._manager, step, args, scores)
        self._last_saved_step = step

    def on_exception(self, fit: FitContext, progress: FitProgress, exception: BaseException) -> None:
        boundary = fit.last_boundary
        if not self.save_on_exception or self._manager is None or boundary is None:
            return
        if boundary.state.step == self._last_saved_step:
            return
        if jax.process_count() > 1 and not isinstance(exception, NonFiniteLossError | FitPreempted):
            warn_checkpoint(
                f"ModelCheckpoint(save_on_exception=True) did not save step {boundary.state.step}: the "
                f"{type(exception).__name__} may have been raised in this process alone, and one process cannot "
                "write a checkpoint of a multi-process fit without the others."
            )
            return
        # This callback's state as it was at the boundary (a save cut short since may have changed
        # it); the save below then updates it as any save does.
        if self.state_key in boundary.callback_states:
            self.load_state_dict(boundary.callback_states[self.state_key])
        # Written here, not in the background: a failed save is reported (as a warning) before
        # the exception propagates.
        self._save(
            boundary.state.step,
            boundary.metrics,
            lambda: fit.snapshot(boundary),
            unranked_without_monitor=True,
            in_background=False,
        )

    def _write(self, manager: ocp.CheckpointManager, step: int, args: Any, metrics: dict[str, float] | None) -> None:
        try:
            self._replace_and_save(manager, step, args, metrics)
        except OSError as error:  # the OS's message (ENOSPC) does not say which save failed
            raise type(error)(
                error.errno, f"saving the checkpoint of step {step} into {str(self.dirpath)!r} failed: {error.strerror}"
            ) from error

    def _replace_and_save(
        self, manager: ocp.CheckpointManager, step: int, args: Any, metrics: dict[str, float] | None
    ) -> None:
        if (self.dirpath / str(step)).exists():
            # A fit resumed from an older checkpoint writes its later steps again, and a damaged
            # step directory that was skipped may be in the way (orbax need not list it): replace
            # it (before the save: orbax's background delete would race the new save of that step).
            shutil.rmtree(self.dirpath / str(step))
            manager.reload()
        manager.save(step, args=args, metrics=metrics, force=True)

    def _wait_for_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _improves(self, value: float) -> bool:
        if self.best_model_score is None or math.isnan(self.best_model_score):
            return not math.isnan(value)
        return value < self.best_model_score if self.mode == "min" else value > self.best_model_score

    def on_fit_end(self, fit: FitContext, progress: FitProgress) -> None:
        self._wait_for_pending()  # a failed background save raises here
        if self._manager is not None:
            self._manager.wait_until_finished()

    def teardown(self, fit: FitContext) -> None:
        # After an exception too: the save in flight finishes (complete, or not a checkpoint).
        writer, self._writer, self._pending = self._writer, None, None
        if writer is not None:
            writer.shutdown(wait=True)
        if self._manager is not None:
            manager, self._manager = self._manager, None
            manager.close()
        logging.getLogger("absl").removeFilter(_FAILED_SAVE_LOGS)

    def latest(self) -> Path | None:
        """The newest usable checkpoint in ``dirpath`` (what ``ckpt_path="last"`` resumes; see
        :func:`~aimz_trainer.checkpoint.newest_checkpoint`)."""
        return newest_checkpoint(self.dirpath)


@dataclass(frozen=True)
class _Scored:
    """A checkpoint as orbax's preservation policies see it (its ``PolicyCheckpointInfo``)."""

    step: int
    time: datetime.datetime
    metrics: dict[str, float] | None


@dataclass(frozen=True)
class _RankedByScores:
    """orbax's ``BestN``, ranking by the scores the callback knows, those of the checkpoints in
    ``dirpath`` when a resumed fit started included. orbax itself knows only the metrics given to
    ``save`` since it was created (with a preservation policy it does not write them), and
    ``BestN`` keeps every checkpoint without metrics: after a resume, all the older ones."""

    best: BestN
    monitor: str
    scores: dict[int, float]

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
        scored = [
            _Scored(info.step, info.time, {self.monitor: self.scores[info.step]} if info.step in self.scores else None)
            for info in checkpoints
        ]
        return self.best.should_preserve(scored, context=context)


class _FailedSaveLogs(logging.Filter):
    """Drops the tracebacks orbax logs (absl, ERROR, from its own threads) for a failed save:
    the fit raises that same error, and the log would print it a second time above it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.exc_info or record.exc_info[2] is None:
            return True
        # absl names itself as the record's caller: the traceback tells where the error arose.
        frames = traceback.extract_tb(record.exc_info[2])
        return not any(f"{os.sep}orbax{os.sep}" in frame.filename for frame in frames)


_FAILED_SAVE_LOGS = _FailedSaveLogs()
