"""ImpactModel: the reference library's one-object workflow (fit, predict, effects) on the
Trainer and the Predictor.

Code written for the reference library's ``ImpactModel`` runs here with only the import
changed. Everything it does goes through :class:`~aimz_trainer.Trainer` (training) and
:class:`~aimz_trainer.Predictor` (prediction): the facade only maps arguments, so callbacks,
checkpoints, validation and multi-device meshes are all available from it.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import xarray as xr
from numpyro.infer import SVI
from numpyro.infer.svi import SVIRunResult

from aimz_trainer._checks import as_key, model_parameters
from aimz_trainer.callbacks import Callback
from aimz_trainer.effects import estimate_effect
from aimz_trainer.errors import ConfigurationError, NotFittedError
from aimz_trainer.predictor import DEFAULT_BATCH_SIZE, Predictor
from aimz_trainer.scratch import ScratchDirectory
from aimz_trainer.sharding import make_mesh
from aimz_trainer.step import set_up_guide
from aimz_trainer.trainer import Trainer

__all__ = ["ImpactModel"]

# Trainer and Trainer.fit arguments the facade sets itself from its own.
_SET_BY_FIT = {"self", "max_epochs", "rng_key", "callbacks", "enable_progress_bar", "devices", "mesh"}
_SET_BY_FIT |= {"svi", "train_data", "batch_size", "num_samples", "shuffle"}


class ImpactModel:
    """Fit a NumPyro model by minibatch SVI, predict into Zarr, estimate intervention effects.

    Args:
        kernel: the NumPyro model, called with keyword arguments (``X``, ``y``, and any extra
            inputs of the rows).
        rng_key: a typed key (``jax.random.key``); a legacy ``uint32`` key
            (``jax.random.PRNGKey``) is converted with a warning. Fits and predictions derive
            their keys from it, so the same key gives the same fit and the same draws.
        inference: a ``numpyro.infer.SVI`` built on ``kernel``.
        param_input: the kernel's parameter that takes the input rows.
        param_output: the kernel's observed site and parameter (``y=None`` in predictions).
        devices: devices of the mesh shared by training and prediction (default: all).

    Example:
        >>> import jax, numpy as np, numpyro, numpyro.distributions as dist
        >>> from numpyro.infer import SVI, Trace_ELBO
        >>> from numpyro.infer.autoguide import AutoNormal
        >>> from optax import adam
        >>> def model(X, y=None):
        ...     w = numpyro.sample("w", dist.Normal())
        ...     with numpyro.plate("data", 1000, subsample_size=len(X)):
        ...         numpyro.sample("y", dist.Normal(w * X, 0.1), obs=y)
        >>> X = np.linspace(-1, 1, 1000, dtype=np.float32)
        >>> svi = SVI(model, AutoNormal(model), adam(0.05), Trace_ELBO())
        >>> im = ImpactModel(model, rng_key=jax.random.key(0), inference=svi)
        >>> im = im.fit(X, 2 * X, num_samples=50, batch_size=100, epochs=10, progress=False)
        >>> dt = im.predict(X, batch_size=500)
        >>> dt["posterior_predictive"]["y"].shape
        (1, 50, 1000)
        >>> round(float(im.posterior["w"].mean()), 1)
        2.0
        >>> im.cleanup()
    """

    def __init__(
        self,
        kernel: Callable[..., Any],
        rng_key: jax.Array,
        inference: SVI,
        *,
        param_input: str = "X",
        param_output: str = "y",
        devices: int | Sequence[jax.Device] | None = None,
    ) -> None:
        if not callable(kernel):
            raise ConfigurationError(f"kernel must be a NumPyro model (a callable); got {type(kernel).__name__}.")
        if not isinstance(inference, SVI):
            raise TypeError(
                f"inference must be a numpyro.infer.SVI (model, guide, optimizer, loss); got "
                f"{type(inference).__name__}. aimz_trainer fits by minibatch SVI only."
            )
        parameters = model_parameters(kernel).names
        for name, value in [("param_input", param_input), ("param_output", param_output)]:
            if not isinstance(value, str) or value not in parameters:
                raise ConfigurationError(
                    f"{name}={value!r} is not a parameter of the kernel; its parameters are {list(parameters)}."
                )
        self.kernel = kernel
        self.inference = inference
        self.param_input = param_input
        self.param_output = param_output
        self.rng_key = as_key(rng_key)
        self.mesh = make_mesh(devices)
        self.trainer: Trainer | None = None
        self.vi_result: SVIRunResult | None = None
        self.posterior: dict[str, jax.Array] | None = None
        # Every store written without output_dir goes here, whichever Predictor wrote it.
        self._scratch = ScratchDirectory()
        self._predictor: Predictor | None = None
        self._prior_predictor: Predictor | None = None

    # -- training ------------------------------------------------------------------------------

    def fit(
        self,
        X: Any,
        y: Any = None,
        *,
        num_samples: int = 1000,
        batch_size: int | None = None,
        epochs: int = 1,
        progress: bool = True,
        shuffle: bool = True,
        callbacks: Sequence[Callback] | None = None,
        **kwargs: Any,
    ) -> ImpactModel:
        """Fit by minibatch SVI for ``epochs`` passes, then draw ``num_samples`` posterior samples.

        Args:
            X: the input rows (``param_input``).
            y: the observed outputs (``param_output``), one per row.
            num_samples: posterior draws kept in :attr:`posterior` (what :meth:`predict` uses).
            batch_size: rows per SVI step (default: all rows).
            epochs: passes over the rows.
            progress: a progress bar per epoch (on a terminal, ``CI`` unset).
            shuffle: a new seeded order of the rows every epoch.
            callbacks: :class:`~aimz_trainer.callbacks.Callback` instances (loggers,
                checkpoints, early stopping, ...).
            **kwargs: the kernel's other row inputs (by parameter name), any
                :class:`~aimz_trainer.Trainer` argument (``log_every_n_steps``, ...) and any
                :meth:`Trainer.fit <aimz_trainer.Trainer.fit>` argument (``val_data``,
                ``ckpt_path``, ...).

        Returns:
            ``self``; :attr:`vi_result` holds ``params``, ``state`` and ``losses``,
            :attr:`trainer` the Trainer that ran; the guide is set up as ``SVI.run`` leaves it
            (``arviz.from_numpyro_svi(im.inference, svi_result=im.vi_result)`` works). Each call
            fits from scratch with the model's key (the same call gives the same fit).
        """
        model_inputs, trainer_kwargs, fit_kwargs = self._split_kwargs(kwargs)
        data = {self.param_input: X, **model_inputs}
        if y is not None:
            data[self.param_output] = y
        num_rows = len(X) if hasattr(X, "__len__") else None
        data_batch = batch_size if batch_size is not None else num_rows
        fit_key, predict_key = jax.random.split(jax.random.fold_in(self.rng_key, 0))
        trainer = Trainer(
            max_epochs=epochs,
            rng_key=fit_key,
            callbacks=[] if callbacks is None else callbacks,
            mesh=self.mesh,
            enable_progress_bar=progress,
            **trainer_kwargs,
        )
        result = trainer.fit(
            self.inference,
            data,
            batch_size=data_batch,  # the Trainer checks it
            num_samples=num_samples,
            shuffle=shuffle,
            **fit_kwargs,
        )
        self.trainer = trainer
        # As numpyro's SVI.run leaves it, so that arviz.from_numpyro_svi(im.inference, svi_result=im.vi_result)
        # works: set up on the first batch's rows (the fit's compiled set-up never leaves the guide).
        first = {key: np.asarray(value)[:data_batch] for key, value in data.items()}
        set_up_guide(self.inference.guide, fit_key, {**first, **self.inference.static_kwargs})
        self.vi_result = SVIRunResult(params=result.params, state=result.state, losses=result.losses)
        self.posterior = result.posterior
        self._predictor = (
            Predictor(
                self.kernel,
                self.posterior,
                mesh=self.mesh,
                rng_key=predict_key,
                scratch=self._scratch,
                guide=self.inference.guide,
                params=result.params,
                static_kwargs=self.inference.static_kwargs,
            )
            if self.posterior
            else None
        )
        return self

    def is_fitted(self) -> bool:
        """Whether :meth:`fit` has run (and the model can predict)."""
        return self.vi_result is not None

    # -- prediction ----------------------------------------------------------------------------

    def predict(
        self,
        X: Any,
        *,
        batch_size: int | None = None,
        output_dir: str | os.PathLike[str] | None = None,
        intervention: Mapping[str, Any] | None = None,
        return_sites: str | Sequence[str] | None = None,
        in_sample: bool = True,
        progress: bool = True,
        resume: bool = False,
        **kwargs: Any,
    ) -> xr.DataTree:
        """Posterior-predictive draws for the rows of ``X``, streamed into a Zarr store.

        See :meth:`Predictor.predict <aimz_trainer.Predictor.predict>`; ``kwargs`` are the
        kernel's other row inputs (passing ``y`` adds it as ``observed_data``). Every call uses
        the same random numbers, so two scenarios (a baseline and an ``intervention``) differ
        only by the intervention. Without ``output_dir`` the store goes to this model's scratch
        directory (see :meth:`cleanup`).
        """
        predictor = self._fitted_predictor("predict")
        return predictor.predict(
            self._row_inputs(X, kwargs),
            batch_size=DEFAULT_BATCH_SIZE if batch_size is None else batch_size,
            output_dir=output_dir,
            intervention=intervention,
            return_sites=return_sites,
            in_sample=in_sample,
            resume=resume,
            progress=progress,
        )

    def sample_prior_predictive(
        self,
        X: Any,
        *,
        num_samples: int | None = None,
        batch_size: int | None = None,
        output_dir: str | os.PathLike[str] | None = None,
        return_sites: str | Sequence[str] | None = None,
        progress: bool = True,
        **kwargs: Any,
    ) -> xr.DataTree:
        """Prior-predictive draws (groups ``prior`` and ``prior_predictive``); needs no fit.
        ``num_samples`` defaults to the posterior's draw count, or 1,000 before a fit."""
        if self._prior_predictor is None:
            prior_key = jax.random.fold_in(self.rng_key, 1)
            self._prior_predictor = Predictor(
                self.kernel,
                None,
                mesh=self.mesh,
                rng_key=prior_key,
                scratch=self._scratch,
                static_kwargs=self.inference.static_kwargs,
            )
        if num_samples is None:
            num_samples = self._predictor.num_samples if self._predictor is not None else 1000
        return self._prior_predictor.sample_prior_predictive(
            self._row_inputs(X, kwargs),
            num_samples=num_samples,
            batch_size=DEFAULT_BATCH_SIZE if batch_size is None else batch_size,
            output_dir=output_dir,
            return_sites=return_sites,
            progress=progress,
        )

    def log_likelihood(
        self,
        X: Any,
        y: Any,
        *,
        batch_size: int | None = None,
        output_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
        **kwargs: Any,
    ) -> xr.DataTree:
        """Pointwise log-likelihood of ``y`` under each posterior draw (for ``arviz.loo``)."""
        predictor = self._fitted_predictor("log_likelihood")
        return predictor.log_likelihood(
            {**self._row_inputs(X, kwargs), self.param_output: y},
            batch_size=DEFAULT_BATCH_SIZE if batch_size is None else batch_size,
            output_dir=output_dir,
            progress=progress,
        )

    def estimate_effect(
        self,
        output_baseline: xr.DataTree | None = None,
        output_intervention: xr.DataTree | None = None,
        args_baseline: Mapping[str, Any] | None = None,
        args_intervention: Mapping[str, Any] | None = None,
        *,
        site: str | None = None,
        ci: float = 0.94,
    ) -> xr.DataTree:
        """The effect of an intervention on ``site`` (default ``param_output``): per-draw
        differences and a summary (:func:`aimz_trainer.estimate_effect`).

        Each scenario is a DataTree from :meth:`predict`, or the arguments of a :meth:`predict`
        call (``{"X": X, "intervention": {...}}``) that computes it.
        """
        self._fitted_predictor("estimate_effect")
        scenarios = []
        for name, output, args in [
            ("baseline", output_baseline, args_baseline),
            ("intervention", output_intervention, args_intervention),
        ]:
            if output is None and args is None:
                raise ConfigurationError(
                    f"pass output_{name} (a DataTree from predict) or args_{name} (its arguments)."
                )
            scenarios.append(output if output is not None else self.predict(**dict(args or {})))
        return estimate_effect(scenarios[0], scenarios[1], site or self.param_output, ci=ci)

    # -- scratch directory ---------------------------------------------------------------------

    @property
    def temp_dir(self) -> str | None:
        """The scratch directory of stores written without ``output_dir`` (``None`` until the
        first such store, and after :meth:`cleanup`)."""
        return str(self._scratch.path) if self._scratch.created else None

    def cleanup(self) -> None:
        """Remove the scratch directory now. It is otherwise removed once this model and every
        DataTree read from it are garbage-collected, and at interpreter exit. A no-op when
        nothing was written there (every store had an ``output_dir``) or it is already gone."""
        self._scratch.cleanup()

    # -- helpers -------------------------------------------------------------------------------

    def _fitted_predictor(self, method: str) -> Predictor:
        if not self.is_fitted():
            raise NotFittedError(f"{method} needs a fitted model: call fit(X, y, ...) first.")
        if self._predictor is None:
            raise NotFittedError(f"{method} needs posterior draws: fit with num_samples > 0.")
        return self._predictor

    def _row_inputs(self, X: Any, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        parameters = model_parameters(self.kernel).names
        unknown = sorted(set(kwargs) - set(parameters))
        if unknown:
            raise ConfigurationError(
                f"{unknown} are not parameters of the kernel; its parameters are {list(parameters)}."
            )
        return {self.param_input: X, **kwargs}

    def _split_kwargs(self, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """``fit``'s extra keywords, sorted into model inputs, Trainer and Trainer.fit arguments."""
        model = set(model_parameters(self.kernel).names) - {self.param_input, self.param_output}
        trainer = set(inspect.signature(Trainer.__init__).parameters) - _SET_BY_FIT
        fit = set(inspect.signature(Trainer.fit).parameters) - _SET_BY_FIT
        unknown = sorted(set(kwargs) - model - trainer - fit)
        if unknown:
            raise ConfigurationError(
                f"fit got unexpected arguments {unknown}: expected the kernel's inputs {sorted(model)}, Trainer "
                f"arguments {sorted(trainer)} or Trainer.fit arguments {sorted(fit)}."
            )
        pick = lambda names: {k: v for k, v in kwargs.items() if k in names}  # noqa: E731
        return pick(model), pick(trainer), pick(fit)
