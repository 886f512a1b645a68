"""aimz_trainer: a Lightning-style trainer for NumPyro SVI models in JAX.

Every public name is imported from its module when it is first used (``from aimz_trainer import
Trainer`` loads the trainer, hence JAX and NumPyro), so a process that only needs a light part
(the ``aimz-trainer`` command fixing its hash seed before it starts over, a test reading the
errors) pays for nothing else.
"""

from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
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
        TensorBoardLogger,
        ThroughputMonitor,
        Timer,
    )
    from aimz_trainer.checkpoint import LoadedCheckpoint, load_checkpoint
    from aimz_trainer.data import BlockShuffle
    from aimz_trainer.effects import estimate_effect
    from aimz_trainer.impact_model import ImpactModel
    from aimz_trainer.predictor import Predictor
    from aimz_trainer.records import record_columns
    from aimz_trainer.sharding import make_mesh
    from aimz_trainer.store_reading import open_store, verify_store
    from aimz_trainer.trainer import FitResult, Trainer, TrainerState

__version__ = "0.1.0"

_CALLBACKS = (
    "CSVLogger", "Callback", "DeviceStatsMonitor", "EarlyStopping", "FitContext", "FitProgress", "FitTiming",
    "LambdaCallback", "MLFlowLogger", "ModelCheckpoint", "ModelSummary", "PosteriorSampler", "Profiler", "ProgressBar",
    "TensorBoardLogger", "ThroughputMonitor", "Timer",
)  # fmt: skip
# Where each lazily imported public name lives.
_LAZY = {
    **dict.fromkeys(_CALLBACKS, "aimz_trainer.callbacks"),
    "BlockShuffle": "aimz_trainer.data",
    "FitResult": "aimz_trainer.trainer",
    "ImpactModel": "aimz_trainer.impact_model",
    "LoadedCheckpoint": "aimz_trainer.checkpoint",
    "Predictor": "aimz_trainer.predictor",
    "Trainer": "aimz_trainer.trainer",
    "TrainerState": "aimz_trainer.trainer",
    "estimate_effect": "aimz_trainer.effects",
    "load_checkpoint": "aimz_trainer.checkpoint",
    "make_mesh": "aimz_trainer.sharding",
    "open_store": "aimz_trainer.store_reading",
    "record_columns": "aimz_trainer.records",
    "verify_store": "aimz_trainer.store_reading",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # found directly from now on
        return value
    raise AttributeError(f"module 'aimz_trainer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
