"""Callbacks: observe and steer a fit through hooks."""

from collections.abc import Sequence
from typing import TYPE_CHECKING

from aimz_trainer.callbacks.base import Callback, state_key_of
from aimz_trainer.callbacks.context import FitContext, FitProgress, FitTiming
from aimz_trainer.callbacks.csv_logger import CSVLogger
from aimz_trainer.callbacks.device_stats import DeviceStatsMonitor
from aimz_trainer.callbacks.early_stopping import EarlyStopping
from aimz_trainer.callbacks.lambda_callback import LambdaCallback
from aimz_trainer.callbacks.logger import MetricLogger
from aimz_trainer.callbacks.mlflow_logger import MLFlowLogger  # imports mlflow only when one is created
from aimz_trainer.callbacks.model_checkpoint import ModelCheckpoint
from aimz_trainer.callbacks.model_summary import ModelSummary
from aimz_trainer.callbacks.posterior import PosteriorSampler
from aimz_trainer.callbacks.profiler import Profiler
from aimz_trainer.callbacks.progress import ProgressBar, progress_bar_wanted
from aimz_trainer.callbacks.throughput import ThroughputMonitor
from aimz_trainer.callbacks.timer import Timer

if TYPE_CHECKING:
    from aimz_trainer.callbacks.tensorboard import TensorBoardLogger

# TensorBoard's event writer (tensorboardX, protobuf) is imported when a run first asks for it.
_LAZY = {"TensorBoardLogger": "aimz_trainer.callbacks.tensorboard"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CSVLogger",
    "Callback",
    "DeviceStatsMonitor",
    "EarlyStopping",
    "FitContext",
    "FitProgress",
    "FitTiming",
    "LambdaCallback",
    "MLFlowLogger",
    "MetricLogger",
    "ModelCheckpoint",
    "ModelSummary",
    "PosteriorSampler",
    "Profiler",
    "ProgressBar",
    "TensorBoardLogger",
    "ThroughputMonitor",
    "Timer",
    "default_callbacks",
    "state_key_of",
]


def default_callbacks(
    callbacks: Sequence[Callback], *, enable_progress_bar: bool, enable_model_summary: bool
) -> list[Callback]:
    """``callbacks`` and the ones a Trainer adds by default, unless one of the kind is given: a
    :class:`ProgressBar` when ``enable_progress_bar`` and a person is watching
    (:func:`progress_bar_wanted`), and a :class:`ModelSummary` when ``enable_model_summary``."""
    callbacks = list(callbacks)
    if enable_model_summary and not any(isinstance(c, ModelSummary) for c in callbacks):
        callbacks.insert(0, ModelSummary())
    if enable_progress_bar and progress_bar_wanted() and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(ProgressBar())
    return callbacks
