"""When things happen in a fit: epochs, chunks of K SVI steps, and periodic work.

A *chunk* is a run of consecutive SVI steps inside one epoch that one compiled call executes.
:class:`FitPlan` cuts a fit into chunks; :class:`Every` is the one rule for periodic work
("every N steps", "every N epochs") that chunk planning, validation, logging and callbacks
share: a chunk ends wherever something is due, so whatever is due sees the fit exactly there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from aimz_trainer.sharding import padded_batch_size

__all__ = ["BatchLimit", "Chunk", "Every", "FitPlan", "default_steps_per_chunk", "epoch_length", "limited"]

BatchLimit = int | float
"""How many batches of an epoch (or of a validation pass) to run: an int is a count, a float
in (0, 1] a fraction (``1.0``: all of them)."""


class Every(NamedTuple):
    """Periodic work: due after every ``steps``-th SVI step and/or at the end of every
    ``epochs``-th epoch (``None``: never on that count).

    Counts are of work *finished*: ``Every(steps=50)`` is due when 50, 100, ... steps are done,
    which is after the steps of 0-based index 49, 99, ...

    Example:
        >>> every = Every(steps=50, epochs=2)
        >>> every.at_step(100), every.at_step(120), every.at_epoch_end(3), every.at_epoch_end(4)
        (True, False, False, True)
        >>> list(Every(steps=3).step_indices(range(0, 10)))
        [2, 5, 8]
    """

    steps: int | None = None
    epochs: int | None = None

    def at_step(self, steps_done: int) -> bool:
        """Due once ``steps_done`` steps are finished."""
        return bool(self.steps) and steps_done % self.steps == 0  # type: ignore[operator]

    def at_epoch_end(self, epochs_done: int) -> bool:
        """Due at the end of an epoch, once ``epochs_done`` epochs are finished."""
        return bool(self.epochs) and epochs_done % self.epochs == 0  # type: ignore[operator]

    def due(self, steps_done: int, epochs_done: int | None = None) -> bool:
        """Due after ``steps_done`` steps, or at an epoch end (``epochs_done`` given)."""
        return self.at_step(steps_done) or (epochs_done is not None and self.at_epoch_end(epochs_done))

    def step_indices(self, steps: range) -> range:
        """The 0-based indices in ``steps`` after which the step count is due."""
        if not self.steps:
            return range(0)
        return range(steps.start + (-(steps.start + 1)) % self.steps, steps.stop, self.steps)


class Chunk(NamedTuple):
    """A run of consecutive steps inside one epoch, executed by one compiled call."""

    epoch: int
    first_step: int
    num_steps: int

    @property
    def steps(self) -> range:
        return range(self.first_step, self.first_step + self.num_steps)


@dataclass(frozen=True)
class FitPlan:
    """How a fit walks through the data: batches per epoch, chunks of steps, when to stop.

    A chunk ends at every epoch end and wherever one of ``boundaries`` is due at a step
    (logging, validation, checkpoints: the hooks see the fit exactly there), and otherwise
    after ``steps_per_chunk`` steps. Every chunk is run by the same compiled function, padded
    to ``steps_per_chunk`` steps with inactive ones, so chunk lengths never cause a compile.

    ``padded_batch_size`` is ``batch_size`` rounded up to a multiple of the device count: the
    columns of each step's batch on the mesh, of which the first ``batch_size`` are the batch's
    rows and the others padding that the compiled step masks out
    (:func:`~aimz_trainer.plates.padding_masked`).
    """

    num_rows: int
    batch_size: int
    padded_batch_size: int
    steps_per_epoch: int
    steps_per_chunk: int
    total_steps: int
    chunks: tuple[Chunk, ...]

    @classmethod
    def create(
        cls,
        num_rows: int,
        batch_size: int,
        *,
        drop_last: bool,
        max_epochs: int | None,
        max_steps: int | None,
        steps_per_chunk: int | None,
        boundaries: Sequence[Every] = (),
        devices: int = 1,
        limit_batches: BatchLimit = 1.0,
    ) -> FitPlan:
        """The plan of a fit on ``devices`` devices; chunks end wherever one of ``boundaries`` is
        due at a step; each epoch runs the first ``limit_batches`` batches of its order
        (:func:`limited`)."""
        intervals = [every.steps for every in boundaries if every.steps]
        steps_per_epoch = limited(epoch_length(num_rows, batch_size, drop_last=drop_last), limit_batches)
        limits = []
        if max_epochs is not None:
            limits.append(max_epochs * steps_per_epoch)
        if max_steps is not None:
            limits.append(max_steps)
        total_steps = min(limits)
        steps_per_chunk = steps_per_chunk or default_steps_per_chunk(steps_per_epoch, intervals)
        return cls(
            num_rows=num_rows,
            batch_size=batch_size,
            padded_batch_size=padded_batch_size(batch_size, devices),
            steps_per_epoch=steps_per_epoch,
            steps_per_chunk=steps_per_chunk,
            total_steps=total_steps,
            chunks=tuple(_cut_chunks(steps_per_epoch, total_steps, steps_per_chunk, intervals)),
        )

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)

    def is_epoch_end(self, chunk: Chunk) -> bool:
        """Whether ``chunk`` ends its epoch (the fit's last chunk ends its epoch too)."""
        end = chunk.first_step + chunk.num_steps
        return end % self.steps_per_epoch == 0 or end == self.total_steps


def epoch_length(num_rows: int, batch_size: int, *, drop_last: bool) -> int:
    """Steps per epoch: a last partial batch is completed, or dropped with ``drop_last``."""
    return num_rows // batch_size if drop_last else math.ceil(num_rows / batch_size)


def limited(num_batches: int, limit: BatchLimit) -> int:
    """The batches a limit leaves of ``num_batches``: an int caps the count, a float keeps that
    fraction (rounded down, at least one batch).

    Example:
        >>> limited(10, 3), limited(10, 0.25), limited(10, 1.0), limited(2, 5)
        (3, 2, 10, 2)
    """
    if isinstance(limit, float):
        return max(1, int(limit * num_batches))
    return min(num_batches, limit)


def _cut_chunks(steps_per_epoch: int, total_steps: int, steps_per_chunk: int, boundaries: Sequence[int]) -> list[Chunk]:
    chunks = []
    for epoch in range(math.ceil(total_steps / steps_per_epoch)):
        start = epoch * steps_per_epoch
        end = min(start + steps_per_epoch, total_steps)
        cuts = {end}
        for interval in boundaries:
            cuts.update(range((start // interval + 1) * interval, end, interval))
        for cut in sorted(cuts):
            while start < cut:
                length = min(steps_per_chunk, cut - start)
                chunks.append(Chunk(epoch, start, length))
                start += length
    return chunks


def default_steps_per_chunk(steps_per_epoch: int, boundaries: Sequence[int] = (), target: int = 50) -> int:
    """Steps per compiled call: about ``target``, preferably a divisor of the epoch length and of
    every boundary interval so that chunks need no padding steps. Padding is cheap (inactive
    steps skip the update) but not free, and too short a chunk syncs with the host too often."""
    span = math.gcd(steps_per_epoch, *boundaries)
    if span <= target:
        return span if span >= target // 5 else min(target, steps_per_epoch)
    for size in range(target, target // 2 - 1, -1):
        if span % size == 0:
            return size
    return target
