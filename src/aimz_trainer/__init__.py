"""aimz_trainer: a Lightning-style trainer for NumPyro SVI models in JAX."""

from typing import TYPE_CHECKING

from aimz_trainer.callbacks import (
    Callback,
    CSVLogger,
    DeviceStatsMonitor,
    EarlyStopping,
    FitContext,
    FitProgress,
    FitTiming,
    LambdaCallback,
    MLFlowLogger,
    ModelCheckpoint,
    ModelSummary,
    PosteriorSampler,
    Profiler,
    ProgressBar,
    ThroughputMonitor,
    Timer,
)
from aimz_trainer.checkpoint import LoadedCheckpoint, load_checkpoint
from aimz_trainer.data import BlockShuffle
from aimz_trainer.errors import (
    AimzTrainerError,
    AimzWarning,
    CheckpointError,
    CheckpointWarning,
    CommandLineError,
    ConfigurationError,
    DataError,
    DistributedError,
    FitPreempted,
    FitWarning,
    KernelValidationError,
    MetricNotFoundError,
    NonFiniteLossError,
    NonFinitePredictionError,
    NotFittedError,
    OutputWarning,
    PerformanceWarning,
    SamplingNoiseWarning,
    StoreError,
    StoreWarning,
)
from aimz_trainer.records import record_columns
from aimz_trainer.sharding import make_mesh
from aimz_trainer.trainer import FitResult, Trainer, TrainerState

if TYPE_CHECKING:
    from aimz_trainer.callbacks.tensorboard import TensorBoardLogger
    from aimz_trainer.effects import estimate_effect
    from aimz_trainer.impact_model import ImpactModel
    from aimz_trainer.predictor import Predictor
    from aimz_trainer.store_reading import open_store, verify_store

__version__ = "0.1.0"

# Prediction pulls in xarray and pandas (seconds to import), TensorBoard's writer tensorboardX
# and protobuf: loaded on first use.
_LAZY = {
    "TensorBoardLogger": "aimz_trainer.callbacks.tensorboard",
    "ImpactModel": "aimz_trainer.impact_model",
    "Predictor": "aimz_trainer.predictor",
    "estimate_effect": "aimz_trainer.effects",
    "open_store": "aimz_trainer.store_reading",
    "verify_store": "aimz_trainer.store_reading",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'aimz_trainer' has no attribute {name!r}")


__all__ = [
    "AimzTrainerError",
    "AimzWarning",
    "BlockShuffle",
    "CSVLogger",
    "Callback",
    "CheckpointError",
    "CheckpointWarning",
    "CommandLineError",
    "ConfigurationError",
    "DataError",
    "DeviceStatsMonitor",
    "DistributedError",
    "EarlyStopping",
    "FitContext",
    "FitPreempted",
    "FitProgress",
    "FitResult",
    "FitTiming",
    "FitWarning",
    "ImpactModel",
    "KernelValidationError",
    "LambdaCallback",
    "LoadedCheckpoint",
    "MLFlowLogger",
    "MetricNotFoundError",
    "ModelCheckpoint",
    "ModelSummary",
    "NonFiniteLossError",
    "NonFinitePredictionError",
    "NotFittedError",
    "OutputWarning",
    "PerformanceWarning",
    "PosteriorSampler",
    "Predictor",
    "Profiler",
    "ProgressBar",
    "SamplingNoiseWarning",
    "StoreError",
    "StoreWarning",
    "TensorBoardLogger",
    "ThroughputMonitor",
    "Timer",
    "Trainer",
    "TrainerState",
    "__version__",
    "estimate_effect",
    "load_checkpoint",
    "make_mesh",
    "open_store",
    "record_columns",
    "verify_store",
]
