"""Profiler: a ``jax.profiler`` trace of chosen training steps, written where TensorBoard's
profile plugin (XProf) reads it."""

from __future__ import annotations

import bisect
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax import process_count, process_index

from aimz_trainer._checks import is_int_at_least
from aimz_trainer.callbacks.base import Callback
from aimz_trainer.callbacks.logger import writable_directory
from aimz_trainer.errors import ConfigurationError, FitWarning

if TYPE_CHECKING:
    from aimz_trainer.callbacks.context import FitContext, FitProgress

__all__ = ["Profiler"]


class Profiler(Callback):
    """Traces training steps ``[start, stop)`` with ``jax.profiler`` into
    ``<log_dir>/plugins/profile/<run>/<host>.xplane.pb``, the layout TensorBoard's profile
    plugin reads: ``tensorboard --logdir <log_dir>`` (with ``pip install xprof``; give it the
    ``log_dir`` of a :class:`~aimz_trainer.callbacks.TensorBoardLogger` to see both together).

    One compiled chunk runs many steps, so a trace holds whole chunks: it covers every chunk
    that holds one of the steps, and :attr:`traced_steps` tells which steps it holds in full.
    The fit's chunks are not changed for the trace (the trace shows the fit as it runs): to
    trace exactly ``[start, stop)``, choose chunk ends, e.g. multiples of the Trainer's
    ``log_every_n_steps``, where a chunk always ends. The loop keeps one chunk in flight while
    hooks run, so the trace starts one chunk early and stops one chunk late: it also holds part
    of the chunk before the first traced one and of the chunk after the last.

    Each trace is a run of its own, named after the second it ended (JAX's name), with ``_2``,
    ``_3``, ... after it where a run of that name exists: no trace writes over another's.

    Every process of a multi-process fit writes its own trace, under
    ``<log_dir>/process_<index>/plugins/profile/<run>/``: the trace files are named after the
    host, and several processes of one host writing into one run's directory would overwrite
    each other's (TensorBoard shows each process as a run).

    Args:
        log_dir: the directory the trace goes under (created; must be writable).
        steps: ``(start, stop)``, the 0-based steps to trace, ``0 <= start < stop``; default:
            the second chunk the fit runs (the first holds compilation and start-up).

    Attributes:
        traced_steps: after the trace, the steps it holds in full (a ``range``); ``None``
            before, or when the fit ended before ``start``.
        trace_dir: after the trace, the directory of its ``.xplane.pb`` files (this process's).

    Example:
        >>> import tempfile
        >>> profiler = Profiler(tempfile.mkdtemp(), steps=(100, 150))
        >>> profiler.steps
        (100, 150)
    """

    def __init__(self, log_dir: str | os.PathLike[str], *, steps: tuple[int, int] | None = None) -> None:
        if steps is not None:
            valid = (
                isinstance(steps, tuple | list)
                and len(steps) == 2
                and all(is_int_at_least(s, 0) for s in steps)
                and steps[0] < steps[1]
            )
            if not valid:
                raise ConfigurationError(
                    f"steps must be None or (start, stop): two ints with 0 <= start < stop; got {steps!r}."
                )
            steps = (int(steps[0]), int(steps[1]))
        self.steps = steps
        self.log_dir = writable_directory(log_dir, "log_dir")
        self.traced_steps: range | None = None
        self.trace_dir: Path | None = None
        self._chunks: tuple[int, int] | None = None  # indices of the first and last chunk to trace
        self._first_step: int | None = None  # first step traced in full, while tracing
        self._staging: Path | None = None  # the directory a trace in progress writes to
        self._chunk_starts: list[int] = []  # the first step of every chunk of the fit's plan

    def on_fit_start(self, fit: FitContext, progress: FitProgress) -> None:
        self.traced_steps = self.trace_dir = None
        self._chunk_starts = [chunk.first_step for chunk in fit.plan.chunks]
        self._chunks = self._chunks_to_trace(fit, progress.step)
        # The first two chunks are dispatched before any chunk's hooks run.
        first_run = self._index_of(progress.step)
        if self._chunks is not None and self._chunks[0] <= first_run + 1:
            self._start(fit.plan.chunks[first_run].first_step)

    def on_train_chunk_end(self, fit: FitContext, progress: FitProgress, losses: np.ndarray, steps: range) -> None:
        if self._chunks is None:
            return
        first, last = self._chunks
        index = self._index_of(steps.start)
        # The loop dispatches chunk index + 2 after these hooks: start before the first traced.
        if self._first_step is None and index + 2 == first:
            self._start(fit.plan.chunks[first].first_step)
        elif self._first_step is not None and index >= last:
            self._stop(steps.stop)

    def on_fit_end(self, fit: FitContext, progress: FitProgress) -> None:
        if self._first_step is not None:  # the fit ended inside the traced steps
            self._stop(progress.step)

    def on_exception(self, fit: FitContext, progress: FitProgress, exception: BaseException) -> None:
        self.on_fit_end(fit, progress)

    def _chunks_to_trace(self, fit: FitContext, first_step: int) -> tuple[int, int] | None:
        plan = fit.plan
        first_run = self._index_of(first_step)
        if first_run < 0 or first_step >= plan.total_steps:  # nothing left to run
            return None
        if self.steps is None:
            index = min(first_run + 1, plan.num_chunks - 1)
            return index, index
        start, stop = self.steps
        if start >= plan.total_steps or stop <= first_step:
            warnings.warn(
                f"Profiler(steps={self.steps}): this fit runs steps {first_step} to {plan.total_steps - 1}; "
                "nothing is traced.",
                FitWarning,
                stacklevel=2,
            )
            return None
        return self._index_of(max(start, first_step)), self._index_of(min(stop, plan.total_steps) - 1)

    def _index_of(self, step: int) -> int:
        """The index of the chunk that holds ``step``."""
        return bisect.bisect_right(self._chunk_starts, step) - 1

    def _trace_root(self) -> Path:
        """Where this process's trace goes: ``log_dir``, or its ``process_<index>`` directory
        when the fit has several processes."""
        return self.log_dir if process_count() == 1 else self.log_dir / f"process_{process_index()}"

    def _start(self, first_step: int) -> None:
        # JAX names a trace's run directory after the second it ends in: a second trace ending in
        # the same second would write over the first's files. It traces into a directory of its
        # own, moved to a name no run has on stop.
        self._staging = Path(
            tempfile.mkdtemp(prefix=".profiler-", dir=writable_directory(self._trace_root(), "log_dir"))
        )
        try:
            jax.profiler.start_trace(self._staging)
        except RuntimeError as error:  # another trace is running: only one at a time
            shutil.rmtree(self._staging, ignore_errors=True)
            warnings.warn(f"Profiler: no trace ({error})", FitWarning, stacklevel=2)
            self._chunks = None
            return
        self._first_step = first_step

    def _stop(self, end_step: int) -> None:
        assert self._first_step is not None and self._staging is not None
        try:
            jax.profiler.stop_trace()
        finally:
            self.traced_steps = range(self._first_step, end_step)
            self._first_step, self._chunks = None, None
            self.trace_dir = self._keep_run(self._staging)
            self._staging = None

    def _keep_run(self, staging: Path) -> Path | None:
        """Move the run JAX wrote under ``staging`` to ``<trace root>/plugins/profile/``, under its
        own name or, where a run has that name, with ``_2``, ``_3``, ... after it; return where."""
        runs = sorted((staging / "plugins" / "profile").glob("*"))
        profile = self._trace_root() / "plugins" / "profile"
        profile.mkdir(parents=True, exist_ok=True)
        kept = None
        for run in runs:  # one run: a trace exports once
            kept = profile / run.name
            suffix = 1
            while kept.exists():
                suffix += 1
                kept = profile / f"{run.name}_{suffix}"
            run.rename(kept)
        shutil.rmtree(staging, ignore_errors=True)
        return kept

    def teardown(self, fit: FitContext) -> None:
        if self._first_step is not None:  # a hook failed before on_fit_end: do not leave the trace running
            self._stop(fit.step)
