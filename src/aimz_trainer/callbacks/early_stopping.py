"""Stop a fit when a monitored metric stops improving (or crosses a threshold)."""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any, Literal

from aimz_trainer.callbacks.base import Callback, state_key_of
from aimz_trainer.errors import ConfigurationError, MetricNotFoundError

if TYPE_CHECKING:
    from aimz_trainer.callbacks.context import FitContext, FitProgress

__all__ = ["EarlyStopping"]


class EarlyStopping(Callback):
    """Requests a stop when ``monitor`` has not improved for ``patience`` checks.

    A *check* happens after every validation when the fit validates, else at every epoch end
    (``check_on_train_epoch_end`` forces either). At each check, in this order:

    1. a non-finite value stops the fit (``check_finite``);
    2. a value better than ``stopping_threshold`` stops it (the goal is reached);
    3. a value worse than ``divergence_threshold`` stops it (the fit diverged);
    4. a value better than the best so far by more than ``min_delta`` resets the count;
       otherwise the count grows, and the fit stops when it reaches ``patience``.

    "Better" is lower with ``mode="min"`` and higher with ``mode="max"``. The stop takes effect
    at the end of the chunk being checked; ``on_fit_end`` still runs. The callback's state
    (best value, count, stopped epoch) goes into checkpoints.

    Args:
        monitor: a metric name, e.g. ``"val_loss"``, ``"train_loss_epoch"``.
        mode: ``"min"`` or ``"max"``.
        patience: checks without improvement before stopping (0: stop at the first one).
        min_delta: the smallest change that counts as an improvement.
        check_finite: stop when the metric becomes NaN or infinite.
        stopping_threshold: stop as soon as the metric is better than this.
        divergence_threshold: stop as soon as the metric is worse than this.
        strict: an unknown ``monitor`` raises (listing the metrics that exist); with
            ``False`` the check is skipped.
        check_on_train_epoch_end: check at epoch ends (``True``) or after validations
            (``False``); ``None`` picks validations when the fit has validation data.

    Example:
        >>> stopper = EarlyStopping("val_loss", patience=3, min_delta=1e-3)
        >>> stopper.state_key
        "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}"
    """

    monitors_metrics = True

    def __init__(
        self,
        monitor: str,
        mode: Literal["min", "max"] = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        *,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        strict: bool = True,
        check_on_train_epoch_end: bool | None = None,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise ConfigurationError(
                f"EarlyStopping monitor must be a metric name such as 'val_loss'; got {monitor!r}."
            )
        if not isinstance(mode, str) or mode not in ("min", "max"):
            raise ConfigurationError(f"EarlyStopping mode must be 'min' or 'max'; got {mode!r}.")
        if isinstance(patience, bool) or not isinstance(patience, numbers.Integral) or patience < 0:
            raise ConfigurationError(f"EarlyStopping patience must be an int >= 0 (checks to wait); got {patience!r}.")
        if (
            isinstance(min_delta, bool)
            or not isinstance(min_delta, numbers.Real)
            or not min_delta >= 0
            or math.isinf(min_delta)
        ):
            raise ConfigurationError(f"EarlyStopping min_delta must be a finite number >= 0; got {min_delta!r}.")
        self.monitor = monitor
        self.mode = mode
        for name, threshold in [
            ("stopping_threshold", stopping_threshold),
            ("divergence_threshold", divergence_threshold),
        ]:
            # No value is better or worse than NaN: such a threshold would never stop the fit.
            is_number = isinstance(threshold, numbers.Real) and not isinstance(threshold, bool)
            if threshold is not None and (not is_number or math.isnan(threshold)):
                raise ConfigurationError(f"EarlyStopping {name} must be a number (not NaN) or None; got {threshold!r}.")
        for name, flag in [("check_finite", check_finite), ("strict", strict)]:
            if not isinstance(flag, bool):
                raise ConfigurationError(f"EarlyStopping {name} must be True or False; got {flag!r}.")
        if check_on_train_epoch_end is not None and not isinstance(check_on_train_epoch_end, bool):
            raise ConfigurationError(
                f"EarlyStopping check_on_train_epoch_end must be True, False or None; got {check_on_train_epoch_end!r}."
            )
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.check_finite = check_finite
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.strict = strict
        self.check_on_train_epoch_end = check_on_train_epoch_end
        self.best_score = math.inf if mode == "min" else -math.inf
        self.wait_count = 0
        self.stopped_epoch: int | None = None
        self.stopping_reason: str | None = None

    @property
    def state_key(self) -> str:
        return state_key_of(self, monitor=self.monitor, mode=self.mode)

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_score": self.best_score,
            "wait_count": self.wait_count,
            "stopped_epoch": self.stopped_epoch,
            "stopping_reason": self.stopping_reason,
            "patience": self.patience,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_score = float(state["best_score"])
        self.wait_count = int(state["wait_count"])
        self.stopped_epoch = state["stopped_epoch"]
        self.stopping_reason = state.get("stopping_reason")

    def on_train_epoch_end(self, fit: FitContext, progress: FitProgress) -> None:
        if self._checks_at_epoch_end(fit):
            self._check(fit, progress)

    def on_validation_end(self, fit: FitContext, progress: FitProgress) -> None:
        if not self._checks_at_epoch_end(fit):
            self._check(fit, progress)

    def _checks_at_epoch_end(self, fit: FitContext) -> bool:
        if self.check_on_train_epoch_end is not None:
            return self.check_on_train_epoch_end
        return not fit.has_validation

    def _check(self, fit: FitContext, progress: FitProgress) -> None:
        if self.monitor not in progress.metrics:
            if self.strict:
                raise MetricNotFoundError(self.monitor, sorted(progress.metrics), "EarlyStopping")
            return
        reason = self.evaluate(float(progress.metrics[self.monitor]))
        if reason is not None:
            self.stopped_epoch = progress.epoch
            self.stopping_reason = reason
            fit.request_stop(reason)

    def evaluate(self, value: float) -> str | None:
        """Update the state with one new ``value``; the reason to stop, or ``None``."""
        if self.check_finite and not math.isfinite(value):
            return f"{self.monitor} = {value} is not finite; previous best {self.best_score:.6g}"
        if self.stopping_threshold is not None and self._better(value, self.stopping_threshold):
            return f"{self.monitor} = {value:.6g} reached the stopping threshold {self.stopping_threshold}"
        if self.divergence_threshold is not None and self._better(self.divergence_threshold, value):
            return f"{self.monitor} = {value:.6g} crossed the divergence threshold {self.divergence_threshold}"
        delta = -self.min_delta if self.mode == "min" else self.min_delta
        if self._better(value, self.best_score + delta):
            self.best_score = value
            self.wait_count = 0
            return None
        self.wait_count += 1
        if self.wait_count >= self.patience:
            return (
                f"{self.monitor} did not improve by more than {self.min_delta} for {self.wait_count} checks; "
                f"best {self.best_score:.6g}"
            )
        return None

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.mode == "min" else a > b
