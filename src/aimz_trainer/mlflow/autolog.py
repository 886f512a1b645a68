"""``autolog()``: every :meth:`ImpactModel.fit <aimz_trainer.ImpactModel.fit>` logs its
parameters, its ELBO history, the kernel's source, the training data and the fitted model to
MLflow, with MLflow's autologging machinery (``safe_patch``), as the reference library does."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.numpy_dataset import from_numpy
from mlflow.entities.logged_model_input import LoggedModelInput
from mlflow.models.utils import _Example
from mlflow.tracking.context import registry as context_registry
from mlflow.tracking.fluent import _initialize_logged_model
from mlflow.types import ParamSchema, ParamSpec
from mlflow.utils.autologging_utils import (
    INPUT_EXAMPLE_SAMPLE_ROWS,
    MlflowAutologgingQueueingClient,
    autologging_integration,
    batch_metrics_logger,
    get_autologging_config,
    get_mlflow_run_params_for_fn_args,
    resolve_input_example_and_signature,
    safe_patch,
)

from aimz_trainer._checks import model_parameters
from aimz_trainer.mlflow.flavor import FLAVOR_NAME, _infer_signature, log_model

if TYPE_CHECKING:
    from mlflow.models import ModelSignature

    from aimz_trainer.impact_model import ImpactModel

__all__ = ["autolog"]

# A child of MLflow's logger: shown like the built-in flavors' messages, muted by silent=True.
_logger = logging.getLogger("mlflow.aimz_trainer")

# fit arguments that are not run parameters (the data, the display, the callback objects);
# num_samples is logged once the fit has drawn them, as the reference library does.
_UNLOGGED = ["X", "y", "rng_key", "num_samples", "progress", "callbacks", "kwargs"]
_SCALAR = (bool, int, float, str)


@autologging_integration(FLAVOR_NAME)
def autolog(
    *,
    log_input_examples: bool = False,
    log_model_signatures: bool = True,
    log_models: bool = True,
    log_datasets: bool = True,
    disable: bool = False,
    exclusive: bool = False,
    disable_for_unsupported_versions: bool = False,
    silent: bool = False,
    registered_model_name: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> None:
    """Enable, configure or disable autologging of :meth:`ImpactModel.fit
    <aimz_trainer.ImpactModel.fit>` to MLflow.

    Each fit logs, to the active run (or a run it starts): the parameters ``param_input``,
    ``param_output``, ``inference_method`` and ``optimizer``, the fit's arguments
    (``batch_size``, ``epochs``, ``shuffle``, any scalar Trainer or fit option such as
    ``log_every_n_steps``) and, after the fit, ``num_samples``; the metric ``elbo_loss``, one
    point per SVI step (step s holds ``vi_result.losses[s]``); the kernel's source as the
    artifact ``model.py``; the training data as a run input (context ``train``); and the fitted
    model as the logged model ``model`` (this flavor), with an input example (the first rows)
    when asked and a signature inferred from it.

    Args:
        log_input_examples: log the first rows of ``X`` with the model.
        log_model_signatures: log the model's signature (inputs, and ``predict``'s params).
        log_models: log the fitted model.
        log_datasets: log the training data as a run input.
        disable: turn autologging off.
        exclusive: keep autologged content out of runs the user started.
        disable_for_unsupported_versions: accepted as MLflow's integrations accept it.
        silent: mute MLflow's event logs and warnings during autologging.
        registered_model_name: register every fitted model under this name.
        extra_tags: tags of the runs autologging starts.
    """
    from aimz_trainer.impact_model import ImpactModel

    def patch_fit(original: Callable[..., Any], self: ImpactModel, *args: Any, **kwargs: Any) -> ImpactModel:
        client = MlflowAutologgingQueueingClient()
        run_id = mlflow.active_run().info.run_id
        _log_kernel_source(self)
        params = _run_params(self, original, args, kwargs)
        client.log_params(run_id=run_id, params=params)
        params_logged = client.flush(synchronous=False)

        # Copied before training, so the example sees the data as given.
        input_example, input_example_error = None, None
        if log_models and (log_input_examples or log_model_signatures):
            try:
                input_example = _input_example(self, args, kwargs)
            except Exception as error:
                input_example_error = error
        model_id = None
        if log_models:
            model_id = _initialize_logged_model(
                "model", params={name: str(value) for name, value in params.items()}, flavor=FLAVOR_NAME
            ).model_id
        if log_datasets:
            try:
                source = CodeDatasetSource(tags=context_registry.resolve_tags())
                _log_dataset(self, args, kwargs, source, "train", model_id)
            except Exception as error:
                _logger.warning("Failed to log dataset information to MLflow. Reason: %s", error)

        # The losses of a fit that raises after its optimization are logged too.
        vi_result = self.vi_result
        try:
            model = original(self, *args, **kwargs)
        finally:
            if self.vi_result is not vi_result:
                _log_elbo_losses(self, run_id, model_id)

        num_samples = self._num_samples  # known once the fit has drawn them
        client.log_params(run_id=run_id, params={"num_samples": num_samples})
        after_fit_logged = client.flush(synchronous=False)
        if model_id is not None:
            mlflow.MlflowClient().log_model_params(model_id, {"num_samples": str(num_samples)})
        if log_models:
            # Scalar kernel arguments of the fit are predict's defaults in the signature.
            kernel_parameters = set(model_parameters(self.kernel).names)
            predict_params = {
                "progress": False,
                "return_datatree": True,
                **{k: v for k, v in kwargs.items() if k in kernel_parameters and isinstance(v, _SCALAR)},
            }
            _log_fitted_model(
                model,
                model_id,
                input_example,
                input_example_error,
                predict_params,
                log_input_examples=log_input_examples,
                log_model_signatures=log_model_signatures,
            )
        params_logged.await_completion()
        after_fit_logged.await_completion()
        return model

    for method in ("fit_on_batch", "fit"):
        safe_patch(FLAVOR_NAME, ImpactModel, method, patch_fit, manage_run=True, extra_tags=extra_tags)


def _log_kernel_source(model: ImpactModel) -> None:
    try:
        mlflow.log_text(inspect.getsource(model.kernel), artifact_file="model.py")
    except Exception:
        _logger.exception("Failed to log the kernel's source code; aimz_trainer autologging continues.")


def _log_elbo_losses(model: ImpactModel, run_id: str, model_id: str | None) -> None:
    """``elbo_loss`` at every step of the fit, in batches (MLflow's ``batch_metrics_logger``)."""
    try:
        with batch_metrics_logger(run_id, model_id=model_id) as metrics_logger:
            for step, loss in enumerate(np.asarray(model.vi_result.losses)):
                metrics_logger.record_metrics({"elbo_loss": float(loss)}, step)
    except Exception:
        _logger.exception("Failed to log the ELBO losses; aimz_trainer autologging continues.")


def _run_params(model: ImpactModel, original: Callable[..., Any], args: tuple, kwargs: dict) -> dict[str, Any]:
    from numpyro.infer import MCMC, SVI

    from aimz_trainer.array_data import ArrayLoader

    params: dict[str, Any] = {
        "param_input": model.param_input,
        "param_output": model.param_output,
        "inference_method": type(model.inference).__name__,
    }
    unlogged = list(_UNLOGGED)
    if isinstance(model.inference, SVI):
        params["optimizer"] = type(model.inference.optim).__name__
    elif isinstance(model.inference, MCMC):
        params["num_chains"] = model.inference.num_chains
        params["num_warmup"] = model.inference.num_warmup
        unlogged.append("num_steps")  # the sampler's own settings count under MCMC
    # Scalar options only: the kernel's array inputs, val_data and callbacks are no parameters.
    scalars = {k: v for k, v in kwargs.items() if v is None or isinstance(v, _SCALAR)}
    fn_params = get_mlflow_run_params_for_fn_args(original, args, scalars, unlogged)
    X = kwargs["X"] if "X" in kwargs else args[0]
    if isinstance(X, ArrayLoader):
        fn_params |= {"batch_size": X.batch_size, "shuffle": X.shuffle}
    elif not _is_array(X):  # another data loader batches and orders the rows itself
        fn_params.pop("batch_size", None)
        fn_params.pop("shuffle", None)
    return params | fn_params


def _training_inputs(model: ImpactModel, args: tuple, kwargs: dict) -> tuple[dict[str, np.ndarray], Any] | None:
    """The kernel's inputs given to the fit (``X`` first, whole) and ``y``; ``None`` for a data
    loader other than an :class:`~aimz_trainer.array_data.ArrayLoader` (it holds no arrays to
    read without consuming it)."""
    from aimz_trainer.array_data import ArrayLoader

    X = kwargs["X"] if "X" in kwargs else args[0]
    if isinstance(X, ArrayLoader):
        arrays = {name: np.asarray(value) for name, value in X.dataset.arrays.items()}
        y = arrays.pop(model.param_output, None)
        return {"X": arrays.pop(model.param_input), **arrays}, y
    if not _is_array(X):
        return None
    y = kwargs["y"] if "y" in kwargs else (args[1] if len(args) > 1 else None)
    kernel_parameters = set(model_parameters(model.kernel).names)
    others = {k: np.asarray(v) for k, v in kwargs.items() if k in kernel_parameters and _is_array(v)}
    return {"X": np.asarray(X), **others}, y


def _input_example(model: ImpactModel, args: tuple, kwargs: dict) -> np.ndarray | dict[str, np.ndarray]:
    """The first rows of the training inputs: ``X`` alone, or a dict with the kernel's other
    inputs (those of one value per row sliced with it, the others whole)."""
    inputs = _training_inputs(model, args, kwargs)
    if inputs is None:
        raise TypeError("A data loader other than an ArrayLoader has no arrays to copy an input example from.")
    arrays, _ = inputs
    rows = len(arrays["X"])
    example = {
        name: np.array(value[:INPUT_EXAMPLE_SAMPLE_ROWS] if _per_row(value, rows) else value)
        for name, value in arrays.items()
    }
    return example["X"] if len(example) == 1 else example


def _log_dataset(
    model: ImpactModel, args: tuple, kwargs: dict, source: CodeDatasetSource, context: str, model_id: str | None
) -> None:
    inputs = _training_inputs(model, args, kwargs)
    if inputs is None:
        return
    arrays, y = inputs
    rows = len(arrays["X"])
    features = {name: value for name, value in arrays.items() if _per_row(value, rows)}
    dataset = from_numpy(
        features=features["X"] if len(features) == 1 else features,
        targets=None if y is None else np.asarray(y),
        source=source,
    )
    mlflow.log_input(dataset, context, model=LoggedModelInput(model_id=model_id) if model_id else None)


def _is_array(value: Any) -> bool:
    """Array-like: has a length, a shape or an array interface (not a str or a mapping)."""
    if isinstance(value, str | bytes | bytearray | Mapping):
        return False
    return hasattr(value, "__len__") or hasattr(value, "shape") or hasattr(value, "__array__")


def _per_row(value: np.ndarray, rows: int) -> bool:
    return np.ndim(value) > 0 and np.shape(value)[0] == rows


def _log_fitted_model(
    model: ImpactModel,
    model_id: str | None,
    input_example: Any,
    input_example_error: Exception | None,
    predict_params: dict[str, Any],
    *,
    log_input_examples: bool,
    log_model_signatures: bool,
) -> None:
    """Log the fitted model, with its example and a signature inferred by predicting it
    (``predict_params`` become the signature's params, with their values as defaults)."""

    def get_input_example() -> Any:
        if input_example_error is not None:
            raise input_example_error
        return input_example

    def infer_signature(example: Any) -> ModelSignature | None:
        signature = _infer_signature(_Example((example, predict_params)), model)
        if signature is not None and signature.params is not None:
            # No default seed: a call gives one, or draws with the model's key.
            signature.params = ParamSchema([*signature.params.params, ParamSpec("seed", "long", default=None)])
        return signature

    example, signature = resolve_input_example_and_signature(
        get_input_example, infer_signature, log_input_examples, log_model_signatures, _logger
    )
    log_model(
        model,
        name="model",
        signature=signature,
        input_example=example,
        registered_model_name=get_autologging_config(FLAVOR_NAME, "registered_model_name", None),
        model_id=model_id,
    )
