"""The ``aimz_trainer.mlflow`` flavor: save, log and load a fitted :class:`~aimz_trainer.ImpactModel`
with MLflow, and autolog its fits.

The same functions as the reference library's ``aimz.mlflow`` (``save_model``, ``log_model``,
``load_model``, ``autolog``, ``get_default_pip_requirements``, ``get_default_conda_env``),
with the same arguments and results. A model is stored with two flavors:

``aimz_trainer``
    the model pickled with cloudpickle, loaded back by :func:`load_model` as an
    ``ImpactModel`` that predicts the same draws;
:py:mod:`mlflow.pyfunc`
    ``mlflow.pyfunc.load_model(uri).predict(X)`` returns the posterior-predictive
    ``xarray.DataTree``; ``params={"return_datatree": False}`` a dict of arrays (what a scoring
    server serializes), ``params={"seed": s}`` draws with ``jax.random.key(s)``.

Needs the ``mlflow`` extra: ``pip install 'aimz-trainer[mlflow]'``.
"""

try:
    import mlflow as _mlflow  # noqa: F401
except ImportError as error:  # pragma: no cover - the test environment has the extra
    raise ImportError(
        "aimz_trainer.mlflow needs MLflow, which is not installed: pip install 'aimz-trainer[mlflow]'."
    ) from error

from aimz_trainer.mlflow.autolog import autolog
from aimz_trainer.mlflow.flavor import (
    FLAVOR_NAME,
    _load_pyfunc,
    get_default_conda_env,
    get_default_pip_requirements,
    load_model,
    log_model,
    save_model,
)

__all__ = [
    "FLAVOR_NAME",
    "_load_pyfunc",
    "autolog",
    "get_default_conda_env",
    "get_default_pip_requirements",
    "load_model",
    "log_model",
    "save_model",
]
