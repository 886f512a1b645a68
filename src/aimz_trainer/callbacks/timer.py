"""A time limit for a fit: the :class:`Timer` callback behind ``Trainer(max_time=...)``."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from aimz_trainer._checks import require_choice
from aimz_trainer.callbacks.base import Callback
from aimz_trainer.errors import ConfigurationError

if TYPE_CHECKING:
    from aimz_trainer.callbacks.context import FitContext, FitProgress

__all__ = ["Duration", "Timer", "as_duration"]

Duration = timedelta | float | int | str | Mapping[str, float]
"""A length of time: a ``timedelta``, seconds, ``"DD:HH:MM:SS"`` or ``timedelta`` keywords
(``{"hours": 2}``)."""

_DAYS_HOURS_MINUTES_SECONDS = re.compile(r"^(\d+):(\d{1,2}):(\d{1,2}):(\d{1,2}(?:\.\d*)?)$")


def as_duration(value: Any, argument: str = "duration") -> timedelta:
    """``value`` as a positive ``timedelta``, or a :class:`ConfigurationError` naming ``argument``.

    Example:
        >>> as_duration("00:01:30:00"), as_duration(90), as_duration({"minutes": 2})
        (datetime.timedelta(seconds=5400), datetime.timedelta(seconds=90), datetime.timedelta(seconds=120))
    """
    duration = None
    if isinstance(value, timedelta):
        duration = value
    elif isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool):
        duration = timedelta(seconds=float(value)) if np.isfinite(value) else None
    elif isinstance(value, str) and (match := _DAYS_HOURS_MINUTES_SECONDS.match(value.strip())):
        days, hours, minutes, seconds = match.groups()
        duration = timedelta(days=int(days), hours=int(hours), minutes=int(minutes), seconds=float(seconds))
    elif isinstance(value, Mapping):
        try:
            duration = timedelta(**value)
        except TypeError:
            duration = None
    if duration is None or duration <= timedelta(0):
        raise ConfigurationError(
            f"{argument} must be a positive length of time: a datetime.timedelta, seconds (a number), "
            f"'DD:HH:MM:SS' or timedelta keywords such as {{'hours': 2}}; got {value!r}."
        )
    return duration


class Timer(Callback):
    """Stops the fit once it has run for ``duration``, at the next chunk boundary (or epoch end).

    The time counts from ``on_fit_start`` (after compilation: the training itself) and, in a
    fit resumed from a checkpoint, adds the time the checkpointed run had used: ``duration``
    bounds the training, however many runs it takes. The stop is forced: ``min_steps`` and
    ``min_epochs`` do not delay it (a job's time limit is a hard one). ``Trainer(max_time=...)``
    adds one.

    Args:
        duration: the time limit (see :data:`Duration`); ``None``: only measure.
        interval: ``"step"`` checks after every compiled chunk (at most ``steps_per_chunk``
            steps late), ``"epoch"`` at epoch ends only.

    Example:
        >>> timer = Timer("00:00:30:00")  # half an hour
        >>> timer.duration
        datetime.timedelta(seconds=1800)
        >>> timer.time_elapsed()  # before any fit
        0.0
    """

    def __init__(self, duration: Duration | None = None, *, interval: Literal["step", "epoch"] = "step") -> None:
        self.duration = None if duration is None else as_duration(duration)
        require_choice("interval", interval, ("step", "epoch"))
        self.interval = interval
        self._before = 0.0  # seconds used by the runs a resumed fit continues
        self._started: float | None = None
        self._ended: float | None = None

    def time_elapsed(self) -> float:
        """Seconds the fit has run, earlier runs of a resumed fit included."""
        if self._started is None:
            return self._before
        end = time.monotonic() if self._ended is None else self._ended
        return self._before + end - self._started

    def time_remaining(self) -> float | None:
        """Seconds left before the limit (``None`` without one)."""
        return None if self.duration is None else self.duration.total_seconds() - self.time_elapsed()

    def state_dict(self) -> dict[str, Any]:
        return {"time_elapsed": self.time_elapsed()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._before = float(state["time_elapsed"])

    def on_fit_start(self, fit: FitContext, progress: FitProgress) -> None:
        self._started, self._ended = time.monotonic(), None

    def on_train_chunk_end(self, fit: FitContext, progress: FitProgress, losses: np.ndarray, steps: range) -> None:
        if self.interval == "step":
            self._check(fit)

    def on_train_epoch_end(self, fit: FitContext, progress: FitProgress) -> None:
        self._check(fit)

    def on_fit_end(self, fit: FitContext, progress: FitProgress) -> None:
        self._ended = time.monotonic()

    def on_exception(self, fit: FitContext, progress: FitProgress, exception: BaseException) -> None:
        self._ended = time.monotonic()

    def _check(self, fit: FitContext) -> None:
        remaining = self.time_remaining()
        if remaining is not None and remaining <= 0 and not fit.stop_forced:
            fit.request_stop(f"max_time: the fit ran {self.time_elapsed():.1f} s of {self.duration}", force=True)
