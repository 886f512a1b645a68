"""Callbacks: observe and steer a fit through hooks."""

from aimz_trainer.callbacks.base import Callback, FitProgress
from aimz_trainer.callbacks.checkpoint import ModelCheckpoint
from aimz_trainer.callbacks.csv_logger import CSVLogger
from aimz_trainer.callbacks.early_stopping import EarlyStopping
from aimz_trainer.callbacks.logger import MetricLogger
from aimz_trainer.callbacks.posterior import PosteriorSampler
from aimz_trainer.callbacks.progress import ProgressBar
from aimz_trainer.callbacks.tensorboard import TensorBoardLogger

__all__ = [
    "CSVLogger",
    "Callback",
    "EarlyStopping",
    "FitProgress",
    "MetricLogger",
    "ModelCheckpoint",
    "PosteriorSampler",
    "ProgressBar",
    "TensorBoardLogger",
]
