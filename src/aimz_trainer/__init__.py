"""aimz_trainer: a Lightning-style trainer for NumPyro SVI models in JAX."""

from aimz_trainer.callbacks import Callback, FitProgress, ProgressBar
from aimz_trainer.errors import AimzTrainerError, ConfigurationError, DataError, NonFiniteLossError
from aimz_trainer.sharding import make_mesh
from aimz_trainer.trainer import FitResult, Trainer, TrainerState

__version__ = "0.1.0"

__all__ = [
    "AimzTrainerError",
    "Callback",
    "ConfigurationError",
    "DataError",
    "FitProgress",
    "FitResult",
    "NonFiniteLossError",
    "ProgressBar",
    "Trainer",
    "TrainerState",
    "__version__",
    "make_mesh",
]
