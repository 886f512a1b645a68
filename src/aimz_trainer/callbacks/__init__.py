"""Callbacks: observe and steer a fit through hooks."""

from aimz_trainer.callbacks.base import Callback, FitProgress
from aimz_trainer.callbacks.progress import ProgressBar

__all__ = ["Callback", "FitProgress", "ProgressBar"]
