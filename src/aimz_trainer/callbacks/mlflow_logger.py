"""The fit's scalars and hyperparameters in an MLflow run, through MLflow's tracking API.

MLflow is imported when a logger is created, not with :mod:`aimz_trainer.callbacks`: it is an
optional dependency (``pip install 'aimz-trainer[mlflow]'``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from aimz_trainer.callbacks.logger import MetricLogger, run_hparams
from aimz_trainer.errors import ConfigurationError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from aimz_trainer.callbacks.context import FitContext, FitProgress

__all__ = ["MLFlowLogger"]

# MLflow takes at most 1,000 metrics per log_batch call.
MAX_METRICS_PER_BATCH = 1000
RESUMED_FROM_TAG = "aimz_trainer.resumed_from"


class MLFlowLogger(MetricLogger):
    """Writes the scalars of :mod:`aimz_trainer.callbacks.logger` to an MLflow run: each metric
    at its ``step``, the run's hyperparameters (the trainer's settings, the batch size, the
    device count and ``hparams``) as params when the fit starts.

    Writes are batched: the rows of a chunk go in one ``MlflowClient.log_batch`` call, sent at
    the next hook (once per chunk) and when the fit ends, whatever ended it; the run is then
    marked ``FINISHED``, ``FAILED`` or ``KILLED`` (an interrupt). Only process 0 writes.

    A fit continues the logger's run: the one given as ``run_id``, or the one this logger
    created in an earlier fit. A resumed fit (``ckpt_path``) drops what the run holds from the
    resume step on, as the other loggers do; MLflow cannot delete logged points, so when the run
    holds points at or after the resume step, the fit continues in a new run of the experiment
    that holds the earlier run's params, tags and points before the resume step, tagged
    ``aimz_trainer.resumed_from`` with the earlier run's id (:attr:`run_id` is the new one).

    Args:
        experiment_name: the experiment of a new run (created if needed).
        run_name: the name of a new run (default: MLflow's generated name).
        tracking_uri: where runs are tracked (``sqlite:///mlflow.db``, ``http://host:5000``,
            ...); default: MLflow's (``MLFLOW_TRACKING_URI``).
        tags: tags of a new run (with MLflow's context tags: user, source).
        run_id: continue this run (e.g. to resume a fit in another process).
        log_model: upload the checkpoints of the fit's checkpointing callbacks
            (:class:`~aimz_trainer.ModelCheckpoint`) as the run's artifacts ``checkpoints/<dir>``
            when the fit has ended without error.
        prefix: prepended to every metric name (``"train/"``: ``train/train_loss``).
        artifact_location: the artifact location of a new experiment.
        hparams: extra hyperparameters to log (e.g. the learning rate, the model's width).

    Example:
        >>> logger = MLFlowLogger(experiment_name="bnn", tracking_uri="sqlite:///mlflow.db")  # doctest: +SKIP
        >>> trainer = Trainer(max_epochs=10, callbacks=[logger])  # doctest: +SKIP
    """

    def __init__(
        self,
        experiment_name: str = "aimz_trainer_logs",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
        log_model: bool = False,
        prefix: str = "",
        artifact_location: str | None = None,
        hparams: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        _import_mlflow()
        if not isinstance(experiment_name, str) or not experiment_name:
            raise ConfigurationError(f"experiment_name must be a non-empty str; got {experiment_name!r}.")
        if not isinstance(prefix, str):
            raise ConfigurationError(f"prefix must be a str; got {prefix!r}.")
        for name, value in [
            ("run_name", run_name),
            ("tracking_uri", tracking_uri),
            ("run_id", run_id),
            ("artifact_location", artifact_location),
        ]:
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigurationError(f"{name} must be a non-empty str or None; got {value!r}.")
        for name, value in [("tags", tags), ("hparams", hparams)]:
            if value is not None and not isinstance(value, Mapping):
                raise ConfigurationError(f"{name} must map names to values or be None; got {type(value).__name__}.")
        if not isinstance(log_model, bool):
            raise ConfigurationError(f"log_model must be True or False; got {log_model!r}.")
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.tracking_uri = tracking_uri
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.run_id = run_id
        self.log_model = log_model
        self.prefix = prefix
        self.artifact_location = artifact_location
        self.hparams = dict(hparams or {})
        self._client: MlflowClient | None = None
        self._pending: list[Metric] = []
        self._status = "FINISHED"
        self._checkpoint_directories: tuple[os.PathLike[str], ...] = ()

    # -- the logger interface ------------------------------------------------------------------

    def open(self, fit: FitContext, resume_step: int | None) -> None:
        from mlflow import MlflowClient

        self._client = client = MlflowClient(self.tracking_uri)
        self._pending, self._status = [], "FINISHED"
        self._checkpoint_directories = fit.checkpoint_directories
        if self.run_id is None:
            self.run_id = self._create_run()
        elif resume_step and _steps_from(client, self.run_id, resume_step):
            self.run_id = self._continue_in_new_run(self.run_id, resume_step)
        elif client.get_run(self.run_id).info.status != "RUNNING":
            client.update_run(self.run_id, status="RUNNING")
        self._log_params(run_hparams(fit) | self.hparams)

    def write(self, step: int, epoch: int, scalars: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        self._pending += [Metric(self.prefix + k, float(v), timestamp, step) for k, v in scalars.items()]
        if len(self._pending) >= MAX_METRICS_PER_BATCH:
            self._flush()

    def close(self) -> None:
        assert self._client is not None and self.run_id is not None
        try:
            self._flush()
            if self.log_model and self._status == "FINISHED":
                for directory in self._checkpoint_directories:
                    if os.path.isdir(directory):
                        name = os.path.basename(os.path.normpath(directory))
                        self._client.log_artifacts(self.run_id, os.fspath(directory), f"checkpoints/{name}")
        finally:
            self._client.set_terminated(self.run_id, self._status)
            self._client = None

    # -- hooks: the rows written after the previous hook go out in one call --------------------

    def on_train_epoch_start(self, fit: FitContext, progress: FitProgress) -> None:
        self._flush()

    def on_train_chunk_end(self, fit: FitContext, progress: FitProgress, losses: Any, steps: range) -> None:
        self._flush()

    def on_validation_end(self, fit: FitContext, progress: FitProgress) -> None:
        self._flush()

    def on_train_epoch_end(self, fit: FitContext, progress: FitProgress) -> None:
        self._flush()

    def on_exception(self, fit: FitContext, progress: FitProgress, exception: BaseException) -> None:
        # Interrupted or preempted (FitPreempted is a SystemExit), not failed.
        self._status = "KILLED" if isinstance(exception, KeyboardInterrupt | SystemExit) else "FAILED"

    # -- helpers -------------------------------------------------------------------------------

    def _flush(self) -> None:
        if self._client is None or not self._pending:
            return
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=pending[start : start + MAX_METRICS_PER_BATCH])

    def _experiment_id(self) -> str:
        assert self._client is not None
        experiment = self._client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        return self._client.create_experiment(self.experiment_name, artifact_location=self.artifact_location)

    def _create_run(self, experiment_id: str | None = None, tags: Mapping[str, str] | None = None) -> str:
        from mlflow.tracking.context.registry import resolve_tags

        assert self._client is not None
        run = self._client.create_run(
            experiment_id or self._experiment_id(),
            run_name=self.run_name,
            tags=resolve_tags({**self.tags, **(tags or {})}),
        )
        return run.info.run_id

    def _continue_in_new_run(self, run_id: str, resume_step: int) -> str:
        """A new run of ``run_id``'s experiment holding its params, tags and the points before
        ``resume_step``; ``run_id`` is marked ``KILLED`` if it was still running."""
        from mlflow.entities import Param

        assert self._client is not None
        client, earlier = self._client, self._client.get_run(run_id)
        tags = {k: v for k, v in earlier.data.tags.items() if not k.startswith("mlflow.")}
        if self.run_name is None:
            tags["mlflow.runName"] = earlier.info.run_name
        new_run_id = self._create_run(earlier.info.experiment_id, {**tags, RESUMED_FROM_TAG: run_id})
        kept = [
            point
            for name in earlier.data.metrics
            for point in client.get_metric_history(run_id, name)
            if point.step < resume_step
        ]
        for start in range(0, len(kept), MAX_METRICS_PER_BATCH):
            client.log_batch(new_run_id, metrics=kept[start : start + MAX_METRICS_PER_BATCH])
        params = [Param(k, v) for k, v in earlier.data.params.items()]
        for start in range(0, len(params), 100):  # MLflow's limit of params per call
            client.log_batch(new_run_id, params=params[start : start + 100])
        if earlier.info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
        return new_run_id

    def _log_params(self, hparams: Mapping[str, Any]) -> None:
        """Log the params the run does not hold yet (MLflow refuses to change a logged one)."""
        from mlflow.entities import Param

        assert self._client is not None and self.run_id is not None
        logged = self._client.get_run(self.run_id).data.params
        params = [Param(str(k), str(v)) for k, v in hparams.items() if str(k) not in logged]
        for start in range(0, len(params), 100):
            self._client.log_batch(self.run_id, params=params[start : start + 100])


def _steps_from(client: MlflowClient, run_id: str, step: int) -> bool:
    """Whether the run holds a metric point at ``step`` or later."""
    names = client.get_run(run_id).data.metrics
    return any(point.step >= step for name in names for point in client.get_metric_history(run_id, name))


def _import_mlflow() -> None:
    try:
        import mlflow  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "MLFlowLogger needs MLflow, which is not installed: pip install 'aimz-trainer[mlflow]'."
        ) from error
