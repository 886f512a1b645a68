"""aimz_trainer: a Lightning-style trainer for NumPyro SVI models in JAX."""

from aimz_trainer.callbacks import (
    Callback,
    CSVLogger,
    EarlyStopping,
    FitProgress,
    PosteriorSampler,
    ProgressBar,
    TensorBoardLogger,
)
from aimz_trainer.errors import (
    AimzTrainerError,
    ConfigurationError,
    DataError,
    MetricNotFoundError,
    NonFiniteLossError,
)
from aimz_trainer.sharding import make_mesh
from aimz_trainer.trainer import FitResult, Trainer, TrainerState

__version__ = "0.1.0"

__all__ = [
    "AimzTrainerError",
    "CSVLogger",
    "Callback",
    "ConfigurationError",
    "DataError",
    "EarlyStopping",
    "FitProgress",
    "FitResult",
    "MetricNotFoundError",
    "NonFiniteLossError",
    "PosteriorSampler",
    "ProgressBar",
    "TensorBoardLogger",
    "Trainer",
    "TrainerState",
    "__version__",
    "make_mesh",
]
