"""Save, log and load an :class:`~aimz_trainer.ImpactModel` as an MLflow Model, and its pyfunc
wrapper. Built on MLflow's own flavor helpers, the way its built-in flavors are."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import jax
import mlflow
import numpy as np
import yaml
from mlflow import pyfunc
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.models.signature import _infer_signature_from_input_example
from mlflow.models.utils import _save_example
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.tracking._model_registry import DEFAULT_AWAIT_MAX_SLEEP_SECONDS
from mlflow.tracking.artifact_utils import _download_artifact_from_uri
from mlflow.utils import _get_fully_qualified_class_name
from mlflow.utils.environment import (
    _CONDA_ENV_FILE_NAME,
    _CONSTRAINTS_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _REQUIREMENTS_FILE_NAME,
    _mlflow_conda_env,
    _process_conda_env,
    _process_pip_requirements,
    _PythonEnv,
    _validate_env_arguments,
)
from mlflow.utils.file_utils import get_total_file_size, write_to
from mlflow.utils.model_utils import (
    _add_code_from_conf_to_system_path,
    _copy_extra_files,
    _get_flavor_configuration,
    _validate_and_copy_code_paths,
    _validate_and_prepare_target_save_path,
)
from mlflow.utils.requirements_utils import _get_pinned_requirement

from aimz_trainer._version import library_version

if TYPE_CHECKING:
    import xarray as xr
    from mlflow.models import ModelInputExample, ModelSignature
    from mlflow.models.model import ModelInfo

    from aimz_trainer.impact_model import ImpactModel

__all__ = [
    "FLAVOR_NAME",
    "get_default_conda_env",
    "get_default_pip_requirements",
    "load_model",
    "log_model",
    "save_model",
]

FLAVOR_NAME = "aimz_trainer"
SERIALIZATION_FORMAT_CLOUDPICKLE = "cloudpickle"
SUPPORTED_SERIALIZATION_FORMATS = [SERIALIZATION_FORMAT_CLOUDPICKLE]
MODEL_DATA = "model.pkl"


def get_default_pip_requirements(*, include_cloudpickle: bool = False) -> list[str]:
    """The pip requirements :func:`save_model` and :func:`log_model` record by default.

    Args:
        include_cloudpickle: add ``cloudpickle`` (what the model is pickled with).

    Returns:
        ``aimz-trainer``, ``jax`` and ``numpyro`` pinned to the installed versions.
    """
    requirements = [
        _get_pinned_requirement("aimz-trainer", module="aimz_trainer"),
        _get_pinned_requirement("jax"),
        _get_pinned_requirement("numpyro"),
    ]
    if include_cloudpickle:
        requirements.append(_get_pinned_requirement("cloudpickle"))
    return requirements


def get_default_conda_env(*, include_cloudpickle: bool = False) -> dict[str, Any]:
    """The Conda environment :func:`save_model` and :func:`log_model` record by default: MLflow's,
    with :func:`get_default_pip_requirements` as pip dependencies."""
    return _mlflow_conda_env(additional_pip_deps=get_default_pip_requirements(include_cloudpickle=include_cloudpickle))


def save_model(
    model: ImpactModel,
    path: str | os.PathLike[str],
    conda_env: dict[str, Any] | str | None = None,
    code_paths: list[str] | None = None,
    mlflow_model: Model | None = None,
    signature: ModelSignature | Literal[False] | None = None,
    input_example: ModelInputExample | None = None,
    pip_requirements: Iterable[str] | str | None = None,
    extra_pip_requirements: Iterable[str] | str | None = None,
    metadata: dict[str, Any] | None = None,
    extra_files: list[str] | None = None,
) -> None:
    """Save ``model`` as an MLflow Model in the local directory ``path`` (which must not exist
    or be empty).

    Args:
        model: an :class:`~aimz_trainer.ImpactModel` (fitted, to predict after loading).
        path: the directory to create.
        conda_env: a Conda environment (a dict or a YAML file); default: one with the
            requirements below.
        code_paths: local code files or directories to store with the model and put on
            ``sys.path`` when it is loaded (e.g. the module defining the kernel).
        mlflow_model: the :class:`mlflow.models.Model` this flavor is added to.
        signature: the model's signature; default: inferred from ``input_example`` by a
            prediction; ``False``: none.
        input_example: one or a few rows of input (an array, or a dict of the kernel's row
            inputs), saved with the model.
        pip_requirements: the requirements, replacing the default ones (which are inferred from
            the modules a loaded model imports, with :func:`get_default_pip_requirements`).
        extra_pip_requirements: requirements added to the default ones.
        metadata: a dict stored in the ``MLmodel`` file.
        extra_files: local files copied with the model (listed in the flavor's configuration).

    Example:
        >>> import aimz_trainer.mlflow  # doctest: +SKIP
        >>> aimz_trainer.mlflow.save_model(im, "model")  # doctest: +SKIP
        >>> aimz_trainer.mlflow.load_model("model").predict(X)  # doctest: +SKIP
    """
    _require_impact_model(model, "save_model")
    _validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)
    path = Path(path).resolve()
    _validate_and_prepare_target_save_path(str(path))
    code_dir = _validate_and_copy_code_paths(code_paths, str(path))

    if mlflow_model is None:
        mlflow_model = Model()
    saved_example = _save_example(mlflow_model, input_example, str(path))
    if signature is None and saved_example is not None:
        signature = _infer_signature(saved_example, model)
    elif signature is False:
        signature = None
    if signature is not None:
        mlflow_model.signature = signature
    if metadata is not None:
        mlflow_model.metadata = metadata

    _save_model(model, path / MODEL_DATA, SERIALIZATION_FORMAT_CLOUDPICKLE)
    extra_files_config = _copy_extra_files(extra_files, str(path))
    pyfunc.add_to_model(
        mlflow_model,
        loader_module="aimz_trainer.mlflow",
        data=MODEL_DATA,
        conda_env=_CONDA_ENV_FILE_NAME,
        python_env=_PYTHON_ENV_FILE_NAME,
        code=code_dir,
    )
    mlflow_model.add_flavor(
        FLAVOR_NAME,
        pickled_model=MODEL_DATA,
        aimz_trainer_version=library_version(),
        model_class=_get_fully_qualified_class_name(model),
        serialization_format=SERIALIZATION_FORMAT_CLOUDPICKLE,
        code=code_dir,
        **extra_files_config,
    )
    if size := get_total_file_size(str(path)):
        mlflow_model.model_size_bytes = size
    mlflow_model.save(str(path / MLMODEL_FILE_NAME))

    if conda_env is None:
        if pip_requirements is None:
            defaults = get_default_pip_requirements(include_cloudpickle=True)
            # Loads the saved model in a subprocess: the MLmodel file must be written first.
            inferred = mlflow.models.infer_pip_requirements(str(path), FLAVOR_NAME, fallback=defaults)
            defaults = sorted(set(inferred) | set(defaults))
        else:
            defaults = None
        conda_env, pip_requirements, pip_constraints = _process_pip_requirements(
            defaults, pip_requirements, extra_pip_requirements
        )
    else:
        conda_env, pip_requirements, pip_constraints = _process_conda_env(conda_env)
    with (path / _CONDA_ENV_FILE_NAME).open("w") as file:
        yaml.safe_dump(conda_env, stream=file, default_flow_style=False)
    if pip_constraints:
        write_to(str(path / _CONSTRAINTS_FILE_NAME), "\n".join(pip_constraints))
    write_to(str(path / _REQUIREMENTS_FILE_NAME), "\n".join(pip_requirements))
    _PythonEnv.current().to_yaml(str(path / _PYTHON_ENV_FILE_NAME))


def log_model(
    model: ImpactModel,
    artifact_path: str | None = None,
    conda_env: dict[str, Any] | str | None = None,
    code_paths: list[str] | None = None,
    registered_model_name: str | None = None,
    signature: ModelSignature | Literal[False] | None = None,
    input_example: ModelInputExample | None = None,
    await_registration_for: int | None = DEFAULT_AWAIT_MAX_SLEEP_SECONDS,
    pip_requirements: Iterable[str] | str | None = None,
    extra_pip_requirements: Iterable[str] | str | None = None,
    metadata: dict[str, Any] | None = None,
    extra_files: list[str] | None = None,
    name: str | None = None,
    params: dict[str, Any] | None = None,
    tags: dict[str, Any] | None = None,
    model_type: str | None = None,
    step: int = 0,
    model_id: str | None = None,
    **kwargs: Any,
) -> ModelInfo:
    """Log ``model`` as an MLflow Model of the active run (one is started if none is), with
    :meth:`mlflow.models.Model.log`.

    Args:
        model: an :class:`~aimz_trainer.ImpactModel`.
        artifact_path: deprecated by MLflow; use ``name``.
        name: the logged model's name.
        registered_model_name: also register it under this name (created if needed).
        await_registration_for: seconds to wait for the registered version to be ready.
        params, tags, model_type, step, model_id: the logged model's (see
            :meth:`mlflow.models.Model.log`).
        conda_env, code_paths, signature, input_example, pip_requirements,
        extra_pip_requirements, metadata, extra_files: as in :func:`save_model`.
        **kwargs: passed to :meth:`mlflow.models.Model.log`.

    Returns:
        The :class:`mlflow.models.model.ModelInfo` of the logged model (``model_uri`` loads it).

    Example:
        >>> with mlflow.start_run():  # doctest: +SKIP
        ...     info = aimz_trainer.mlflow.log_model(im, name="model", input_example=X[:5])
        >>> aimz_trainer.mlflow.load_model(info.model_uri)  # doctest: +SKIP
    """
    _require_impact_model(model, "log_model")
    import aimz_trainer.mlflow

    return Model.log(
        artifact_path=artifact_path,
        name=name,
        flavor=aimz_trainer.mlflow,
        registered_model_name=registered_model_name,
        model=model,
        conda_env=conda_env,
        code_paths=code_paths,
        signature=signature,
        input_example=input_example,
        await_registration_for=await_registration_for,
        pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements,
        metadata=metadata,
        extra_files=extra_files,
        params=params,
        tags=tags,
        model_type=model_type,
        step=step,
        model_id=model_id,
        **kwargs,
    )


def load_model(model_uri: str | os.PathLike[str], dst_path: str | None = None) -> ImpactModel:
    """Load an :class:`~aimz_trainer.ImpactModel` saved or logged by this flavor.

    Args:
        model_uri: a local path, ``runs:/<run_id>/<name>``, ``models:/<model_id>``,
            ``models:/<name>/<version>`` or any artifact URI MLflow resolves.
        dst_path: an existing local directory to download the model to; default: a new
            temporary one.

    Returns:
        The model, fitted as it was saved: it predicts the same draws.
    """
    local_path = _download_artifact_from_uri(artifact_uri=str(model_uri), output_path=dst_path)
    flavor_conf = _get_flavor_configuration(model_path=local_path, flavor_name=FLAVOR_NAME)
    _add_code_from_conf_to_system_path(local_path, flavor_conf)
    return _load_model(local_path)


# -- (de)serialization -------------------------------------------------------------------------


def _save_model(model: ImpactModel, output_path: Path, serialization_format: str) -> None:
    if serialization_format != SERIALIZATION_FORMAT_CLOUDPICKLE:
        raise MlflowException(f"Unrecognized serialization format: {serialization_format}", error_code=INTERNAL_ERROR)
    import cloudpickle

    with output_path.open("wb") as out:
        # The default protocol, readable by every Python the model may be served with.
        cloudpickle.dump(model, out, protocol=pickle.DEFAULT_PROTOCOL)


def _load_model(path: str | os.PathLike[str]) -> ImpactModel:
    """The model of an MLflow Model directory, or of its pickle file."""
    path = Path(path)
    model_dir = path.parent if path.is_file() else path
    flavor_conf = _get_flavor_configuration(model_path=str(model_dir), flavor_name=FLAVOR_NAME)
    serialization_format = flavor_conf.get("serialization_format", SERIALIZATION_FORMAT_CLOUDPICKLE)
    if serialization_format not in SUPPORTED_SERIALIZATION_FORMATS:
        raise MlflowException(
            f"Unrecognized serialization format: {serialization_format}. Supported formats: "
            f"{SUPPORTED_SERIALIZATION_FORMATS}.",
            error_code=INVALID_PARAMETER_VALUE,
        )
    from mlflow.environment_variables import MLFLOW_ALLOW_PICKLE_DESERIALIZATION

    if not MLFLOW_ALLOW_PICKLE_DESERIALIZATION.get():
        raise MlflowException(
            "This model is stored as a pickle and MLFLOW_ALLOW_PICKLE_DESERIALIZATION forbids loading pickles; "
            "set it to 'true' to load a model you trust."
        )
    import cloudpickle

    with (model_dir / flavor_conf["pickled_model"]).open("rb") as file:
        return cloudpickle.load(file)


def _load_pyfunc(path: str) -> _ImpactModelWrapper:
    """The pyfunc wrapper; :func:`mlflow.pyfunc.load_model` calls this (``loader_module``)."""
    return _ImpactModelWrapper(_load_model(path))


def _require_impact_model(model: Any, function: str) -> None:
    from aimz_trainer.impact_model import ImpactModel

    if not isinstance(model, ImpactModel):
        raise TypeError(f"{function} takes an aimz_trainer.ImpactModel; got {type(model).__name__}.")


# -- pyfunc --------------------------------------------------------------------------------------


class _ImpactModelWrapper:
    """What ``mlflow.pyfunc.load_model`` returns the model as: ``predict(data, params)``."""

    def __init__(self, model: ImpactModel) -> None:
        self.impact_model = model

    def get_raw_model(self) -> ImpactModel:
        """The wrapped :class:`~aimz_trainer.ImpactModel`."""
        return self.impact_model

    def predict(self, data: Any, params: Mapping[str, Any] | None = None) -> xr.DataTree | dict[str, np.ndarray]:
        """Posterior-predictive draws for ``data``, kept in memory (``store="memory"``).

        Args:
            data: the input rows (``X``), or a dict of :meth:`ImpactModel.predict
                <aimz_trainer.ImpactModel.predict>`'s keyword arguments (``X`` and the kernel's
                other inputs).
            params: more of its keyword arguments (``batch_size``, ``in_sample``,
                ``intervention``, ``return_sites``, ...); ``return_datatree=False`` returns the
                predictive group as ``{site: array}``, which a scoring server serializes; an int
                ``seed`` draws with ``jax.random.key(seed)`` (by default the model splits a fresh
                key off its own).

        Returns:
            The ``xarray.DataTree`` of :meth:`ImpactModel.predict
            <aimz_trainer.ImpactModel.predict>`, or ``{site: (chain, draw, row) array}``.
        """
        kwargs: dict[str, Any] = {
            "store": "memory",
            "progress": False,
            **(dict(data) if isinstance(data, Mapping) else {"X": data}),
            **(params or {}),
        }
        return_datatree = kwargs.pop("return_datatree", True)
        if (seed := kwargs.pop("seed", None)) is not None:
            kwargs["rng_key"] = jax.random.key(seed)
        tree = self.impact_model.predict(**kwargs)
        if return_datatree:
            return tree
        group = "posterior_predictive" if kwargs.get("in_sample", True) else "predictions"
        return {str(site): variable.values for site, variable in tree[group].data_vars.items()}


def _infer_signature(example: Any, model: ImpactModel) -> ModelSignature | None:
    """The signature MLflow infers from a prediction on ``example``; the prediction splits a
    key off the model's, which is put back, so saving leaves the model's draws unchanged."""
    rng_key = model._rng_key
    try:
        return _infer_signature_from_input_example(example, _ImpactModelWrapper(model))
    finally:
        model._rng_key = rng_key
