"""The Predictor: posterior-predictive, prior-predictive, log-likelihood and intervention draws,
computed batch by batch on the mesh and streamed into Zarr.

Each batch of rows runs through one compiled forward (:mod:`aimz_trainer.forward`): rows
split over the mesh's ``"data"`` axis, the posterior replicated, the work cut into tiles of
``rows_per_tile`` rows per device by ``draws_per_chunk`` draws, computed one after the other so
device memory stays bounded; the last batch is padded to the same shape, so one compile serves
every batch. A writer thread (:class:`~aimz_trainer.store.ZarrStore`) writes batch b while the
devices compute batch b+1.

The tree is what ``arviz.from_numpyro`` gives (ArviZ 1.3): the outputs in
``posterior_predictive``, ``predictions``, ``prior_predictive`` or ``log_likelihood``, the draws
in ``posterior`` or ``prior`` with the model's global deterministic sites (computed from each
draw; per-row deterministic sites are outputs), the targets in ``observed_data``; an ``int64``
coordinate on every dim and ArviZ's attributes on every group (``created_at``,
``creation_library``, ``inference_library``, their versions, ``sample_dims``); the root group
holds the store's own attributes.

Random numbers: the rows are cut into fixed key blocks of ``rows_per_key`` rows and draw ``s``
of key block ``k`` runs the model as ``seed(substitute(model, draw s), fold_in(fold_in(rng_key,
s), k))`` (the draw's values substituted under the seed, whose key goes to the sites still to
draw). The draws therefore do not depend on ``batch_size`` nor on the device count, and two
predictions with the same ``rng_key`` (a baseline and an intervention) use the same random
numbers, so their difference carries no sampling noise of its own. Any PRNG implementation
works (``jax.random.key(0, impl="rbg")``).

Several processes (``jax.distributed``, see :mod:`aimz_trainer.distributed`): every process
passes the same ``data``; each batch's rows are split over the devices of every process, and
each process writes its own contiguous part of every batch (its devices' rows, taken from its
shards of the result, nothing gathered) into one store in ``output_dir``, which every process
must reach (a shared file system). The store's blocks are then ``batch / process count`` rows,
one per process and batch, so no block has two writers; its values equal a single-process
prediction's. Process 0 names and creates the store and marks it complete once every process
has written all its rows (:func:`~aimz_trainer.store.open_shared_store`,
:func:`~aimz_trainer.store.finalize_shared_store`). A failed write in one process makes
:meth:`Predictor.predict` raise in every process (the failing one its own error, the others
:class:`~aimz_trainer.errors.StoreError`) and leaves the store incomplete. ``output_dir=None``
(a scratch directory of each process) and ``resume=True`` (N writers do not record their
progress batch by batch) raise :class:`~aimz_trainer.errors.ConfigurationError` there.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import xarray as xr
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from aimz_trainer._checks import as_key, check_model_accepts, is_int_at_least, model_parameters, require_bool
from aimz_trainer._version import library_version
from aimz_trainer.callbacks.progress import progress_bar_wanted
from aimz_trainer.compilation_cache import CompilationCache, use_compilation_cache
from aimz_trainer.data import is_lazy_source, read_ahead, require_finite_read, samples_read_once, validate_data
from aimz_trainer.distributed import require_agreement
from aimz_trainer.errors import ConfigurationError, NonFinitePredictionError
from aimz_trainer.forward import Mode, make_forward, prior_draws
from aimz_trainer.plates import model_layout
from aimz_trainer.prediction_plan import (
    NONFINITE_PREDICTIONS,
    PredictionPlan,
    batch_rows,
    make_plan,
    padded,
    require_finite,
)
from aimz_trainer.scratch import ScratchDirectory
from aimz_trainer.sharding import DATA_AXIS, batch_sharding, make_mesh, replicated, to_global_array
from aimz_trainer.store import (
    FINGERPRINT,
    choose_store_path,
    finalize_shared_store,
    open_shared_store,
    process_rows,
    require_shareable,
)
from aimz_trainer.store_reading import Chunks, check_chunks, open_store

__all__ = ["DEFAULT_BATCH_SIZE", "Predictor"]

use_compilation_cache()  # from the import on: see aimz_trainer.compilation_cache

DEFAULT_BATCH_SIZE = 100_000  # rows per compiled call and per Zarr block

Draws = dict[str, jax.Array]


class Predictor:
    """Streams predictive draws of a NumPyro model into Zarr and returns an ``xarray.DataTree``.

    Args:
        model: the NumPyro model (the same callable the SVI was built with).
        posterior: site -> draws with a leading draw axis, e.g. ``FitResult.posterior``;
            deterministic sites in it (computed on the guide's prototype batch) are ignored.
            ``None``: a Predictor for :meth:`sample_prior_predictive` only.
        check_finite: refuse NaN or infinite values in the data, interventions and posterior
            draws (:class:`~aimz_trainer.errors.DataError` naming the first), before anything
            is computed, and in what the model computes from them, batch by batch
            (:class:`~aimz_trainer.errors.NonFinitePredictionError`; the store keeps the
            batches before and stays incomplete); ``False`` lets them propagate into the
            predictions.
        guide: the fitted guide (``svi.guide``), with ``params``: where the model has per-row
            latent sites (inside its subsampled data plate), in-sample predictions and
            log-likelihoods draw each row's latents from it, row by row (see :meth:`predict`).
        params: the guide's constrained parameters (``FitResult.params``).
        static_kwargs: keyword arguments the model (and guide) take on every call and that are
            not rows, as given to ``SVI(model, guide, optim, loss, **static_kwargs)``: e.g.
            ``{"num_groups": 12}``.
        mesh: the device mesh (share the trainer's: ``trainer.mesh``); default: all devices.
        rng_key: the key of every random draw (see the module docstring).
        draws_per_chunk: the draws of a tile, computed together over its rows; ``None``
            (default): about 20,000 rows x draws per tile.
        rows_per_tile: the rows per device of a tile, computed for every draw before the next
            tile's rows (a multiple of ``rows_per_key`` dividing the batch's rows per device);
            default: the largest such tile up to 10,000 rows.
        rows_per_key: rows sharing one random key (a key block); batches are rounded up to a
            multiple of it times the device count. Data of fewer rows are one key block of that
            many rows.
        scratch: where stores written without ``output_dir`` go; several Predictors may share
            one (:class:`~aimz_trainer.scratch.ScratchDirectory`); default: a new one.
        batch_ndims: the leading axes of the posterior's draws: ``1`` (draws), or ``2``
            (chains, draws), as ``mcmc.get_samples(group_by_chain=True)`` gives them; the
            stores then keep the chains along ``chain``.
        compress_floats: compress float sites (``p``) with Blosc-lz4. Default: integer sites
            are compressed (Blosc-zstd), float sites written as they are: probabilities hardly
            compress, and compressing them takes CPU from the computation beside the writer.
        compilation_cache: keep compiled programs on disk for the next process (see
            :mod:`aimz_trainer.compilation_cache`): ``True`` (default) in this user's cache
            directory (or where ``AIMZ_TRAINER_COMPILATION_CACHE`` says), ``False`` none from
            here on, or a directory. Importing this class already turned the environment's
            choice on (``AIMZ_TRAINER_COMPILATION_CACHE=0`` keeps the whole process off it). A
            cache set through JAX (``JAX_COMPILATION_CACHE_DIR``) wins.

    Example:
        >>> import jax, numpy as np, numpyro, numpyro.distributions as dist
        >>> def model(x, y=None):
        ...     w = numpyro.sample("w", dist.Normal())
        ...     with numpyro.plate("obs", x.shape[0]):
        ...         numpyro.sample("y", dist.Normal(w * x, 1.0), obs=y)
        >>> predictor = Predictor(model, {"w": np.linspace(1, 2, 8)}, rng_key=jax.random.key(0))
        >>> dt = predictor.predict({"x": np.arange(5.0)}, batch_size=1000)
        >>> dt["posterior_predictive"]["y"].shape
        (1, 8, 5)
        >>> predictor.cleanup()
    """

    def __init__(
        self,
        model: Callable[..., Any],
        posterior: Mapping[str, Any] | None,
        *,
        mesh: Mesh | None = None,
        rng_key: jax.Array | None = None,
        draws_per_chunk: int | None = None,
        rows_per_key: int = 1000,
        rows_per_tile: int | None = None,
        scratch: ScratchDirectory | None = None,
        compress_floats: bool = False,
        check_finite: bool = True,
        guide: Callable[..., Any] | None = None,
        params: Mapping[str, Any] | None = None,
        static_kwargs: Mapping[str, Any] | None = None,
        batch_ndims: int = 1,
        compilation_cache: CompilationCache = True,
    ) -> None:
        use_compilation_cache(compilation_cache)
        if not callable(model):
            raise ConfigurationError(f"model must be a NumPyro model (a callable); got {type(model).__name__}.")
        if posterior is not None and (not isinstance(posterior, Mapping) or not posterior):
            raise ConfigurationError("posterior must map site names to draws with a leading draw axis, or be None.")
        try:
            posterior = {name: np.asarray(value) for name, value in (posterior or {}).items()}
        except (TypeError, ValueError) as error:  # ragged lists: draws of different shapes
            raise ConfigurationError(f"posterior must map site names to arrays of draws ({error}).") from error
        if batch_ndims not in (1, 2) or isinstance(batch_ndims, bool):
            raise ConfigurationError(f"batch_ndims must be 1 (draws) or 2 (chains, draws); got {batch_ndims!r}.")
        chains = {name: np.shape(value)[:1] for name, value in posterior.items()} if batch_ndims == 2 else {}
        if batch_ndims == 2 and (len(set(chains.values())) > 1 or min(map(np.ndim, posterior.values())) < 2):
            raise ConfigurationError(
                f"with batch_ndims=2 every posterior array must be (chains, draws, ...) with one chain count; got "
                f"shapes { ({name: np.shape(value) for name, value in posterior.items()}) }."
            )
        self.num_chains = int(next(iter(chains.values()))[0]) if chains else 1
        posterior = {name: value.reshape(-1, *value.shape[batch_ndims:]) for name, value in posterior.items()}
        sizes = {name: int(np.shape(value)[0]) if np.ndim(value) else -1 for name, value in posterior.items()}
        if len(set(sizes.values())) > 1 or -1 in sizes.values():
            raise ConfigurationError(f"posterior draws must share one leading draw axis; got sizes {sizes}.")
        for name, value in [
            ("draws_per_chunk", draws_per_chunk),
            ("rows_per_key", rows_per_key),
            ("rows_per_tile", rows_per_tile),
        ]:
            if value is not None and not is_int_at_least(value, 1):
                raise ConfigurationError(f"{name} must be a positive int; got {value!r}.")
        if (guide is None) != (params is None):
            raise ConfigurationError("pass guide and params together (svi.guide and FitResult.params), or neither.")
        if guide is not None and not callable(guide):
            raise ConfigurationError(f"guide must be a NumPyro guide (a callable); got {type(guide).__name__}.")
        if params is not None and not isinstance(params, Mapping):
            raise ConfigurationError(f"params must map parameter names to arrays; got {type(params).__name__}.")
        if static_kwargs is not None and not isinstance(static_kwargs, Mapping):
            raise ConfigurationError(
                f"static_kwargs must map the model's keyword names to values; got {type(static_kwargs).__name__}."
            )
        self.model = model
        self.guide = guide
        self.params = dict(params) if params is not None else None
        self.static_kwargs = dict(static_kwargs or {})
        # What the pipeline runs: the model with its static arguments bound.
        self._model = functools.partial(model, **self.static_kwargs) if self.static_kwargs else model
        self.posterior = posterior
        for name, value in self.posterior.items():
            if value.dtype.kind not in "biuf":
                raise ConfigurationError(f"posterior[{name!r}] must hold numbers; got dtype {value.dtype}.")
        self.num_samples: int | None = next(iter(sizes.values()), None)
        if mesh is not None and (not isinstance(mesh, Mesh) or mesh.axis_names != (DATA_AXIS,)):
            raise ConfigurationError(
                f"mesh must be a jax.sharding.Mesh with the single axis {DATA_AXIS!r}; got {mesh!r}."
            )
        self.mesh = mesh if mesh is not None else make_mesh()
        # Any PRNG implementation works; the default stays threefry: on a 2-core CPU it drew 1e8
        # Bernoulli values in 0.28 s, rbg and unsafe_rbg in 0.68-0.69 s.
        self.rng_key = jax.random.key(0) if rng_key is None else as_key(rng_key)
        self.draws_per_chunk = draws_per_chunk
        self.rows_per_key = rows_per_key
        if rows_per_tile is not None and rows_per_tile % rows_per_key:
            raise ConfigurationError(
                f"rows_per_tile must be a multiple of rows_per_key={rows_per_key}; got {rows_per_tile}."
            )
        self.rows_per_tile = rows_per_tile
        require_bool("compress_floats", compress_floats)
        require_bool("check_finite", check_finite)
        self.compress_floats = compress_floats
        self.check_finite = check_finite
        self._scratch = scratch if scratch is not None else ScratchDirectory()
        self._compiled: dict[Any, Any] = {}

    # -- public API ----------------------------------------------------------------------------

    def predict(
        self,
        data: Mapping[str, Any],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        output_dir: str | os.PathLike[str] | None = None,
        intervention: Mapping[str, Any] | None = None,
        return_sites: str | Sequence[str] | None = None,
        in_sample: bool = True,
        resume: bool = False,
        progress: bool = False,
        rng_key: jax.Array | None = None,
        chunks: Chunks = None,
    ) -> xr.DataTree:
        """Posterior-predictive draws for ``data``, written to Zarr, opened as a DataTree.

        Per-row latent sites (inside the model's subsampled data plate) have no posterior
        draws of their own. In sample (``in_sample=True``) they are drawn from the fitted guide
        (``guide`` and ``params``), row by row, so ``data`` must be the fit's rows in their
        order; out of sample (``in_sample=False``, new rows) they are drawn from the prior,
        given each draw of the global sites.

        Args:
            data: the model's keyword inputs, one row per observation; an observed site's
                values (e.g. ``y``) may be included: they go to ``observed_data`` and are not
                conditioned on.
            batch_size: rows per compiled call and per Zarr block (with N processes, each
                batch is N blocks: one per process).
            output_dir: a directory in which a timestamped store is created (never removed by
                us); ``None``: this Predictor's scratch directory (see :meth:`cleanup`). A
                multi-process run needs one that every process reaches.
            intervention: ``{site: value}`` applied with ``numpyro.handlers.do``.
            return_sites: a site or sites to write (default: observed and deterministic sites).
            in_sample: ``data`` are the fit's rows (group ``posterior_predictive``); else new
                rows (group ``predictions``).
            resume: continue the newest interrupted store in ``output_dir`` (single-process
                runs only).
            progress: show a bar of the batches written (on a terminal, ``CI`` unset).
            rng_key: the key of this call's draws (default: the Predictor's ``rng_key``, so
                every call shares its random numbers).
            chunks: ``None`` (default): the tree's variables are xarray's lazy arrays; ``{}``
                (or any dask chunks): dask arrays, one chunk per store block, for reductions
                over stores larger than memory (see
                :func:`~aimz_trainer.store_reading.open_store`).
        """
        require_bool("in_sample", in_sample)
        _check_request(
            batch_size=batch_size, output_dir=output_dir, intervention=intervention, return_sites=return_sites,
            resume=resume, progress=progress, chunks=chunks,
        )  # fmt: skip
        self._require_posterior()
        require_shareable(output_dir, resume)
        group = "posterior_predictive" if in_sample else "predictions"
        with samples_read_once():  # the checks and the store's fingerprint share one read of a source's sample
            arrays, num_rows = self._model_data(data)
            plan = self._plan(
                arrays, num_rows, batch_size, mode=Mode.DRAWS, group=group, draws=self.posterior,
                draws_group="posterior", in_sample=in_sample, intervention=intervention, return_sites=return_sites,
                rng_key=rng_key,
            )  # fmt: skip
        return self._stream(plan, output_dir=output_dir, resume=resume, progress=progress, chunks=chunks)

    def sample_prior_predictive(
        self,
        data: Mapping[str, Any],
        *,
        num_samples: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        output_dir: str | os.PathLike[str] | None = None,
        return_sites: str | Sequence[str] | None = None,
        progress: bool = False,
        intervention: Mapping[str, Any] | None = None,
        rng_key: jax.Array | None = None,
        chunks: Chunks = None,
    ) -> xr.DataTree:
        """Draws from the prior predictive (groups ``prior`` and ``prior_predictive``), streamed
        like :meth:`predict`. The global latent sites are drawn once per draw from the prior
        (default: as many draws as the posterior has); sites inside the rows' plate are drawn
        row by row. ``intervention``, ``rng_key`` and ``chunks`` as in :meth:`predict`."""
        num_samples = self.num_samples if num_samples is None else num_samples
        if num_samples is None:
            raise ConfigurationError("num_samples is needed: this Predictor has no posterior to take it from.")
        if not is_int_at_least(num_samples, 1):
            raise ConfigurationError(f"num_samples must be a positive int; got {num_samples!r}.")
        _check_request(
            batch_size=batch_size, output_dir=output_dir, intervention=intervention, return_sites=return_sites,
            progress=progress, chunks=chunks,
        )  # fmt: skip
        key = self.rng_key if rng_key is None else as_key(rng_key)
        arrays, num_rows = self._model_data(data)
        optional = model_parameters(self.model).optional  # targets such as y=None: not conditioned on
        probe = {k: np.asarray(v[: min(num_rows, self.rows_per_key)]) for k, v in arrays.items() if k not in optional}
        layout = model_layout(self._model, probe, batch_rows=self.rows_per_key, name="data")
        prior = prior_draws(self._model, probe, layout.global_sites, key, num_samples)
        require_shareable(output_dir, False)
        plan = self._plan(
            arrays, num_rows, batch_size, mode=Mode.DRAWS, group="prior_predictive", draws=prior, draws_group="prior",
            in_sample=False, intervention=intervention, return_sites=return_sites, rng_key=key, num_chains=1,
        )  # fmt: skip
        return self._stream(plan, output_dir=output_dir, resume=False, progress=progress, chunks=chunks)

    def log_likelihood(
        self,
        data: Mapping[str, Any],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        output_dir: str | os.PathLike[str] | None = None,
        progress: bool = False,
        rng_key: jax.Array | None = None,
        chunks: Chunks = None,
    ) -> xr.DataTree:
        """Pointwise log-likelihood of the observed sites in ``data`` under each posterior draw
        (group ``log_likelihood``, for LOO with arviz). Per-row latent sites are drawn from
        the fitted guide, as in an in-sample :meth:`predict`; ``rng_key`` and ``chunks`` as
        there."""
        _check_request(batch_size=batch_size, output_dir=output_dir, progress=progress, chunks=chunks)
        self._require_posterior()
        require_shareable(output_dir, False)
        arrays, num_rows = self._model_data(data)
        plan = self._plan(
            arrays, num_rows, batch_size, mode=Mode.LOG_LIKELIHOOD, group="log_likelihood", draws=self.posterior,
            draws_group="posterior", in_sample=True, rng_key=rng_key,
        )  # fmt: skip
        return self._stream(plan, output_dir=output_dir, resume=False, progress=progress, chunks=chunks)

    def cleanup(self) -> None:
        """Remove the scratch directory of stores written without ``output_dir`` (also done
        when the Predictor is garbage-collected and at interpreter exit)."""
        self._scratch.cleanup()

    # -- the pipeline: a plan, then one streaming loop ---------------------------------------------

    def _require_posterior(self) -> None:
        if not self.posterior:
            raise ConfigurationError(
                "this Predictor has no posterior (posterior=None): only sample_prior_predictive can run."
            )

    def _model_data(self, data: Any) -> tuple[dict[str, Any], int]:
        """``data``'s arrays and row count, checked to be finite (with ``check_finite``) arrays
        of rows the model takes, before the model first runs on them."""
        arrays, num_rows = validate_data(data, name="data")
        if self.check_finite:
            require_finite("data", arrays, per_row=True)
        check_model_accepts(self._model, list(arrays), name="data")
        return arrays, num_rows

    def _plan(
        self,
        arrays: dict[str, Any],
        num_rows: int,
        batch_size: int,
        *,
        mode: Mode,
        group: str,
        draws: Mapping[str, np.ndarray],
        draws_group: str,
        in_sample: bool,
        intervention: Mapping[str, Any] | None = None,
        return_sites: str | Sequence[str] | None = None,
        rng_key: jax.Array | None = None,
        num_chains: int | None = None,
    ) -> PredictionPlan:
        """The plan of one request (see :func:`~aimz_trainer.prediction_plan.make_plan`) under this
        Predictor's model, guide, tile settings, key (unless ``rng_key``) and chains (unless
        ``num_chains``)."""
        rows_per_key, batch = batch_rows(num_rows, batch_size, self.rows_per_key, self.mesh.size)
        return make_plan(
            self._model, arrays, num_rows, mode=mode, group=group, draws=draws, draws_group=draws_group,
            intervention=intervention or {}, return_sites=return_sites, in_sample=in_sample,
            process_rows=process_rows(self.mesh, batch), optional=model_parameters(self.model).optional,
            guide=self.guide, params=self.params, static_kwargs=self.static_kwargs,
            rng_key=self.rng_key if rng_key is None else as_key(rng_key),
            num_chains=self.num_chains if num_chains is None else num_chains,
            rows_per_key=rows_per_key, batch=batch, devices=self.mesh.size, rows_per_tile=self.rows_per_tile,
            draws_per_tile=self.draws_per_chunk, check_finite=self.check_finite,
        )  # fmt: skip

    def _stream(
        self,
        plan: PredictionPlan,
        *,
        output_dir: str | os.PathLike[str] | None,
        resume: bool,
        progress: bool,
        chunks: Chunks,
    ) -> xr.DataTree:
        """Compute ``plan`` batch by batch into a new store in ``output_dir`` (or continue the
        newest interrupted one, ``resume``) and open it (with ``chunks``, see
        :func:`~aimz_trainer.store_reading.open_store`)."""
        forward = self._compiled_forward(plan)
        processes = jax.process_count()
        if processes > 1:  # each writes its share of every batch: they must all compute the same
            require_agreement(
                {"rows": plan.num_rows, "batch_size": plan.batch, "computation": plan.fingerprint[:12]},
                "data, posterior, keys or settings to predict",
                "Give every process the same Predictor (posterior, rng_key, rows_per_key) and the same predict "
                "arguments.",
            )
        path = choose_store_path(Path(output_dir) if output_dir is not None else self._scratch.path, resume=resume)
        attrs = {
            "created_at": datetime.datetime.now(datetime.UTC).isoformat(),
            "store_path": str(path),
            "aimz_trainer_version": library_version(),
            "intervention": json.dumps(_jsonable(plan.intervention)),
            "rows_per_key": plan.rows_per_key,
            "rng_key": np.asarray(jax.random.key_data(plan.rng_key)).tolist(),
            "num_rows": plan.num_rows,
            FINGERPRINT: plan.fingerprint,
        }
        # Small and rewritten on resume too: an interruption may have come before them.
        store = open_shared_store(
            path, plan.specs, plan.batch, attrs, resume, plan.whole_arrays(), self.compress_floats,
            group_attrs=_group_attrs(plan),
        )  # fmt: skip
        group, outputs, batch, num_rows = plan.group, plan.outputs, plan.batch, plan.num_rows
        failure: BaseException | None = None  # a failed write, with several processes
        try:
            rep, rows_sharding = replicated(self.mesh), batch_sharding(self.mesh)
            latent_device = jax.device_put(plan.latent, rep)
            constants_device = jax.device_put(plan.constants, rep)
            guide_params_device = jax.device_put(plan.guide_params, rep)
            bar = tqdm(
                total=num_rows, initial=store.rows_written, unit="row", desc=group,
                disable=not (progress and progress_bar_wanted()) or jax.process_index() != 0,
            )  # fmt: skip

            def write(start: int, stop: int, result: Draws, nonfinite: Draws, observed: Draws) -> None:
                nonlocal failure
                bad = {name: int(count) for name, count in nonfinite.items() if int(count)}
                if bad:  # every process has the whole batch's counts: all of them stop here
                    raise NonFinitePredictionError((start, stop), bad, str(path))
                begin, end = plan.process_span(start)
                if end > begin and failure is None:
                    rows = {(group, n): _rows(result[n], end - begin) for n in outputs}
                    rows.update({("observed_data", n): values for n, values in observed.items()})
                    try:
                        store.write_batch(begin, end, rows)
                    except Exception as error:
                        if processes == 1:
                            raise
                        # Keep computing: the other processes wait for this one in every batch.
                        failure = error

            # A batch is checked and written once the next one is dispatched: reading its counts
            # then waits for a batch the devices have finished, never for the one they compute.
            previous: tuple[int, int, Draws, Draws, Draws] | None = None
            starts = range(store.rows_written, num_rows, batch)
            read = functools.partial(_read_batch, plan, check_finite=self.check_finite)
            for start, (inputs, observed) in zip(starts, read_ahead(read, starts), strict=True):
                stop = min(start + batch, num_rows)
                inputs = {k: to_global_array(v, rows_sharding, (batch, *v.shape[1:])) for k, v in inputs.items()}
                block0 = jnp.asarray(start // plan.rows_per_key, jnp.uint32)
                result, nonfinite = forward(
                    latent_device, inputs, plan.rng_key, block0, constants_device, guide_params_device
                )
                if processes > 1:  # this process's shards: its part of the batch's rows, on its devices
                    result = multihost_utils.global_array_to_host_local_array(
                        result, self.mesh, _out_sharding(self.mesh).spec
                    )
                if previous is not None:
                    write(*previous)
                previous = (start, stop, result, nonfinite, observed)
                bar.update(stop - start)
            if previous is not None:
                write(*previous)
            bar.close()
            finalize_shared_store(store, failure)
        except BaseException:
            store.abort()
            raise
        tree = open_store(path, chunks=chunks)
        # A store in the scratch directory lives as long as the Predictor: the tree keeps it.
        tree._aimz_owner = self  # type: ignore[attr-defined]
        return tree

    def _compiled_forward(self, plan: PredictionPlan) -> Callable[..., tuple[Draws, Draws]]:
        """The plan's forward jitted with the batch shardings; cached by the plan's signature."""
        key = json.dumps([str(part) if isinstance(part, str) else _jsonable_part(part) for part in plan.signature])
        if key not in self._compiled:
            forward = make_forward(self._model, plan)
            rep, rows = replicated(self.mesh), batch_sharding(self.mesh)

            def with_chain_axis(*args: Any) -> tuple[Draws, Draws]:  # the store's layout, free on the devices
                values, counts = forward(*args)
                chains = {name: value.reshape(*plan.chain_draws, *value.shape[1:]) for name, value in values.items()}
                return chains, counts

            self._compiled[key] = jax.jit(
                with_chain_axis,
                in_shardings=(rep, rows, rep, rep, rep, rep),
                out_shardings=(_out_sharding(self.mesh), rep),  # the counts: the whole batch's, in every process
            )
        return self._compiled[key]


def _check_request(
    *,
    batch_size: Any,
    output_dir: Any,
    progress: Any,
    intervention: Any = None,
    return_sites: Any = None,
    resume: Any = False,
    chunks: Any = None,
) -> None:
    """The arguments of a prediction call that need neither the data nor the model, checked
    before anything is traced or drawn."""
    if not is_int_at_least(batch_size, 1):
        raise ConfigurationError(f"batch_size must be a positive int; got {batch_size!r}.")
    if output_dir is not None:
        if not isinstance(output_dir, str | os.PathLike) or not str(output_dir) or "\x00" in str(output_dir):
            raise ConfigurationError(f"output_dir must be a directory path or None; got {output_dir!r}.")
        path = Path(output_dir)
        existing = next(p for p in (path, *path.parents) if p.exists())  # the root exists
        if not existing.is_dir():
            raise ConfigurationError(
                f"output_dir={str(output_dir)!r} cannot be a directory: {str(existing)!r} is a file."
            )
    if intervention is not None and not isinstance(intervention, Mapping):
        raise ConfigurationError(f"intervention must map site names to values; got {intervention!r}.")
    names = [return_sites] if isinstance(return_sites, str) else return_sites
    if names is not None and not (isinstance(names, Sequence) and all(isinstance(name, str) for name in names)):
        raise ConfigurationError(f"return_sites must be a site name or a list of them; got {return_sites!r}.")
    require_bool("resume", resume)
    require_bool("progress", progress)
    check_chunks(chunks)


def _read_batch(plan: PredictionPlan, start: int, *, check_finite: bool) -> tuple[Draws, Draws]:
    """This process's rows of the batch at ``start``, read from the data (in memory or lazy
    sources, never whole): the model's inputs, padded to its share of a batch, and the observed
    values to write. Rows of a lazy source outside the sample checked up front are checked here
    (``check_finite``)."""
    begin, end = plan.process_span(start)
    first, last = plan.process_rows
    # A share of the last batch may be padding only: any real row serves as its padding.
    span = slice(begin, end) if end > begin else slice(plan.num_rows - 1, plan.num_rows)
    sources = {**plan.observed_data, **plan.model_inputs}
    rows = {name: np.asarray(source[span]) for name, source in sources.items()}
    if check_finite:
        for name, source in sources.items():
            if is_lazy_source(source):
                require_finite_read(name, rows[name], np.arange(span.start, span.stop), NONFINITE_PREDICTIONS)
    inputs = {name: padded(rows[name], last - first) for name in plan.model_inputs}
    observed = {name: rows[name] for name in plan.observed_data} if end > begin else {}
    return inputs, observed


def _group_attrs(plan: PredictionPlan) -> dict[str, dict[str, Any]]:
    """Each group's attributes, those ``arviz.from_numpyro`` gives its groups (ArviZ 1.3), with
    this library as the one that created them."""
    created = {
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(),
        "creation_library": "aimz_trainer",
        "creation_library_version": library_version(),
        "creation_library_language": "Python",
        "inference_library": "numpyro",
        "inference_library_version": numpyro.__version__,
    }
    groups = dict.fromkeys(spec.group for spec in plan.specs)
    return {g: {**created, "sample_dims": [] if g == "observed_data" else ["chain", "draw"]} for g in groups}


def _out_sharding(mesh: Mesh) -> NamedSharding:
    """Chain x draws x rows: the rows stay split over the ``"data"`` axis."""
    return NamedSharding(mesh, P(None, None, DATA_AXIS))


def _rows(values: jax.Array, count: int) -> jax.Array:
    """The first ``count`` rows (the last batch's padding cut off; no copy of a whole batch)."""
    return values if values.shape[2] == count else values[:, :, :count]


def _jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: np.asarray(v).tolist() for k, v in values.items()}


def _jsonable_part(part: Any) -> Any:
    if isinstance(part, Mapping):
        return _jsonable(part)
    return list(part) if isinstance(part, list | tuple) else part
