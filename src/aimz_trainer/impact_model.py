"""ImpactModel: the reference library's one-object workflow (fit, predict, effects) on the
Trainer and the Predictor.

Code written for the reference library's ``ImpactModel`` runs here with only the import
changed: every public method, property, argument, group name, exception and warning class is
there under the same name. Training goes through :class:`~aimz_trainer.Trainer` (so callbacks,
checkpoints, validation and multi-device meshes are available from ``fit``), prediction
through :class:`~aimz_trainer.Predictor`; MCMC runs NumPyro's own ``MCMC``. As in the
reference library, every call draws with a fresh key split from the model's own, unless it is
given ``rng_key``; the README's "Differences from aimz" table lists where this class differs.
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import jax
import numpy as np
import xarray as xr
from numpyro import handlers
from numpyro.infer import MCMC, SVI, Predictive
from numpyro.infer.svi import SVIRunResult, SVIState

from aimz_trainer._checks import as_key, is_int_at_least, model_parameters, require_bool, require_choice
from aimz_trainer.array_data import ArrayLoader, read_batches
from aimz_trainer.callbacks import Callback
from aimz_trainer.compilation_cache import CompilationCache, use_compilation_cache
from aimz_trainer.data import is_lazy_source
from aimz_trainer.effects import scenario_difference
from aimz_trainer.errors import (
    AimzWarning,
    ConfigurationError,
    DataError,
    FitWarning,
    KernelArgumentError,
    NotFittedError,
    OutputWarning,
)
from aimz_trainer.kernel_spec import (
    RESERVED_SITE_NAMES,
    KernelSpec,
    SiteInfo,
    check_kernel_signature,
    merge_specs,
    trace_kernel,
)
from aimz_trainer.predictor import DEFAULT_BATCH_SIZE, Predictor
from aimz_trainer.scratch import ScratchDirectory
from aimz_trainer.sharding import make_mesh
from aimz_trainer.step import set_up_guide
from aimz_trainer.trainer import FitResult, Trainer

__all__ = ["ImpactModel"]

# Trainer and Trainer.fit arguments the facade sets itself from its own.
_SET_BY_FIT = {"self", "max_epochs", "max_steps", "rng_key", "callbacks", "enable_progress_bar", "devices", "mesh"}
_SET_BY_FIT |= {"svi", "train_data", "batch_size", "num_samples", "shuffle", "init_state"}

ShardAxis = Literal["obs", "draw"]
Store = Literal["persistent", "memory"]


class ImpactModel:
    """Fit a NumPyro kernel (minibatch SVI, or MCMC), predict into Zarr, estimate effects.

    Args:
        kernel: the NumPyro model; every argument is passed by name, ``param_input`` has no
            default and ``param_output`` defaults to ``None``.
        rng_key: a typed key (``jax.random.key``); a legacy ``uint32`` key is converted with an
            :class:`~aimz_trainer.errors.AimzWarning`. Each call without its own ``rng_key``
            splits a fresh key from it (:attr:`rng_key` advances).
        inference: a ``numpyro.infer.SVI`` or ``numpyro.infer.MCMC`` on ``kernel``.
        param_input: the kernel's parameter that takes the input rows.
        param_output: the kernel's output parameter and observed site.
        devices: devices of the mesh shared by training and prediction (default: all local).
        compilation_cache: keep compiled programs on disk for the next process (see
            :mod:`aimz_trainer.compilation_cache`): ``True`` (default) in this user's cache
            directory (or where ``AIMZ_TRAINER_COMPILATION_CACHE`` says), ``False`` none from
            here on, or a directory. Importing this class already turned the environment's
            choice on (``AIMZ_TRAINER_COMPILATION_CACHE=0`` keeps the whole process off it). A
            cache set through JAX (``JAX_COMPILATION_CACHE_DIR``) wins.

    Raises:
        KernelValidationError: the kernel's signature breaks the rules above.
        TypeError: ``inference`` is neither SVI nor MCMC.

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
        >>> dt = im.predict(X, batch_size=500, progress=False)
        >>> dt["posterior_predictive"]["y"].shape
        (1, 50, 1000)
        >>> round(float(im.posterior["w"].mean()), 1)
        2.0
        >>> im.cleanup()
    """

    _models: ClassVar[weakref.WeakSet[ImpactModel]] = weakref.WeakSet()

    def __init__(
        self,
        kernel: Callable[..., Any],
        rng_key: jax.Array,
        inference: SVI | MCMC,
        *,
        param_input: str = "X",
        param_output: str = "y",
        devices: int | Sequence[jax.Device] | None = None,
        compilation_cache: CompilationCache = True,
    ) -> None:
        use_compilation_cache(compilation_cache)
        check_kernel_signature(kernel, param_input, param_output)
        if not isinstance(inference, SVI | MCMC):
            raise TypeError(
                f"inference must be a numpyro.infer.SVI or numpyro.infer.MCMC on the kernel; got "
                f"{type(inference).__name__}."
            )
        self._kernel = kernel
        self._inference = inference
        self._param_input = param_input
        self._param_output = param_output
        self._rng_key = as_key(rng_key)
        self._devices = devices
        self._vi_result: SVIRunResult | None = None
        self._vi_state: SVIState | None = None
        self._posterior: dict[str, Any] | None = None
        self._num_samples = 0
        self._num_chains = 1
        self._is_fitted = False
        self._kernel_spec: KernelSpec | None = None
        self._sites: dict[str, SiteInfo] = {}
        # The kwargs a guide is called with to draw posterior samples: the fit's first row.
        self._guide_kwargs: dict[str, Any] = {}
        # The guide's parameters fitted together with the posterior (per-row latent sites).
        self._fitted_params: dict[str, Any] | None = None
        self._start_runtime()

    def _start_runtime(self) -> None:
        """What lives only in this process: the mesh, the scratch directory, compiled code."""
        self.mesh = make_mesh(self._devices)
        self.trainer: Trainer | None = None
        self._scratch = ScratchDirectory()
        self._predictor: Predictor | None = None
        self._svi_update: Callable[..., Any] | None = None
        ImpactModel._models.add(self)

    # -- properties ----------------------------------------------------------------------------

    @property
    def kernel(self) -> Callable[..., Any]:
        """The NumPyro model."""
        return self._kernel

    @property
    def inference(self) -> SVI | MCMC:
        """The NumPyro inference object (``SVI`` or ``MCMC``)."""
        return self._inference

    @property
    def param_input(self) -> str:
        """The kernel's parameter that takes the input rows."""
        return self._param_input

    @property
    def param_output(self) -> str:
        """The kernel's output parameter (and observed site)."""
        return self._param_output

    @property
    def rng_key(self) -> jax.Array:
        """The model's key; each call without ``rng_key`` splits a fresh one off it."""
        return self._rng_key

    @property
    def kernel_spec(self) -> KernelSpec | None:
        """The kernel's sites as traced so far (:class:`~aimz_trainer.kernel_spec.KernelSpec`),
        or ``None`` before the first trace or posterior."""
        return self._kernel_spec

    @property
    def posterior(self) -> dict[str, Any] | None:
        """Posterior draws by site, draws (of all chains, chain by chain) on the leading axis;
        ``None`` before a fit. Setting it is :meth:`set_posterior_sample`."""
        return self._posterior

    @posterior.setter
    def posterior(self, posterior_sample: Mapping[str, Any]) -> None:
        self.set_posterior_sample(posterior_sample)

    @property
    def vi_result(self) -> SVIRunResult | None:
        """The last SVI fit's ``SVIRunResult(params, state, losses)``, or ``None``.

        Setting it does not mark the model fitted nor draw samples; :meth:`fit`,
        :meth:`fit_on_batch` and :meth:`train_on_batch` continue from its state. Non-finite
        losses in it give a :class:`~aimz_trainer.errors.FitWarning`.
        """
        return self._vi_result

    @vi_result.setter
    def vi_result(self, vi_result: SVIRunResult) -> None:
        if not np.all(np.isfinite(np.asarray(vi_result.losses))):
            warnings.warn("vi_result.losses hold NaN or Inf: the fit it records diverged.", FitWarning, stacklevel=2)
        self._vi_result = vi_result
        self._vi_state = vi_result.state

    @property
    def temp_dir(self) -> str | None:
        """The scratch directory of stores written without ``output_dir`` (``None`` until the
        first such store, and after :meth:`cleanup`)."""
        return str(self._scratch.path) if self._scratch.created else None

    def is_fitted(self) -> bool:
        """Whether the model holds posterior draws (a fit, or :meth:`set_posterior_sample`)."""
        return self._is_fitted

    # -- training ------------------------------------------------------------------------------

    def fit(
        self,
        X: Any,
        y: Any = None,
        *,
        num_samples: int = 1000,
        rng_key: jax.Array | None = None,
        progress: bool = True,
        batch_size: int | None = None,
        epochs: int = 1,
        shuffle: bool = True,
        callbacks: Sequence[Callback] | None = None,
        **kwargs: Any,
    ) -> ImpactModel:
        """Fit by minibatch SVI for ``epochs`` passes, then draw ``num_samples`` posterior samples.

        A second call continues from the SVI state of the first (as does a fit after
        :meth:`train_on_batch` or setting :attr:`vi_result`); create a new model to start over.

        Args:
            X: the input rows, or an :class:`~aimz_trainer.array_data.ArrayLoader` (its
                dataset, batch size and shuffle flag are used) or another iterable of batch
                mappings (read into memory) that carries the output too.
            y: the observed outputs, one per row; required with array ``X``.
            num_samples: posterior draws kept in :attr:`posterior`.
            rng_key: the fit's key (default: split off :attr:`rng_key`).
            progress: a progress bar (on a terminal, ``CI`` unset).
            batch_size: rows per SVI step (default: all rows).
            epochs: passes over the rows.
            shuffle: a new seeded order of the rows every epoch.
            callbacks: :class:`~aimz_trainer.callbacks.Callback` instances.
            **kwargs: the kernel's other arguments (arrays of one row per observation are
                batched with ``X``; anything else is passed whole), and any
                :class:`~aimz_trainer.Trainer` or :meth:`Trainer.fit
                <aimz_trainer.Trainer.fit>` argument (``log_every_n_steps``, ``val_data``...).

        Returns:
            ``self``; :attr:`vi_result` holds this fit's ``params``, ``state`` and ``losses``,
            :attr:`trainer` the Trainer that ran.

        Raises:
            TypeError: the inference is MCMC (use :meth:`fit_on_batch`), or a kernel keyword
                is not the kernel's or is ``param_input``/``param_output``.
            DataError: ``y`` is missing with array ``X``, or the rows do not align.
        """
        if isinstance(self._inference, MCMC):
            raise TypeError("fit trains by minibatch SVI; with MCMC inference use fit_on_batch.")
        trainer_kwargs, fit_kwargs, kernel_kwargs = self._split_fit_kwargs(kwargs)
        rows, whole, loader = self._inputs("fit", X, y, kernel_kwargs, need_output=True)
        num_rows = int(rows[self._param_input].shape[0])
        if loader is not None:
            batch_size, shuffle = loader.batch_size, loader.shuffle
        key = self._next_key(rng_key)
        svi = self._svi(whole)
        self._trace({**rows, **whole}, with_output=True)
        trainer = Trainer(
            max_epochs=epochs,
            rng_key=key,
            callbacks=[] if callbacks is None else callbacks,
            mesh=self.mesh,
            enable_progress_bar=progress,
            **{"enable_model_summary": False, **trainer_kwargs},  # aimz prints no table
        )
        result = trainer.fit(
            svi,
            rows,
            batch_size=num_rows if batch_size is None else batch_size,  # the Trainer checks it
            num_samples=num_samples,
            shuffle=shuffle,
            init_state=self._vi_state,
            **fit_kwargs,
        )
        self.trainer = trainer
        self._keep_svi_fit(result, rows, whole, key, batch_rows=num_rows if batch_size is None else batch_size)
        return self

    def fit_on_batch(
        self,
        X: Any,
        y: Any,
        *,
        num_steps: int = 10000,
        num_samples: int = 1000,
        rng_key: jax.Array | None = None,
        progress: bool = True,
        **kwargs: Any,
    ) -> ImpactModel:
        """Fit on one batch: ``num_steps`` full-batch SVI steps (continuing from an SVI state,
        as :meth:`fit` does) then ``num_samples`` posterior draws; or, with MCMC, run the
        sampler (``num_steps``, ``num_samples`` and ``progress`` are then its own settings').

        Returns:
            ``self``, fitted. Under MCMC :attr:`posterior` holds every chain's draws, chain by
            chain, and outputs keep the chains along ``chain``.
        """
        rows, whole, _ = self._inputs("fit_on_batch", X, y, kwargs, need_output=True, loaders=False)
        key = self._next_key(rng_key)
        self._trace({**rows, **whole}, with_output=True)
        if isinstance(self._inference, MCMC):
            self._inference.run(key, **rows, **whole)
            grouped = self._inference.get_samples(group_by_chain=True)
            chains = self._inference.num_chains
            latent = {k: v for k, v in grouped.items() if k in self._latent_sites()}
            self._set_posterior({k: np.asarray(v).reshape(-1, *v.shape[2:]) for k, v in latent.items()}, chains)
            self._fitted_params = None
            return self
        if not is_int_at_least(num_steps, 1):
            raise ConfigurationError(f"num_steps must be a positive int; got {num_steps!r}.")
        num_rows = int(rows[self._param_input].shape[0])
        trainer = Trainer(
            max_epochs=num_steps,
            rng_key=key,
            callbacks=[],
            mesh=self.mesh,
            enable_progress_bar=progress,
            enable_model_summary=False,
        )
        result = trainer.fit(
            self._svi(whole),
            rows,
            batch_size=num_rows,
            num_samples=num_samples,
            shuffle=False,
            init_state=self._vi_state,
        )
        self.trainer = trainer
        self._keep_svi_fit(result, rows, whole, key, batch_rows=num_rows)
        return self

    def train_on_batch(
        self, X: Any, y: Any, *, rng_key: jax.Array | None = None, **kwargs: Any
    ) -> tuple[SVIState, jax.Array]:
        """One SVI step on a batch, continuing from (and keeping) the model's SVI state.

        Args:
            rng_key: used only to initialise the SVI state when there is none yet (default:
                split off :attr:`rng_key`).

        Returns:
            The updated ``SVIState`` and the step's loss. The model is not marked fitted.
        """
        if isinstance(self._inference, MCMC):
            raise TypeError("train_on_batch runs one SVI step; with MCMC inference use fit_on_batch.")
        rows, whole, _ = self._inputs("train_on_batch", X, y, kwargs, need_output=True, loaders=False)
        svi = self._svi(whole)
        arrays = {k: jax.numpy.asarray(v) for k, v in rows.items()}
        if self._vi_state is None:
            self._vi_state = svi.init(self._next_key(rng_key), **arrays)
        elif svi.constrain_fn is None:  # a state from the Trainer or vi_result: set svi up for it
            svi.init(jax.random.key(0), **arrays)
        if self._svi_update is None:
            self._svi_update = jax.jit(svi.update)
        self._vi_state, loss = self._svi_update(self._vi_state, **arrays)
        return self._vi_state, loss

    def _keep_svi_fit(
        self, result: FitResult, rows: Mapping[str, Any], whole: Mapping[str, Any], key: jax.Array, batch_rows: int
    ) -> None:
        """Keep a Trainer's fit, and leave the guide set up on a batch as ``SVI.run`` leaves it
        (``arviz.from_numpyro_svi(im.inference, svi_result=im.vi_result)`` and
        ``guide.sample_posterior`` work; the Trainer's compiled set-up never leaves the guide)."""
        self._vi_result = SVIRunResult(params=result.params, state=result.state, losses=result.losses)
        self._vi_state = result.state
        self._guide_kwargs = {**{k: np.asarray(v[:1]) for k, v in rows.items()}, **whole}
        self._fitted_params = dict(result.params)
        first = {k: np.asarray(v[:batch_rows]) for k, v in rows.items()}
        set_up_guide(self._inference.guide, key, {**first, **self._static_kwargs(whole)})
        # Global latent sites only: deterministic ones are computed per call, on its rows.
        latent = {k: v for k, v in (result.posterior or {}).items() if k in self._latent_sites()}
        if latent:
            self._set_posterior(latent, 1)
        else:
            self._is_fitted, self._posterior, self._predictor = False, None, None

    # -- posterior samples ---------------------------------------------------------------------

    def sample(
        self,
        *,
        num_samples: int = 1000,
        rng_key: jax.Array | None = None,
        return_sites: str | Iterable[str] | None = None,
        return_datatree: bool = True,
        **kwargs: Any,
    ) -> xr.DataTree | dict[str, np.ndarray]:
        """Draw posterior samples from the fitted guide (SVI), or continue the chains (MCMC).

        Args:
            num_samples: draws (MCMC: per chain, the sampler's own setting).
            rng_key: the draws' key (default: split off :attr:`rng_key`; MCMC continues its
                chains' keys).
            return_sites: sites to return (default: the kernel's latent sites).
            return_datatree: a DataTree (group ``posterior``) or a dict of arrays.
            **kwargs: arguments of the guide (SVI: default, the fit's first row) or of the
                kernel (MCMC: required).

        Raises:
            NotFittedError: no SVI state or MCMC run to sample from.
        """
        sites = _site_names("return_sites", return_sites)
        if isinstance(self._inference, MCMC):
            if getattr(self._inference, "_states", None) is None and self._inference.last_state is None:
                raise NotFittedError("sample needs an MCMC run: call fit_on_batch(X, y) first.")
            mcmc = self._inference
            mcmc.post_warmup_state = mcmc.last_state
            mcmc.run(mcmc.post_warmup_state.rng_key, **kwargs)
            grouped = {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}
            draws = {k: v.reshape(-1, *v.shape[2:]) for k, v in grouped.items() if sites is None or k in sites}
            num_chains = mcmc.num_chains
        else:
            if self._vi_result is None and self._vi_state is None:
                raise NotFittedError("sample needs an SVI state: call fit or fit_on_batch, or set vi_result, first.")
            if not is_int_at_least(num_samples, 1):
                raise ConfigurationError(f"num_samples must be a positive int; got {num_samples!r}.")
            params = self._vi_result.params if self._vi_result is not None else self._params_of(self._vi_state)
            guide_kwargs = kwargs or self._guide_kwargs
            latent = self._latent_sites()
            wanted = sites if sites is not None else (latent or None)
            predictive = Predictive(self._inference.guide, params=params, num_samples=num_samples)
            drawn = predictive(self._next_key(rng_key), **guide_kwargs)
            draws = {k: np.asarray(v) for k, v in drawn.items() if wanted is None or k in wanted}
            num_chains = 1
        if sites is not None and (missing := sorted(set(sites) - set(draws))):
            warnings.warn(f"return_sites {missing} are not in the posterior samples.", OutputWarning, stacklevel=2)
        if not return_datatree:
            return draws
        return xr.DataTree.from_dict({"posterior": _draws_dataset(draws, num_chains)})

    def set_posterior_sample(self, posterior_sample: Mapping[str, Any], *, num_chains: int = 1) -> ImpactModel:
        """Use posterior draws made elsewhere, in place of a fit.

        Args:
            posterior_sample: draws by site, the draws (of all chains, chain by chain) on the
                leading axis of every array.
            num_chains: chains the draws are stacked from; outputs keep them along ``chain``.

        Returns:
            ``self``, fitted. The output site is dropped with an
            :class:`~aimz_trainer.errors.AimzWarning`; latent sites a trace of the kernel
            records but the draws lack are drawn from the prior, with an
            :class:`~aimz_trainer.errors.OutputWarning`.

        Raises:
            ConfigurationError: no draws, a scalar, draws of different lengths, a site named
                ``chain`` or ``draw``, or a draw count that ``num_chains`` does not divide.
        """
        if not isinstance(posterior_sample, Mapping):
            raise ConfigurationError(
                f"posterior_sample must map site names to draws; got {type(posterior_sample).__name__}."
            )
        draws = {k: np.asarray(v) for k, v in posterior_sample.items()}
        if self._param_output in draws:
            del draws[self._param_output]
            warnings.warn(f"the output site {self._param_output!r} is removed.", AimzWarning, stacklevel=2)
        if reserved := sorted(set(RESERVED_SITE_NAMES) & set(draws)):
            raise ConfigurationError(f"the site name(s) {reserved} are dimensions of the output trees; rename them.")
        if not draws:
            raise ConfigurationError("posterior_sample holds no draws.")
        if scalars := sorted(k for k, v in draws.items() if v.ndim == 0):
            raise ConfigurationError(f"posterior_sample{scalars} are scalars; each needs a leading draw axis.")
        lengths = {k: v.shape[0] for k, v in draws.items()}
        if len(set(lengths.values())) > 1:
            raise ConfigurationError(f"posterior_sample's draws differ in length: {lengths}.")
        if not is_int_at_least(num_chains, 1) or next(iter(lengths.values())) % num_chains:
            raise ConfigurationError(
                f"num_chains must be a positive int dividing the {next(iter(lengths.values()))} draws; got "
                f"{num_chains!r}."
            )
        if self._kernel_spec is not None and self._kernel_spec.traced:
            if missing := sorted(set(self._latent_sites()) - set(draws)):
                warnings.warn(
                    f"posterior_sample has no draws of the latent site(s) {missing}; predictions draw them from the "
                    "prior.",
                    OutputWarning,
                    stacklevel=2,
                )
        else:
            self._kernel_spec = KernelSpec(
                traced=False, sample_sites=tuple(draws), return_sites=(self._param_output,), output_observed=False
            )
        self._fitted_params = None
        self._set_posterior(draws, num_chains)
        return self

    def _set_posterior(self, draws: dict[str, Any], num_chains: int) -> None:
        self._posterior = draws
        self._num_chains = num_chains
        self._num_samples = next(iter(draws.values())).shape[0]
        self._is_fitted = True
        self._predictor = None

    # -- prediction ----------------------------------------------------------------------------

    def predict(
        self,
        X: Any,
        *,
        intervention: Mapping[str, Any] | None = None,
        condition: Mapping[str, Any] | None = None,
        rng_key: jax.Array | None = None,
        in_sample: bool = True,
        return_sites: str | Iterable[str] | None = None,
        shard_axis: ShardAxis = "obs",
        batch_size: int | None = None,
        store: Store = "persistent",
        output_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
        **kwargs: Any,
    ) -> xr.DataTree:
        """Posterior-predictive draws for the rows of ``X``, streamed into a Zarr store.

        Args:
            X: the input rows, an :class:`~aimz_trainer.array_data.ArrayLoader`, or another
                iterable of batch mappings (read into memory).
            intervention: ``{site: value}`` applied with ``numpyro.handlers.do``.
            condition: ``{site: value}`` the sites take while sampling
                (``numpyro.handlers.condition``), each value passed whole.
            rng_key: this call's key (default: split off :attr:`rng_key`, so every call draws
                afresh; pass one key to two calls to pair their draws).
            in_sample: group ``posterior_predictive`` (the fit's rows: per-row latent sites
                from the guide) or ``predictions`` (new rows).
            return_sites: sites to write (default: the output and the deterministic sites).
            shard_axis: ``"obs"`` or ``"draw"``: validated and recorded; the Predictor
                splits rows over the devices and tiles the draws itself, whichever is given.
            batch_size: rows per batch and per Zarr block (default: 100,000).
            store: ``"persistent"``: a store under ``output_dir`` (default: the scratch
                directory), the tree lazy with ``attrs["artifact_path"]``; ``"memory"``: the
                tree loaded into memory, no store left behind.
            output_dir: where the store goes (not with ``store="memory"``).
            progress: a progress bar.
            **kwargs: the kernel's other arguments (row arrays are batched with ``X``).

        Raises:
            NotFittedError: no posterior draws yet.
            TypeError: ``condition`` is not a mapping; a keyword is not the kernel's, or is
                ``param_input``/``param_output``.
            ConfigurationError: ``shard_axis``, ``store`` or ``output_dir`` is invalid, or the
                intervention names no sample site.
            DataError: ``X`` is a scalar or empty.
        """
        return self._posterior_predictive(
            "predict", X, kwargs, intervention=intervention, condition=condition, rng_key=rng_key,
            in_sample=in_sample, return_sites=return_sites, shard_axis=shard_axis, batch_size=batch_size,
            store=store, output_dir=output_dir, progress=progress,
        )  # fmt: skip

    def sample_posterior_predictive(
        self,
        X: Any,
        *,
        intervention: Mapping[str, Any] | None = None,
        condition: Mapping[str, Any] | None = None,
        rng_key: jax.Array | None = None,
        return_sites: str | Iterable[str] | None = None,
        shard_axis: ShardAxis = "obs",
        batch_size: int | None = None,
        store: Store = "persistent",
        output_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
        **kwargs: Any,
    ) -> xr.DataTree:
        """:meth:`predict` with ``in_sample=True``."""
        return self._posterior_predictive(
            "sample_posterior_predictive", X, kwargs, intervention=intervention, condition=condition,
            rng_key=rng_key, in_sample=True, return_sites=return_sites, shard_axis=shard_axis,
            batch_size=batch_size, store=store, output_dir=output_dir, progress=progress,
        )  # fmt: skip

    def predict_on_batch(
        self,
        X: Any,
        *,
        intervention: Mapping[str, Any] | None = None,
        condition: Mapping[str, Any] | None = None,
        rng_key: jax.Array | None = None,
        in_sample: bool = True,
        return_sites: str | Iterable[str] | None = None,
        return_datatree: bool = True,
        **kwargs: Any,
    ) -> xr.DataTree | dict[str, np.ndarray]:
        """:meth:`predict` of one in-memory batch: a loaded DataTree, or with
        ``return_datatree=False`` a dict of the requested sites, ``(draws, rows, ...)``."""
        tree = self._posterior_predictive(
            "predict_on_batch", X, kwargs, intervention=intervention, condition=condition, rng_key=rng_key,
            in_sample=in_sample, return_sites=return_sites, shard_axis="obs", batch_size=None, store="memory",
            output_dir=None, progress=False, loaders=False,
        )  # fmt: skip
        return tree if return_datatree else _flat_draws(tree, "posterior_predictive" if in_sample else "predictions")

    def sample_posterior_predictive_on_batch(
        self,
        X: Any,
        *,
        intervention: Mapping[str, Any] | None = None,
        condition: Mapping[str, Any] | None = None,
        rng_key: jax.Array | None = None,
        return_sites: str | Iterable[str] | None = None,
        return_datatree: bool = True,
        **kwargs: Any,
    ) -> xr.DataTree | dict[str, np.ndarray]:
        """:meth:`predict_on_batch` with ``in_sample=True``."""
        return self.predict_on_batch(
            X, intervention=intervention, condition=condition, rng_key=rng_key, in_sample=True,
            return_sites=return_sites, return_datatree=return_datatree, **kwargs,
        )  # fmt: skip

    def sample_prior_predictive(
        self,
        X: Any,
        *,
        intervention: Mapping[str, Any] | None = None,
        num_samples: int = 1000,
        rng_key: jax.Array | None = None,
        return_sites: str | Iterable[str] | None = None,
        shard_axis: ShardAxis = "obs",
        batch_size: int | None = None,
        store: Store = "persistent",
        output_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
        **kwargs: Any,
    ) -> xr.DataTree:
        """Prior-predictive draws (groups ``prior`` and ``prior_predictive``); needs no fit.
        Arguments as in :meth:`predict`."""
        return self._prior_predictive(
            "sample_prior_predictive", X, kwargs, intervention=intervention, num_samples=num_samples,
            rng_key=rng_key, return_sites=return_sites, shard_axis=shard_axis, batch_size=batch_size, store=store,
            output_dir=output_dir, progress=progress,
        )  # fmt: skip

    def sample_prior_predictive_on_batch(
        self,
        X: Any,
        *,
        intervention: Mapping[str, Any] | None = None,
        num_samples: int = 1000,
        rng_key: jax.Array | None = None,
        return_sites: str | Iterable[str] | None = None,
        return_datatree: bool = True,
        **kwargs: Any,
    ) -> xr.DataTree | dict[str, np.ndarray]:
        """:meth:`sample_prior_predictive` of one in-memory batch (see :meth:`predict_on_batch`)."""
        tree = self._prior_predictive(
            "sample_prior_predictive_on_batch", X, kwargs, intervention=intervention, num_samples=num_samples,
            rng_key=rng_key, return_sites=return_sites, shard_axis="obs", batch_size=None, store="memory",
            output_dir=None, progress=False, loaders=False,
        )  # fmt: skip
        return tree if return_datatree else _flat_draws(tree, "prior_predictive")

    def log_likelihood(
        self,
        X: Any,
        y: Any = None,
        *,
        shard_axis: ShardAxis = "obs",
        batch_size: int | None = None,
        store: Store = "persistent",
        output_dir: str | os.PathLike[str] | None = None,
        progress: bool = True,
        **kwargs: Any,
    ) -> xr.DataTree:
        """Pointwise log-likelihood of the output under each posterior draw (group
        ``log_likelihood``, for ``arviz.loo``); ``y`` is required with array ``X``."""
        self._require_fitted("log_likelihood")
        _check_store(shard_axis, store, output_dir)
        rows, whole, loader = self._inputs("log_likelihood", X, y, kwargs, need_output=True)
        predictor = self._predictor_for(whole, None)
        tree = predictor.log_likelihood(
            rows, batch_size=self._batch(batch_size, loader), output_dir=output_dir, progress=progress,
            rng_key=self._next_key(None),
        )  # fmt: skip
        return self._finish(tree, store, shard_axis)

    def estimate_effect(
        self,
        output_baseline: xr.DataTree | None = None,
        output_intervention: xr.DataTree | None = None,
        args_baseline: Mapping[str, Any] | None = None,
        args_intervention: Mapping[str, Any] | None = None,
        *,
        on_batch: bool = False,
    ) -> xr.DataTree:
        """The effect of an intervention: intervention minus baseline for every site of the
        predictive group both scenarios share, draw by draw, with the ``posterior`` group.

        Each scenario is a DataTree (from :meth:`predict` or :meth:`sample_prior_predictive`)
        or the keyword arguments of a :meth:`predict` call (``{"X": X, "intervention": {...}}``;
        with ``on_batch``, of :meth:`predict_on_batch`) that computes it. Scenarios computed
        here share one key unless the arguments give their own, so their draws are paired.
        Scenarios drawn with different keys give a
        :class:`~aimz_trainer.errors.SamplingNoiseWarning` (an ``OutputWarning``).

        Raises:
            NotFittedError: a scenario must be computed and the model is not fitted.
            ConfigurationError: neither the output nor the arguments of a scenario are given,
                or the scenarios share no predictive group.
        """
        require_bool("on_batch", on_batch)
        shared_key = None
        scenarios = []
        for name, output, args in [
            ("baseline", output_baseline, args_baseline),
            ("intervention", output_intervention, args_intervention),
        ]:
            if output is None and args is None:
                raise ConfigurationError(
                    f"pass output_{name} (a DataTree from predict) or args_{name} (the arguments of predict)."
                )
            if output is None:
                self._require_fitted("estimate_effect")
                call = dict(args or {})
                if "rng_key" not in call:
                    shared_key = self._next_key(None) if shared_key is None else shared_key
                    call["rng_key"] = shared_key
                output = self.predict_on_batch(**call) if on_batch else self.predict(**call)
            scenarios.append(output)
        return scenario_difference(scenarios[0], scenarios[1])

    # -- scratch directories -------------------------------------------------------------------

    def cleanup(self) -> None:
        """Remove the scratch directory now. It is otherwise removed once this model and every
        DataTree read from it are garbage-collected, and at interpreter exit. Stores written
        to an ``output_dir`` are never removed."""
        self._scratch.cleanup()

    @classmethod
    def cleanup_models(cls) -> None:
        """:meth:`cleanup` every ImpactModel of this process."""
        for model in list(cls._models):
            model.cleanup()

    def describe(self) -> dict[str, Any]:
        """The kernel and the posterior the model holds, as plain Python values: the kernel's
        name and arguments, the input and output parameters, the inference, whether it is
        fitted with how many chains and draws, and each known site's ``kind`` (``"latent"``,
        ``"observed"``, ``"deterministic"``), ``dims`` (its plates after ``chain`` and
        ``draw``; ``None`` where no plate names an axis) and, for posterior sites, the
        ``draw_shape`` of one draw."""
        sites: dict[str, dict[str, Any]] = {}
        for name, info in self._sites.items():
            named = any(dim != f"{name}_dim_{i}" for i, dim in enumerate(info.dims))
            sites[name] = {"kind": info.kind, "dims": list(info.dims) if named else None}
        for name, draws in (self._posterior or {}).items():
            entry = sites.setdefault(name, {"kind": "latent", "dims": None})
            entry["draw_shape"] = [int(n) for n in np.shape(draws)[1:]]
        return {
            "kernel": getattr(self._kernel, "__name__", type(self._kernel).__name__),
            "arguments": list(inspect.signature(self._kernel).parameters),
            "param_input": self._param_input,
            "param_output": self._param_output,
            "inference": type(self._inference).__name__,
            "fitted": self._is_fitted,
            "num_chains": self._num_chains,
            "num_samples": self._num_samples,
            "sites": sites,
        }

    def __str__(self) -> str:
        lines = [
            "<ImpactModel>",
            f"Kernel: {getattr(self._kernel, '__name__', type(self._kernel).__name__)}",
            f"Inference method: {type(self._inference).__name__}",
            f"Input parameter: {self._param_input!r}",
            f"Output parameter: {self._param_output!r}",
            f"Fitted: {self._is_fitted}",
        ]
        if self.temp_dir:
            lines.append(f"Temporary directory: {self.temp_dir}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"<ImpactModel kernel_name={getattr(self._kernel, '__name__', type(self._kernel).__name__)}; "
            f"rng_key_data={np.asarray(jax.random.key_data(self._rng_key)).tolist()}; "
            f"inference_method={type(self._inference).__name__}; param_input={self._param_input!r}; "
            f"param_output={self._param_output!r}; kernel_spec={self._kernel_spec!r}; fitted={self._is_fitted}; "
            f"temp_dir={self.temp_dir!r}>"
        )

    # -- pickling ------------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """The model's state with keys as their data and arrays on the host; the mesh, the
        scratch directory, the last Trainer and compiled code stay behind."""
        runtime = {"mesh", "trainer", "_scratch", "_predictor", "_svi_update"}
        state = {k: v for k, v in self.__dict__.items() if k not in runtime}
        state["_devices"] = None if self._devices is None or isinstance(self._devices, int) else len(self._devices)
        return jax.tree.map(_to_host, state, is_leaf=_is_array)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(jax.tree.map(_from_host, state, is_leaf=lambda x: isinstance(x, _HostKey)))
        self._start_runtime()

    # -- helpers -------------------------------------------------------------------------------

    def _posterior_predictive(
        self,
        method: str,
        X: Any,
        kwargs: dict[str, Any],
        *,
        intervention: Mapping[str, Any] | None,
        condition: Mapping[str, Any] | None,
        rng_key: jax.Array | None,
        in_sample: bool,
        return_sites: str | Iterable[str] | None,
        shard_axis: str,
        batch_size: int | None,
        store: str,
        output_dir: str | os.PathLike[str] | None,
        progress: bool,
        loaders: bool = True,
    ) -> xr.DataTree:
        self._require_fitted(method)
        _check_store(shard_axis, store, output_dir)
        if condition is not None and not isinstance(condition, Mapping):
            raise KernelArgumentError(
                f"condition must map site names to values; got {type(condition).__name__} (a kernel argument named "
                "'condition' has to be renamed)."
            )
        rows, whole, loader = self._inputs(method, X, None, kwargs, need_output=False, loaders=loaders)
        predictor = self._predictor_for(whole, condition)
        tree = predictor.predict(
            rows,
            batch_size=self._batch(batch_size, loader, rows),
            output_dir=output_dir,
            intervention=intervention,
            return_sites=_site_names("return_sites", return_sites),
            in_sample=in_sample,
            progress=progress,
            rng_key=self._next_key(rng_key),
        )
        return self._finish(tree, store, shard_axis)

    def _prior_predictive(
        self,
        method: str,
        X: Any,
        kwargs: dict[str, Any],
        *,
        intervention: Mapping[str, Any] | None,
        num_samples: int,
        rng_key: jax.Array | None,
        return_sites: str | Iterable[str] | None,
        shard_axis: str,
        batch_size: int | None,
        store: str,
        output_dir: str | os.PathLike[str] | None,
        progress: bool,
        loaders: bool = True,
    ) -> xr.DataTree:
        _check_store(shard_axis, store, output_dir)
        rows, whole, loader = self._inputs(method, X, None, kwargs, need_output=False, loaders=loaders)
        predictor = Predictor(
            self._kernel, None, mesh=self.mesh, scratch=self._scratch, static_kwargs=self._static_kwargs(whole)
        )
        tree = predictor.sample_prior_predictive(
            rows,
            num_samples=num_samples,
            batch_size=self._batch(batch_size, loader, rows),
            output_dir=output_dir,
            return_sites=_site_names("return_sites", return_sites),
            progress=progress,
            intervention=intervention,
            rng_key=self._next_key(rng_key),
        )
        return self._finish(tree, store, shard_axis)

    def _finish(self, tree: xr.DataTree, store: str, shard_axis: str) -> xr.DataTree:
        """The tree as the caller asked for it: lazy on its store (``artifact_path`` set), or
        loaded into memory with the store removed."""
        path = tree.attrs["store_path"]
        tree.attrs["shard_axis"] = shard_axis
        if store == "persistent":
            tree.attrs["artifact_path"] = path
            return tree
        loaded = tree.load()
        del loaded.attrs["store_path"]
        shutil.rmtree(path, ignore_errors=True)
        return loaded

    def _predictor_for(self, whole: Mapping[str, Any], condition: Mapping[str, Any] | None) -> Predictor:
        """The Predictor of the posterior: one kept for plain calls, a new one for calls with
        arguments passed whole or a condition (they change the program)."""
        if not whole and not condition and self._predictor is not None:
            return self._predictor
        kernel = self._kernel
        if condition:
            kernel = functools.wraps(self._kernel)(functools.partial(handlers.condition(self._kernel, condition)))
        assert self._posterior is not None
        posterior = {
            k: np.asarray(v).reshape(self._num_chains, -1, *np.shape(v)[1:]) for k, v in self._posterior.items()
        }
        guided = self._fitted_params is not None and isinstance(self._inference, SVI)
        predictor = Predictor(
            kernel,
            posterior,
            mesh=self.mesh,
            scratch=self._scratch,
            guide=self._inference.guide if guided else None,
            params=self._fitted_params if guided else None,
            static_kwargs=self._static_kwargs(whole),
            batch_ndims=2,
        )
        if not whole and not condition:
            self._predictor = predictor
        return predictor

    def _inputs(
        self,
        method: str,
        X: Any,
        y: Any,
        kwargs: Mapping[str, Any],
        *,
        need_output: bool,
        loaders: bool = True,
    ) -> tuple[dict[str, Any], dict[str, Any], ArrayLoader | None]:
        """``(rows, whole, loader)``: the kernel's row arrays (``X``, ``y`` and keyword arrays
        of one row per observation), its other arguments, and the loader ``X`` came as."""
        reserved = sorted({self._param_input, self._param_output} & set(kwargs))
        if reserved:
            raise KernelArgumentError(
                f"{method}: {reserved} are set by the method (the kernel's input and output); pass the input as X"
                + (" and the output as y." if need_output else ".")
            )
        parameters = model_parameters(self._kernel).names
        if unknown := sorted(set(kwargs) - set(parameters)):
            raise KernelArgumentError(
                f"{method} got {unknown}, which are not parameters of the kernel; its parameters are "
                f"{list(parameters)}."
            )
        loader = X if isinstance(X, ArrayLoader) else None
        if loader is not None or (loaders and _is_batch_iterable(X)):
            if not loaders:
                raise ConfigurationError(f"{method} takes arrays, not a data loader; got {type(X).__name__}.")
            if y is not None:
                raise KernelArgumentError(f"{method}: y must be None when X is a data loader (it carries the output).")
            arrays = dict(loader.dataset.arrays) if loader is not None else read_batches(X, f"{method}: X")
            if self._param_input not in arrays:
                raise DataError(f"{method}: the data loader has no field {self._param_input!r} (the kernel's input).")
            if need_output and self._param_output not in arrays:
                raise DataError(f"{method}: the data loader has no field {self._param_output!r} (the output).")
            X, y = arrays.pop(self._param_input), arrays.pop(self._param_output, None)
            kwargs = {**arrays, **kwargs}
        # A lazy source (zarr, memmap, ...: aimz_trainer.data) stays unread: fit and predict read it by rows.
        X = _array_or_source(X, f"{method}: X")
        if len(X.shape) == 0:
            raise DataError(f"{method}: X must have one row per observation; got a scalar.")
        if X.shape[0] == 0:
            raise DataError(f"{method}: X has no rows.")
        if need_output and y is None:
            raise DataError(f"{method}: y is required when X is an array (or pass a data loader that carries it).")
        rows = {self._param_input: X}
        if y is not None:
            y = _array_or_source(y, f"{method}: y")
            if len(y.shape) == 0 or y.shape[0] != X.shape[0]:
                raise DataError(f"{method}: y has shape {y.shape}; X has {X.shape[0]} rows and y needs as many.")
            rows[self._param_output] = y
        whole = {}
        for name, value in kwargs.items():
            in_rows = isinstance(value, jax.Array | np.ndarray) or is_lazy_source(value)
            if in_rows and len(value.shape) and value.shape[0] == X.shape[0]:
                rows[name] = value
            else:
                whole[name] = value
        labels = {self._param_input: f"X ({self._param_input!r})", self._param_output: f"y ({self._param_output!r})"}
        for name, value in [*rows.items(), *whole.items()]:
            if isinstance(value, jax.Array | np.ndarray) and value.dtype.kind not in "biufc":
                raise DataError(
                    f"{method}: {labels.get(name, repr(name))} has dtype {value.dtype}; the kernel's arrays must hold "
                    "numbers."
                )
        return rows, whole, loader

    def _split_fit_kwargs(self, kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """``fit``'s extra keywords, sorted into Trainer arguments, Trainer.fit arguments and
        the kernel's arguments (the rest, checked by :meth:`_inputs`)."""
        trainer = set(inspect.signature(Trainer.__init__).parameters) - _SET_BY_FIT
        fit = set(inspect.signature(Trainer.fit).parameters) - _SET_BY_FIT
        kernel = set(model_parameters(self._kernel).names)
        pick = lambda names: {k: v for k, v in kwargs.items() if k in names and k not in kernel}  # noqa: E731
        trainer_kwargs, fit_kwargs = pick(trainer), pick(fit)
        return trainer_kwargs, fit_kwargs, {k: v for k, v in kwargs.items() if k not in trainer_kwargs | fit_kwargs}

    def _svi(self, whole: Mapping[str, Any]) -> SVI:
        """The SVI, with the kernel's whole-passed arguments as static arguments when any."""
        svi = self._inference
        assert isinstance(svi, SVI)
        if not whole:
            return svi
        return SVI(svi.model, svi.guide, svi.optim, svi.loss, **{**svi.static_kwargs, **whole})

    def _static_kwargs(self, whole: Mapping[str, Any]) -> dict[str, Any]:
        static = dict(self._inference.static_kwargs) if isinstance(self._inference, SVI) else {}
        return {**static, **whole}

    def _trace(self, kwargs: Mapping[str, Any], *, with_output: bool) -> None:
        spec, sites = trace_kernel(
            self._kernel, {**self._static_kwargs({}), **kwargs}, self._param_output, with_output=with_output
        )
        self._kernel_spec = merge_specs(self._kernel_spec, spec)
        self._sites.update(sites)

    def _latent_sites(self) -> list[str]:
        return [n for n, info in self._sites.items() if info.kind == "latent"]

    def _next_key(self, rng_key: jax.Array | None) -> jax.Array:
        if rng_key is not None:
            return as_key(rng_key)
        self._rng_key, key = jax.random.split(self._rng_key)
        return key

    def _batch(self, batch_size: int | None, loader: ArrayLoader | None, rows: Mapping[str, Any] | None = None) -> int:
        if loader is not None:
            return loader.batch_size
        if batch_size is not None:
            return batch_size
        return DEFAULT_BATCH_SIZE if rows is None else min(DEFAULT_BATCH_SIZE, len(next(iter(rows.values()))))

    def _params_of(self, state: SVIState) -> dict[str, Any]:
        svi = self._inference
        assert isinstance(svi, SVI)
        if svi.constrain_fn is None:
            svi.init(jax.random.key(0), **self._guide_kwargs)
        return svi.get_params(state)

    def _require_fitted(self, method: str) -> None:
        if not self._is_fitted:
            raise NotFittedError(
                f"{method} needs a fitted model: call fit(X, y) or fit_on_batch(X, y), or set_posterior_sample(...), "
                "first."
            )


def _check_store(shard_axis: str, store: str, output_dir: Any) -> None:
    require_choice("shard_axis", shard_axis, ("obs", "draw"))
    require_choice("store", store, ("persistent", "memory"))
    if store == "memory" and output_dir is not None:
        raise ConfigurationError(
            f"output_dir must be None with store='memory' (nothing is written); got {output_dir!r}."
        )


def _site_names(name: str, sites: str | Iterable[str] | None) -> list[str] | None:
    if sites is None:
        return None
    names = [sites] if isinstance(sites, str) else list(sites)
    if not all(isinstance(n, str) for n in names):
        raise ConfigurationError(f"{name} must be a site name or names; got {sites!r}.")
    return names


def _is_batch_iterable(X: Any) -> bool:
    """A data loader: an iterable that is not array-like (no shape, not a list of numbers)."""
    if isinstance(X, jax.Array | np.ndarray | str | bytes | Mapping) or hasattr(X, "__array__"):
        return False
    if isinstance(X, list | tuple):
        return bool(X) and isinstance(X[0], Mapping)
    return isinstance(X, Iterable)


def _flat_draws(tree: xr.DataTree, group: str) -> dict[str, np.ndarray]:
    """A group's sites as arrays of ``(draws, ...)``, the chains stacked chain by chain."""
    return {name: np.asarray(values).reshape(-1, *values.shape[2:]) for name, values in tree[group].data_vars.items()}


def _draws_dataset(draws: Mapping[str, np.ndarray], num_chains: int) -> xr.Dataset:
    variables = {}
    for name, value in draws.items():
        value = value.reshape(num_chains, -1, *value.shape[1:])
        dims = ("chain", "draw", *(f"{name}_dim_{i}" for i in range(value.ndim - 2)))
        variables[name] = xr.DataArray(
            value, dims=dims, coords={d: np.arange(n) for d, n in zip(dims, value.shape, strict=True)}
        )
    return xr.Dataset(variables)


class _HostKey:
    """A typed key as its data and implementation name (typed keys do not pickle)."""

    def __init__(self, key: jax.Array) -> None:
        self.data = np.asarray(jax.random.key_data(key))
        self.impl = str(jax.random.key_impl(key))


def _is_array(value: Any) -> bool:
    return isinstance(value, jax.Array)


def _to_host(value: Any) -> Any:
    if isinstance(value, jax.Array):
        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            return _HostKey(value)
        return np.asarray(value)
    return value


def _from_host(value: Any) -> Any:
    if isinstance(value, _HostKey):
        return jax.random.wrap_key_data(value.data, impl=value.impl)
    return value


def _array_or_source(value: Any, what: str) -> Any:
    """``value`` as it is when an array or a lazy source (read by rows later), else as a NumPy
    array; a :class:`DataError` naming ``what`` when it is not one (ragged nested lists)."""
    if isinstance(value, jax.Array | np.ndarray) or is_lazy_source(value):
        return value
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as error:
        raise DataError(f"{what} is not an array with one row per observation ({error}).") from error
