"""Training curves, validation metrics, parameter histograms and hyperparameters for
TensorBoard, written with tensorboardX."""

from __future__ import annotations

import numbers
import os
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from tensorboardX import SummaryWriter

from aimz_trainer.callbacks.logger import MetricLogger, writable_directory
from aimz_trainer.errors import ConfigurationError

if TYPE_CHECKING:
    from aimz_trainer.callbacks.context import FitContext, FitProgress

__all__ = ["TensorBoardLogger"]

HParam = bool | str | float | int


class TensorBoardLogger(MetricLogger):
    """Writes the fit's scalars (see :mod:`aimz_trainer.callbacks.logger`) as TensorBoard events.

    Besides the scalars: at each epoch end a histogram of every variational parameter
    (``params/<site>_auto_loc``, ``params/<site>_auto_scale`` for an ``AutoNormal`` guide), and
    at fit end the run's hyperparameters (the trainer's settings, the batch size, the device
    count and ``hparams``) with the final metrics, for TensorBoard's HParams tab.

    Args:
        log_dir: the run's directory (created; must be writable). Point TensorBoard at it or
            at its parent: ``tensorboard --logdir runs``.
        hparams: extra hyperparameters to record (e.g. the learning rate, the model's width).
        log_histograms: write the parameter histograms.

    Example:
        >>> import tempfile
        >>> logger = TensorBoardLogger(tempfile.mkdtemp(), hparams={"learning_rate": 1e-3})
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        *,
        hparams: Mapping[str, HParam] | None = None,
        log_histograms: bool = True,
    ) -> None:
        super().__init__()
        if hparams is not None and not isinstance(hparams, Mapping):
            raise ConfigurationError(f"hparams must map names to values or be None; got {type(hparams).__name__}.")
        for name, value in (hparams or {}).items():
            # TensorBoard records str, bool and number values only (others silently as "unset"),
            # under str names.
            if not isinstance(name, str) or not isinstance(value, str | numbers.Real):
                raise ConfigurationError(
                    f"hparams[{name!r}] must be a str, bool or number under a str name; got {value!r}."
                )
        if not isinstance(log_histograms, bool):
            raise ConfigurationError(f"log_histograms must be True or False; got {log_histograms!r}.")
        self.log_dir = writable_directory(log_dir, "log_dir") if self.is_writer else None
        # NumPy scalars as Python ones: tensorboardX records only those.
        self.hparams = {
            name: value.item() if isinstance(value, np.generic) else value for name, value in (hparams or {}).items()
        }
        self.log_histograms = log_histograms
        self._writer: SummaryWriter | None = None

    def open(self, fit: FitContext, resume_step: int | None) -> None:
        # purge_step hides events at steps >= resume_step that a previous run left behind, for
        # readers that load the files in name order. tensorboardX names files by the second and
        # truncates an existing one: the nanosecond suffix keeps a writer opened in the same
        # second off the earlier file and sorts it after it.
        suffix = f".{time.time_ns():020d}.{uuid.uuid4().hex[:6]}"
        self._writer = SummaryWriter(str(self.log_dir), purge_step=resume_step or None, filename_suffix=suffix)

    def write(self, step: int, epoch: int, scalars: Mapping[str, float]) -> None:
        assert self._writer is not None
        for name, value in scalars.items():
            self._writer.add_scalar(name, value, global_step=step)

    def on_train_epoch_end(self, fit: FitContext, progress: FitProgress) -> None:
        if self._writer is not None and self.log_histograms:
            for name, value in _float_leaves(jax.device_get(fit.current_params())):
                _add_histogram(self._writer, f"params/{name}", value, progress.step - 1)

    def on_fit_end(self, fit: FitContext, progress: FitProgress) -> None:
        if self._writer is not None:
            metrics = {f"hparam/{k}": float(v) for k, v in progress.metrics.items() if np.isfinite(v)}
            self._writer.add_hparams(_run_hparams(fit) | self.hparams, metrics, name="hparams")
            self._writer.flush()

    def close(self) -> None:
        assert self._writer is not None
        self._writer.close()
        self._writer = None


def _float_leaves(params: Any) -> list[tuple[str, np.ndarray]]:
    """``(name, array)`` for every floating-point leaf: ``w_auto_loc``, ``a/b`` when nested."""
    leaves = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        value = np.asarray(leaf)
        if np.issubdtype(value.dtype, np.floating):
            leaves.append(("/".join(str(getattr(key, "key", key)) for key in path), value))
    return leaves


def _add_histogram(writer: SummaryWriter, tag: str, values: np.ndarray, step: int, bins: int = 30) -> None:
    """A histogram of ``bins`` equal buckets: tensorboardX's default of ~1,500 exponential
    buckets costs several times more host time, which the devices feel on a small machine."""
    values = values.astype(np.float64, copy=False).ravel()
    counts, edges = np.histogram(values, bins=bins)
    writer.add_histogram_raw(
        tag,
        min=float(values.min()),
        max=float(values.max()),
        num=values.size,
        sum=float(values.sum()),
        sum_squares=float(values @ values),
        bucket_limits=edges[1:].tolist(),
        bucket_counts=counts.tolist(),
        global_step=step,
    )


def _run_hparams(fit: FitContext) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "max_epochs": fit.max_epochs,
        "max_steps": fit.max_steps,
        "batch_size": fit.plan.batch_size,
        "steps_per_epoch": fit.steps_per_epoch,
        "num_devices": fit.mesh.size,
    }
    return {name: value for name, value in settings.items() if value is not None}
