"""The Predictor: posterior-predictive, prior-predictive, log-likelihood and intervention draws,
computed batch by batch on the mesh and streamed into Zarr.

Each batch of rows runs through one compiled function: rows split over the mesh's ``"data"``
axis, the posterior replicated, the draws processed ``draws_per_chunk`` at a time (a
``lax.map`` over chunks, ``vmap`` inside) so device memory stays bounded; the last batch is
padded to the same shape, so one compile serves every batch. A writer thread
(:class:`~aimz_trainer.store.ZarrStore`) writes batch b while the devices compute batch b+1.

Random numbers: the rows are cut into fixed blocks of ``rows_per_key`` rows and draw ``s`` of
block ``k`` runs the model as ``seed(substitute(model, draw s), fold_in(fold_in(rng_key, s), k))``
(the draw's values substituted under the seed, whose key goes to the sites still to draw). The
draws therefore do not depend on ``batch_size`` nor on the device count, and two predictions
with the same ``rng_key`` (a baseline and an intervention) use the same random numbers, so
their difference carries no sampling noise of its own. Any PRNG implementation works
(``jax.random.key(0, impl="rbg")``); measured on a 2-core CPU (1e8 Bernoulli draws),
threefry took 0.28 s and ``rbg`` / ``unsafe_rbg`` 0.68-0.69 s, so the default stays.

Several processes (``jax.distributed``, see :mod:`aimz_trainer.distributed`): every process
passes the same ``data``; each batch's rows are split over the devices of every process, and
each process writes its own contiguous part of every batch (its devices' rows, taken from its
shards of the result, nothing gathered) into one store in ``output_dir``, which every process
must reach (a shared file system). The store's chunks are then ``batch / process count`` rows,
one per process and batch, so no chunk has two writers; its values equal a single-process
prediction's. Process 0 chooses the store's name and tells the others, creates the store and
writes the posterior and observed data; after the last batch the processes agree whether every
one wrote all its rows, and only then does process 0 mark the store complete. A failed write in
one process makes :meth:`Predictor.predict` raise in every process (the failing one its own
error, the others :class:`~aimz_trainer.errors.StoreError`) and leaves the store incomplete.
``output_dir=None`` (a scratch directory of each process) and ``resume=True`` (N writers do
not record their progress batch by batch) raise :class:`~aimz_trainer.errors.ConfigurationError`
there.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import xarray as xr
import zarr
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.infer.util import log_likelihood as numpyro_log_likelihood
from tqdm.auto import tqdm

from aimz_trainer._checks import as_key, check_model_accepts, is_int_at_least, model_parameters, require_bool
from aimz_trainer._version import library_version
from aimz_trainer.callbacks.progress import progress_bar_wanted
from aimz_trainer.data import digest_rows, nonfinite, require_finite_rows, validate_data
from aimz_trainer.distributed import allgather_json, require_agreement
from aimz_trainer.errors import ConfigurationError, DataError, NonFinitePredictionError, StoreError
from aimz_trainer.plates import ModelLayout, model_layout, on_rows
from aimz_trainer.sharding import DATA_AXIS, batch_sharding, make_mesh, replicated, to_global_array
from aimz_trainer.step import guide_draw, guide_on_rows
from aimz_trainer.store import COMPLETE, FINGERPRINT, ArraySpec, ScratchDirectory, ZarrStore, open_store

__all__ = ["DEFAULT_BATCH_SIZE", "Predictor"]

DEFAULT_BATCH_SIZE = 100_000  # rows per compiled call and per Zarr chunk

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
        draws_per_chunk: draws computed together per tile of rows; ``None`` (default) picks
            about 20,000 rows x draws per step, which keeps a 32-wide layer's activations in
            cache (measured on CPU: one draw at a time over 10,000 rows beats 10 or 50 at a time).
        rows_per_tile: rows per device computed for every draw before the next rows (a
            multiple of ``rows_per_key`` dividing the batch's rows per device); default: the
            largest such tile up to 10,000 rows. With 100,000-row batches on CPU, tiles of
            10,000 rows were 16% faster than the whole batch per draw (its inputs no longer fit
            in cache).
        rows_per_key: rows sharing one random key; batches are rounded up to a multiple of it
            times the device count. Data of fewer rows are one block of that many rows.
        scratch: where stores written without ``output_dir`` go; several Predictors may share
            one (:class:`~aimz_trainer.store.ScratchDirectory`); default: a new one.
        compress_floats: compress float sites (``p``) with Blosc-lz4. Default: integer sites
            are compressed (Blosc-zstd), float sites written as they are: probabilities
            compress only ~1.2x and compressing them cost the computation beside the writer
            0.5 s per 100,000 rows x 1,000 draws on 2 CPU cores (uncompressed: 0.1 s).

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
    ) -> None:
        if not callable(model):
            raise ConfigurationError(f"model must be a NumPyro model (a callable); got {type(model).__name__}.")
        if posterior is not None and (not isinstance(posterior, Mapping) or not posterior):
            raise ConfigurationError("posterior must map site names to draws with a leading draw axis, or be None.")
        try:
            posterior = {name: np.asarray(value) for name, value in (posterior or {}).items()}
        except (TypeError, ValueError) as error:  # ragged lists: draws of different shapes
            raise ConfigurationError(f"posterior must map site names to arrays of draws ({error}).") from error
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
            batch_size: rows per compiled call and per Zarr chunk (with N processes, each
                batch is N chunks: one per process).
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
        """
        require_bool("in_sample", in_sample)
        group = "posterior_predictive" if in_sample else "predictions"
        return self._run(
            data, batch_size, output_dir, intervention, return_sites, group, resume, "predictive", progress=progress
        )

    def sample_prior_predictive(
        self,
        data: Mapping[str, Any],
        *,
        num_samples: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        output_dir: str | os.PathLike[str] | None = None,
        return_sites: str | Sequence[str] | None = None,
        progress: bool = False,
    ) -> xr.DataTree:
        """Draws from the prior predictive (groups ``prior`` and ``prior_predictive``), streamed
        like :meth:`predict`. The global latent sites are drawn once per draw from the prior
        (default: as many draws as the posterior has); sites inside the rows' plate are drawn
        row by row."""
        num_samples = self.num_samples if num_samples is None else num_samples
        if num_samples is None:
            raise ConfigurationError("num_samples is needed: this Predictor has no posterior to take it from.")
        if not is_int_at_least(num_samples, 1):
            raise ConfigurationError(f"num_samples must be a positive int; got {num_samples!r}.")
        _check_request(batch_size, output_dir, None, return_sites, False, progress)
        arrays, num_rows = self._model_data(data)
        optional = model_parameters(self.model).optional  # targets such as y=None: not conditioned on
        probe = {k: np.asarray(v[: min(num_rows, self.rows_per_key)]) for k, v in arrays.items() if k not in optional}
        layout = model_layout(self._model, probe, batch_rows=self.rows_per_key, name="data")
        prior_key = jax.random.fold_in(self.rng_key, _PRIOR_STREAM)
        prior = _prior_draws(self._model, probe, layout.global_sites, prior_key, num_samples)
        return self._run(
            data, batch_size, output_dir, None, return_sites, "prior_predictive", False, "predictive", prior, "prior",
            progress=progress,
        )  # fmt: skip

    def log_likelihood(
        self,
        data: Mapping[str, Any],
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        output_dir: str | os.PathLike[str] | None = None,
        progress: bool = False,
    ) -> xr.DataTree:
        """Pointwise log-likelihood of the observed sites in ``data`` under each posterior draw
        (group ``log_likelihood``, for LOO with arviz). Per-row latent sites are drawn from
        the fitted guide, as in an in-sample :meth:`predict`."""
        return self._run(
            data, batch_size, output_dir, None, None, "log_likelihood", False, "log_likelihood", progress=progress
        )

    def cleanup(self) -> None:
        """Remove the scratch directory of stores written without ``output_dir`` (also done
        when the Predictor is garbage-collected and at interpreter exit)."""
        self._scratch.cleanup()

    # -- the pipeline --------------------------------------------------------------------------

    def _run(
        self,
        data: Mapping[str, Any],
        batch_size: int,
        output_dir: str | os.PathLike[str] | None,
        intervention: Mapping[str, Any] | None,
        return_sites: str | Sequence[str] | None,
        group: str,
        resume: bool,
        kind: str,
        draws: Mapping[str, np.ndarray] | None = None,
        draws_group: str = "posterior",
        *,
        progress: bool = False,
    ) -> xr.DataTree:
        _check_request(batch_size, output_dir, intervention, return_sites, resume, progress)
        if draws is None and not self.posterior:
            raise ConfigurationError(
                "this Predictor has no posterior (posterior=None): only sample_prior_predictive can run."
            )
        processes = jax.process_count()
        if processes > 1 and output_dir is None:
            raise ConfigurationError(
                f"this run has {processes} processes, which write one store together: pass output_dir, a directory "
                "every process reaches (output_dir=None would give each process a scratch directory of its own)."
            )
        if processes > 1 and resume:
            raise ConfigurationError(
                f"resume=True is not supported with {processes} processes (their progress is not recorded batch by "
                "batch): delete the interrupted store and predict again."
            )
        arrays, num_rows = self._model_data(data)
        draws = self.posterior if draws is None else draws
        num_samples = len(next(iter(draws.values())))
        # Fewer rows than a key's block are one block of that many (no padding to compute).
        rows_per_key = min(self.rows_per_key, num_rows)
        block = rows_per_key * self.mesh.size
        batch = math.ceil(min(batch_size, num_rows) / block) * block
        first_row, last_row = _process_rows(self.mesh, batch)  # this process's rows of every batch
        probe = {key: np.asarray(value[:rows_per_key]) for key, value in arrays.items()}
        layout = model_layout(self._model, arrays, batch_rows=rows_per_key, name="data")
        sites = _trace_sites(self._model, probe)
        constants, row_values = _split_intervention(intervention or {}, sites, layout.global_sites, num_rows)
        samples = [n for n, s in sites.items() if s["type"] == "sample"]
        problems = []
        if unknown := sorted(set(draws) - set(sites)):
            problems.append(f"{unknown} are not sites of the model")
        if missing := sorted(set(layout.global_sites) - set(draws) - set(intervention or {})):
            problems.append(f"the model's latent site(s) {missing} have no draws")
        if problems:
            raise ConfigurationError(
                f"the {draws_group} draws do not fit the model: {'; '.join(problems)}. The draws are of "
                f"{sorted(draws)}; the model's global latent sites are {sorted(layout.global_sites)}."
            )
        latent = {n: v for n, v in draws.items() if n in samples}
        # Values of a site the model takes as an optional argument (``y=None``) are targets:
        # written to observed_data, not conditioned on. Required arguments stay inputs.
        optional = model_parameters(self.model).optional
        observed_data = {n: arrays.pop(n) for n in list(arrays) if n in samples and n not in latent and n in optional}
        observed = [n for n in samples if n not in latent and n not in arrays and n not in (intervention or {})]
        if kind == "log_likelihood":
            outputs = [n for n in samples if n not in latent and (n in observed_data or sites[n]["is_observed"])]
            if not outputs:
                raise DataError(
                    f"log_likelihood needs the observed values in data: add {observed} (the model's observed sites)."
                )
        else:
            defaults = observed + [n for n, s in sites.items() if s["type"] == "deterministic"]
            if isinstance(return_sites, str):  # one site
                return_sites = [return_sites]
            outputs = defaults if return_sites is None else list(return_sites)
            unknown = sorted(set(outputs) - set(sites))
            if unknown:
                raise ConfigurationError(
                    f"return_sites {unknown} are not sites of the model; its sites are {sorted(sites)}."
                )
            given = sorted(set(outputs) & set(latent))
            if given:
                raise ConfigurationError(
                    f"return_sites {given} are posterior draws, not predictions: they are written to the "
                    f"{draws_group!r} group already."
                )
        in_sample = draws_group == "posterior" and group != "predictions"
        # Targets (``y=None``) are observed in training: never the guide's to draw.
        not_guided = {*latent, *(intervention or {}), *(n for n in samples if n in optional)}
        local = self._local_draws(layout, not_guided, num_rows) if in_sample else None
        guide_params = self.params if local is not None else {}
        # Predictions are not conditioned on the observed values; the log-likelihood is.
        model_inputs = {**arrays, **(observed_data if kind == "log_likelihood" else {})}
        model_inputs.update({DO_PREFIX + name: value for name, value in row_values.items()})
        if self.check_finite:  # the data were checked as they came in (_model_data)
            _require_finite("intervention", row_values, per_row=True)
            _require_finite("intervention", constants, per_row=False)
            _require_finite(draws_group, latent, per_row=False)
        rows_per_tile = _tile_rows(batch // self.mesh.size, rows_per_key, self.rows_per_tile)
        draws_per_chunk = self.draws_per_chunk or max(1, 20_000 // rows_per_tile)
        make_step = functools.partial(
            _make_step, self._model, outputs, kind, rows_per_key, draws_per_chunk, num_samples, rows_per_tile,
            self.mesh.size, local, self.check_finite,
        )  # fmt: skip
        shapes = _output_shapes(
            make_step(), latent, model_inputs, constants, guide_params, outputs, rows_per_key,
            {} if kind == "log_likelihood" else sites,  # densities keep their dtype, whatever the support
        )  # fmt: skip
        dtypes = {name: dtype for name, (_, dtype) in shapes.items()}
        # Constant intervention values are arguments, not part of the program: a baseline and
        # an intervention (t = 0, t = 1) share one compiled function.
        constant_shapes = {name: f"{value.shape}{value.dtype}" for name, value in constants.items()}
        signature = (
            outputs, kind, batch, sorted(model_inputs), constant_shapes, num_samples, local and local.sites,
            self.check_finite,
        )  # fmt: skip
        step = self._compiled_step(make_step(dtypes), signature)
        specs = [
            ArraySpec(group, name, (1, num_samples, num_rows, *shape[1:]), dtype, (
                "chain", "draw", *_dims(sites[name], name, len(shape)),
            ), 2)
            for name, (shape, dtype) in shapes.items()
        ]  # fmt: skip
        specs += [
            ArraySpec(
                draws_group,
                name,
                (1, *value.shape),
                value.dtype,
                ("chain", "draw", *_extra_dims(name, value.ndim - 1)),
                None,
            )
            for name, value in latent.items()
        ]
        specs += [
            ArraySpec(
                "observed_data", name, value.shape, np.asarray(value).dtype, _dims(sites[name], name, value.ndim), None
            )
            for name, value in observed_data.items()
        ]
        fingerprint = _fingerprint(
            self.rng_key, latent, arrays, intervention or {}, outputs, group, rows_per_key, _KEY_SCHEME,
            guide_params,
        )  # fmt: skip
        if processes > 1:  # each writes its share of every batch: they must all compute the same
            require_agreement(
                {"rows": num_rows, "batch_size": batch, "computation": fingerprint[:12]},
                "data, posterior, keys or settings to predict",
                "Give every process the same Predictor (posterior, rng_key, rows_per_key) and the same predict "
                "arguments.",
            )
        path = self._store_path(output_dir, resume)
        attrs = {
            "created_at": datetime.datetime.now(datetime.UTC).isoformat(),
            "store_path": str(path),
            "aimz_trainer_version": library_version(),
            "intervention": json.dumps(_jsonable(intervention or {})),
            "rows_per_key": rows_per_key,
            "rng_key": np.asarray(jax.random.key_data(self.rng_key)).tolist(),
            "num_rows": num_rows,
            FINGERPRINT: fingerprint,
        }
        # Small and rewritten on resume too: an interruption may have come before them.
        whole = {(draws_group, n): v[None] for n, v in latent.items()}
        whole.update({("observed_data", n): np.asarray(v) for n, v in observed_data.items()})
        store = _open_shared_store(path, specs, batch, attrs, resume, whole, self.compress_floats)
        failure: BaseException | None = None  # a failed write, with several processes
        try:
            rep = replicated(self.mesh)
            latent_device = jax.device_put(latent, rep)
            constants_device = jax.device_put(constants, rep)
            guide_params_device = jax.device_put(guide_params, rep)
            bar = tqdm(
                total=num_rows, initial=store.rows_written, unit="row", desc=group,
                disable=not (progress and progress_bar_wanted()) or jax.process_index() != 0,
            )  # fmt: skip

            def write(start: int, stop: int, result: Draws, nonfinite: Draws) -> None:
                nonlocal failure
                bad = {name: int(count) for name, count in nonfinite.items() if int(count)}
                if bad:  # every process has the whole batch's counts: all of them stop here
                    raise NonFinitePredictionError((start, stop), bad, str(path))
                begin, end = start + first_row, min(start + last_row, stop)
                if end > begin and failure is None:
                    try:
                        store.write_batch(begin, end, {(group, n): _rows(result[n], end - begin) for n in outputs})
                    except Exception as error:
                        if processes == 1:
                            raise
                        # Keep computing: the other processes wait for this one in every step.
                        failure = error

            # A batch is checked and written once the next one is dispatched: reading its counts
            # then waits for a batch the devices have finished, never for the one they compute.
            previous: tuple[int, int, Draws, Draws] | None = None
            for start in range(store.rows_written, num_rows, batch):
                stop = min(start + batch, num_rows)
                inputs = {k: _padded(np.asarray(v[start:stop]), batch) for k, v in model_inputs.items()}
                inputs = {k: to_global_array(v, batch_sharding(self.mesh), v.shape) for k, v in inputs.items()}
                block0 = jnp.asarray(start // rows_per_key, jnp.uint32)
                result, nonfinite = step(
                    latent_device, inputs, self.rng_key, block0, constants_device, guide_params_device
                )
                if processes > 1:  # this process's shards: (draws, last_row - first_row) on its devices
                    result = multihost_utils.global_array_to_host_local_array(
                        result, self.mesh, _out_sharding(self.mesh).spec
                    )
                if previous is not None:
                    write(*previous)
                previous = (start, stop, result, nonfinite)
                bar.update(stop - start)
            if previous is not None:
                write(*previous)
            bar.close()
            _finalize_shared_store(store, failure)
        except BaseException:
            store.abort()
            raise
        tree = open_store(path)
        # A store in the scratch directory lives as long as the Predictor: the tree keeps it.
        tree._aimz_owner = self  # type: ignore[attr-defined]
        return tree

    def _local_draws(self, layout: ModelLayout, not_guided: set[str], num_rows: int) -> _LocalDraws | None:
        """For an in-sample run: the per-row latent sites to draw from the guide (``None`` when
        the model has none but ``not_guided``), after checking that ``data`` can be the fit's
        rows."""
        # Per-row sites of a plate that is not subsampled are drawn by the model, as any
        # other predicted site: a guide's parameters for them would not belong to rows.
        unindexed = [s for s in layout.unindexed_local if s not in not_guided]
        if self.guide is not None and unindexed:
            raise ConfigurationError(
                f"the per-row latent site(s) {unindexed} sit in a plate that is not subsampled, so the guide's "
                "parameters for them do not belong to rows of the data: write the plate as "
                "plate(name, n, subsample_size=len(x)), or predict(..., in_sample=False) to draw them from the prior."
            )
        sites = tuple(s for s in layout.local_sites if s not in not_guided and s not in unindexed)
        if not sites:
            return None
        if self.guide is None:
            raise ConfigurationError(
                f"the model's per-row latent site(s) {list(sites)} have no posterior draws: in sample they are drawn "
                "row by row from the fitted guide, so pass guide=svi.guide and params=FitResult.params to the "
                "Predictor; for new rows, predict(..., in_sample=False) draws them from the prior."
            )
        mismatched = {name: size for name, size in layout.plate_sizes.items() if size != num_rows}
        if mismatched:
            raise ConfigurationError(
                f"in-sample draws of the per-row latent site(s) {list(sites)} come from the fitted guide, row by row, "
                f"so data must be the fit's rows in their order; data has {num_rows} rows but the plate(s) "
                f"{mismatched} have other sizes. For new rows pass in_sample=False (their latents are then drawn "
                "from the prior)."
            )
        return _LocalDraws(self.guide, sites, self.static_kwargs)

    def _model_data(self, data: Any) -> tuple[dict[str, Any], int]:
        """``data``'s arrays and row count, checked to be finite (with ``check_finite``) arrays
        of rows the model takes, before the model first runs on them."""
        arrays, num_rows = validate_data(data, name="data")
        if self.check_finite:
            _require_finite("data", arrays, per_row=True)
        check_model_accepts(self._model, list(arrays), name="data")
        return arrays, num_rows

    def _store_path(self, output_dir: str | os.PathLike[str] | None, resume: bool) -> Path:
        parent = Path(output_dir) if output_dir is not None else self._scratch.path
        if resume:
            candidates = sorted(p for p in parent.glob("predict-*") if p.is_dir())
            incomplete = [p for p in candidates if not zarr.open_group(p, mode="r").attrs.get(COMPLETE, True)]
            if not incomplete:
                raise ConfigurationError(f"resume=True but {str(parent)!r} holds no interrupted store.")
            return incomplete[-1]
        parent.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S%f")
        return parent / str(allgather_json(f"predict-{stamp}")[0])  # process 0's name in every process

    def _compiled_step(self, step: Callable[..., tuple[Draws, Draws]], signature: Any) -> Any:
        """``step`` jitted with the batch shardings; cached by ``signature``."""
        key = json.dumps([str(part) if isinstance(part, str) else _jsonable_part(part) for part in signature])
        if key not in self._compiled:
            rep, rows = replicated(self.mesh), batch_sharding(self.mesh)

            def with_chain_axis(*args: Any) -> tuple[Draws, Draws]:  # the store's layout, free on the devices
                values, counts = step(*args)
                return {name: value[None] for name, value in values.items()}, counts

            self._compiled[key] = jax.jit(
                with_chain_axis,
                in_shardings=(rep, rows, rep, rep, rep, rep),
                out_shardings=(_out_sharding(self.mesh), rep),  # the counts: the whole batch's, in every process
            )
        return self._compiled[key]


def _process_rows(mesh: Mesh, batch: int) -> tuple[int, int]:
    """``(first, last)``: the rows of every ``batch``-row batch this process's devices hold (all
    of them in a single-process run)."""
    if jax.process_count() == 1:
        return 0, batch
    indices = batch_sharding(mesh).addressable_devices_indices_map((batch,)).values()
    spans = sorted({index[0].indices(batch)[:2] for index in indices})
    expected = batch // jax.process_count()
    held = sum(stop - start for start, stop in spans)  # the devices' parts are disjoint
    if not spans or held != expected or spans[-1][1] - spans[0][0] != expected:
        raise ConfigurationError(
            f"with {jax.process_count()} processes each must hold one contiguous part of {expected} rows of every "
            f"{batch}-row batch; this one holds the rows {spans}. Use a mesh of the same number of devices of every "
            "process, grouped by process: make_mesh() (every device) is one."
        )
    return spans[0][0], spans[-1][1]


def _failed_processes(ok: bool) -> list[int]:
    """The processes that passed ``ok=False`` (a collective: every process calls it)."""
    return [index for index, flag in enumerate(allgather_json(ok)) if not flag]


def _open_shared_store(
    path: Path,
    specs: Sequence[ArraySpec],
    batch: int,
    attrs: Mapping[str, Any],
    resume: bool,
    whole: Mapping[tuple[str, str], Any],
    compress_floats: bool,
) -> ZarrStore:
    """The store (created, or resumed by a single process) with the arrays written whole.
    With several processes, process 0 creates it and the others open it once it exists; every
    process raises when one of them could not."""
    processes, index = jax.process_count(), jax.process_index()
    if processes == 1:
        store = ZarrStore(path, specs, batch_size=batch, attrs=attrs, resume=resume, compress_floats=compress_floats)
        try:
            store.write_whole(whole)
        except BaseException:
            store.abort()
            raise
        return store
    store, error = None, None
    if index == 0:
        try:
            store = ZarrStore(
                path, specs, batch_size=batch, attrs=attrs, writers=processes, compress_floats=compress_floats
            )
            store.write_whole(whole)
        except Exception as caught:
            error = caught
    if _failed_processes(error is None):  # also the barrier: the store exists after it
        if store is not None:
            store.abort()
        raise error or StoreError(f"process 0 could not create the store {str(path)!r}; see its error.")
    if index != 0:
        try:
            store = ZarrStore(path, specs, batch_size=batch, writers=processes, join=True)
        except Exception as caught:
            error = caught
    failed = _failed_processes(error is None)
    if failed:
        if store is not None:
            store.abort()
        raise error or StoreError(
            f"process(es) {failed} could not open the store {str(path)!r} that process 0 created: output_dir "
            "must be a directory every process reaches (a shared file system)."
        )
    assert store is not None
    return store


def _finalize_shared_store(store: ZarrStore, failure: BaseException | None) -> None:
    """Mark the store complete (process 0), once every process has written all its rows; in
    every process, return only when the store is complete."""
    if jax.process_count() == 1:
        store.finalize()
        return
    try:
        store.flush()
    except Exception as error:
        failure = failure or error
    failed = _failed_processes(failure is None)
    if failed:
        raise failure or StoreError(
            f"process(es) {failed} could not write their rows of {str(store.path)!r}; it stays incomplete."
        )
    if jax.process_index() == 0:
        try:
            store.finalize()
        except Exception as error:
            failure = error
    if _failed_processes(failure is None):  # also the barrier: the store is complete after it
        raise failure or StoreError(f"process 0 could not mark {str(store.path)!r} complete; see its error.")


class _LocalDraws(NamedTuple):
    """Per-row latent sites drawn from the fitted guide inside the predictive step."""

    guide: Callable[..., Any]
    sites: tuple[str, ...]
    static_kwargs: Mapping[str, Any]


def _make_step(
    model: Callable[..., Any],
    outputs: list[str],
    kind: str,
    rows_per_key: int,
    draws_per_chunk: int,
    num_samples: int,
    rows_per_tile: int,
    shards: int,
    local: _LocalDraws | None,
    check_finite: bool,
    dtypes: Mapping[str, np.dtype] | None = None,
) -> Callable[..., tuple[Draws, Draws]]:
    """``step(latent, inputs, rng_key, first_block, constants, guide_params) -> ({site: (draws,
    rows, ...)}, {site: count})``; inputs named ``DO_PREFIX + site`` are row-wise intervention
    values, ``constants`` the others. Every subsampled plate holds the block's dataset rows; with
    ``local``, each draw's per-row latent sites come from the guide (``guide_params``) on those
    rows, given the draw's global sites, under a key of their own. The counts are the batch's
    non-finite values per site (:func:`_nonfinite`; empty unless ``check_finite``). ``dtypes``:
    the sites' output dtypes (default: the model's)."""
    dtypes = dtypes or {}

    def one_draw_one_block(
        theta: Draws,
        block_inputs: Mapping[str, jax.Array],
        key: jax.Array,
        rows: jax.Array,
        constants: Draws,
        guide_params: Draws,
    ) -> tuple[Draws, Draws]:
        interventions = {k[len(DO_PREFIX) :]: v for k, v in block_inputs.items() if k.startswith(DO_PREFIX)}
        interventions.update(constants)
        block_inputs = {k: v for k, v in block_inputs.items() if not k.startswith(DO_PREFIX)}
        if local is not None:
            with guide_on_rows(local.guide, rows) as guide:
                guide_key = jax.random.fold_in(key, _GUIDE_STREAM)
                drawn = guide_draw(guide, guide_key, {**guide_params, **theta}, {**block_inputs, **local.static_kwargs})
            theta = {**theta, **{name: drawn[name] for name in local.sites}}
        intervened = handlers.do(model, data=interventions) if interventions else model
        intervened = on_rows(intervened, rows)
        if kind == "log_likelihood":
            values = numpyro_log_likelihood(
                handlers.seed(intervened, key), {k: v[None] for k, v in theta.items()}, **block_inputs
            )
            densities = {name: values[name][0] for name in outputs}
            # -inf is a density's true value (an impossible observation); NaN and +inf are not.
            bad = {name: jnp.isnan(v) | (v == jnp.inf) for name, v in densities.items()} if check_finite else {}
            return densities, {name: jnp.sum(b, dtype=jnp.int32) for name, b in bad.items()}
        # The draw's values are substituted inside the seed: the seed then splits keys only for
        # the sites still to draw, not for every latent site (fewer small ops per step).
        conditioned = handlers.seed(handlers.substitute(intervened, data=theta), key)
        trace = handlers.trace(conditioned).get_trace(**block_inputs)
        counts = {name: _nonfinite(trace[name]) for name in outputs} if check_finite else {}
        return {name: trace[name]["value"] for name in outputs}, counts

    def one_tile(
        latent: Draws,
        inputs: Mapping[str, jax.Array],
        rng_key: jax.Array,
        first_block: jax.Array,
        blocks_in_batch: jax.Array,
        constants: Draws,
        guide_params: Draws,
    ) -> Draws:
        rows = jax.tree.leaves(inputs)[0].shape[0]
        blocked = {k: v.reshape(rows // rows_per_key, rows_per_key, *v.shape[1:]) for k, v in inputs.items()}
        block_ids = first_block + blocks_in_batch.astype(jnp.uint32)
        # Each block's dataset rows (those of the batch's padding point past the data).
        block_rows = block_ids.astype(jnp.int32)[:, None] * rows_per_key + jnp.arange(rows_per_key, dtype=jnp.int32)
        # Every (draw, block) key at once, before the loop: one vectorised hash instead of two
        # small ones in every iteration.
        keys = jax.vmap(
            lambda draw: jax.vmap(lambda block: jax.random.fold_in(jax.random.fold_in(rng_key, draw), block))(block_ids)
        )(jnp.arange(num_samples, dtype=jnp.uint32))

        def one_draw(args: tuple[Draws, jax.Array]) -> tuple[Draws, Draws]:
            theta, keys = args
            per_block, counts = jax.vmap(one_draw_one_block, in_axes=(None, 0, 0, 0, None, None))(
                theta, blocked, keys, block_rows, constants, guide_params
            )
            # Cast here, chunk by chunk: a cast after the map would write and read every draw
            # in the wide dtype once more.
            values = {k: v.reshape(rows, *v.shape[2:]).astype(dtypes.get(k, v.dtype)) for k, v in per_block.items()}
            return values, {k: jnp.sum(v) for k, v in counts.items()}

        values, counts = lax.map(one_draw, (latent, keys), batch_size=min(draws_per_chunk, num_samples))
        return values, {k: jnp.sum(v) for k, v in counts.items()}

    def step(
        latent: Draws,
        inputs: Mapping[str, jax.Array],
        rng_key: jax.Array,
        first_block: jax.Array,
        constants: Draws,
        guide_params: Draws,
    ) -> tuple[Draws, Draws]:
        rows = jax.tree.leaves(inputs)[0].shape[0]
        tiles = rows // shards // rows_per_tile  # per shard
        if tiles <= 1:
            blocks = jnp.arange(rows // rows_per_key)
            return one_tile(latent, inputs, rng_key, first_block, blocks, constants, guide_params)

        # Every draw of one tile of rows, then the next tile: a tile's inputs and activations
        # stay in cache across the draws instead of the whole batch streaming from memory once
        # per draw. Each shard's rows (the mesh splits rows into `shards` contiguous parts) are
        # cut into `tiles` tiles; tile t gathers the t-th tile of every shard, so the shards
        # stay split over the devices.
        def by_tile(v: jax.Array) -> jax.Array:
            return jnp.moveaxis(v.reshape(shards, tiles, rows_per_tile, *v.shape[1:]), 1, 0)

        tiled = {k: by_tile(v).reshape(tiles, shards * rows_per_tile, *v.shape[1:]) for k, v in inputs.items()}
        blocks = jnp.arange(rows // rows_per_key).reshape(shards, tiles, rows_per_tile // rows_per_key)
        tile_blocks = jnp.moveaxis(blocks, 1, 0).reshape(tiles, -1)
        out, counts = lax.map(
            lambda a: one_tile(latent, a[0], rng_key, first_block, a[1], constants, guide_params), (tiled, tile_blocks)
        )
        values = {
            k: jnp.moveaxis(v.reshape(tiles, num_samples, shards, rows_per_tile, *v.shape[3:]), 0, 2).reshape(
                num_samples, rows, *v.shape[3:]
            )
            for k, v in out.items()
        }
        return values, {k: jnp.sum(v) for k, v in counts.items()}

    return step


def _nonfinite(site: Mapping[str, Any]) -> jax.Array:
    """How many of a traced site's values are NaN or infinite; for a discrete sample site, how
    many were drawn from NaN parameters (``Bernoulli(NaN)`` draws a plausible 0, whose
    log-density is NaN)."""
    value = site["value"]
    if jnp.issubdtype(value.dtype, jnp.inexact):
        return jnp.sum(~jnp.isfinite(value), dtype=jnp.int32)
    if site["type"] == "sample":
        return jnp.sum(jnp.isnan(site["fn"].log_prob(value)), dtype=jnp.int32)
    return jnp.zeros((), jnp.int32)


def _tile_rows(rows_per_device: int, rows_per_key: int, requested: int | None) -> int:
    """The largest multiple of ``rows_per_key`` that divides ``rows_per_device`` and is at most
    ``requested`` (default 10,000) rows, and at least one block."""
    blocks = rows_per_device // rows_per_key
    limit = max((requested or 10_000) // rows_per_key, 1)
    return max(b for b in range(1, min(blocks, limit) + 1) if blocks % b == 0) * rows_per_key


def _out_sharding(mesh: Mesh) -> NamedSharding:
    """Chain x draws x rows: the rows stay split over the ``"data"`` axis."""
    return NamedSharding(mesh, P(None, None, DATA_AXIS))


DO_PREFIX = "__do__:"
_PRIOR_STREAM = 0x7072696F  # the prior draws' key: fold_in(rng_key, "prio")
_GUIDE_STREAM = 0x6775696465 & 0xFFFFFFFF  # a block's per-row guide draws: fold_in(its key, "guide")
# How keys become draws (the module docstring); part of a store's fingerprint, so a store
# begun under another scheme is not resumed into a mix of two.
_KEY_SCHEME = 2


def _prior_draws(
    model: Callable[..., Any], probe: Mapping[str, Any], sites: Sequence[str], rng_key: jax.Array, num_samples: int
) -> Draws:
    """Prior draws of the model's global latent ``sites`` (per-row sites are drawn row by row
    in the step)."""

    def one(key: jax.Array) -> Draws:
        trace = handlers.trace(handlers.seed(on_rows(model), key)).get_trace(**probe)
        return {name: trace[name]["value"] for name in sites}

    return {k: np.asarray(v) for k, v in jax.jit(jax.vmap(one))(jax.random.split(rng_key, num_samples)).items()}


def _split_intervention(
    intervention: Mapping[str, Any], sites: Mapping[str, Any], global_sites: Sequence[str], num_rows: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(constants, row-wise values)``. A value is constant when it is a scalar, has the
    site's event shape, or (a global site) the site's whole shape; it is row-wise when it has
    one entry per row (of the site's event shape). Anything else is refused: broadcast against
    blocks of rows, it would be applied to the wrong rows."""
    samples = sorted(n for n, s in sites.items() if s["type"] == "sample")
    unknown = sorted(set(intervention) - set(samples))
    if unknown:
        raise ConfigurationError(
            f"intervention names {unknown}, which are not sample sites of the model; its sample sites are {samples}."
        )
    constants, rows = {}, {}
    for name, value in intervention.items():
        value = np.asarray(value)
        if value.dtype.kind not in "biuf":
            raise ConfigurationError(f"intervention[{name!r}] must hold numbers; got {value!r}.")
        event = tuple(sites[name]["fn"].event_shape)
        constant_shapes = {(), event} | ({tuple(np.shape(sites[name]["value"]))} if name in global_sites else set())
        if value.shape in constant_shapes:
            constants[name] = value
        elif value.shape == (num_rows, *event):
            rows[name] = value
        else:
            raise ConfigurationError(
                f"intervention[{name!r}] has shape {value.shape}; accepted: a constant of shape "
                f"{' or '.join(map(str, sorted(constant_shapes)))}, or one value per row, of shape "
                f"{(num_rows, *event)} (the data have {num_rows} rows)."
            )
    return constants, rows


def _require_finite(what: str, arrays: Mapping[str, Any], *, per_row: bool) -> None:
    """Raise :class:`DataError` at the first NaN or infinity in a float array, naming where it
    is: it would turn every prediction it touches into NaN, and a Bernoulli draw of a NaN
    probability into a 0 that looks like data."""
    advice = (
        "predictions would be NaN there. Remove or fill them, or pass check_finite=False to the Predictor to let "
        "NaN propagate."
    )
    if per_row:
        require_finite_rows(what, arrays, advice)
        return
    for name, value in arrays.items():
        if (found := nonfinite(value)) is not None:
            index, count = found
            where = f"draw {index[0]}" if what != "intervention" else f"index {index}"
            raise DataError(
                f"{what}[{name!r}] holds {np.asarray(value)[index]} at {where} ({count} non-finite value(s) in all): "
                + advice
            )


def _check_request(
    batch_size: Any, output_dir: Any, intervention: Any, return_sites: Any, resume: Any, progress: Any
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


def _fingerprint(rng_key: jax.Array, *parts: Any) -> str:
    """A digest of what decides a store's values: the key, the draws, the settings, and the
    inputs (:func:`~aimz_trainer.data.digest_rows`)."""
    digest = hashlib.sha256(np.asarray(jax.random.key_data(rng_key)).tobytes())
    for part in parts:
        digest_rows(digest, part if isinstance(part, Mapping) else {"": part})
    return digest.hexdigest()


def _jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: np.asarray(v).tolist() for k, v in values.items()}


def _jsonable_part(part: Any) -> Any:
    if isinstance(part, Mapping):
        return _jsonable(part)
    return list(part) if isinstance(part, list | tuple) else part


def _trace_sites(model: Callable[..., Any], probe: Mapping[str, Any]) -> dict[str, Any]:
    """The model's sample and deterministic sites, from one run on a small batch."""
    with handlers.trace() as trace, handlers.seed(rng_seed=0):
        on_rows(model)(**probe)
    return {name: site for name, site in trace.items() if site["type"] in ("sample", "deterministic")}


def _output_shapes(
    step: Any,
    latent: Draws,
    inputs: Mapping[str, Any],
    constants: Mapping[str, Any],
    guide_params: Mapping[str, Any],
    outputs: list[str],
    rows_per_key: int,
    sites: Mapping[str, Any],
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{site: (shape of one draw over rows_per_key rows, compact dtype)}``, without compiling."""
    rows = {k: _padded(np.asarray(v[:rows_per_key]), rows_per_key) for k, v in inputs.items()}
    one = jax.ShapeDtypeStruct((), jnp.uint32)
    shapes, _ = jax.eval_shape(step, latent, rows, jax.random.key(0), one, constants, guide_params)
    return {name: (shapes[name].shape[1:], _compact_dtype(shapes[name].dtype, sites.get(name))) for name in outputs}


def _compact_dtype(dtype: Any, site: Mapping[str, Any] | None) -> np.dtype:
    """The smallest dtype that holds the site's drawn values unchanged: a Bernoulli or
    Categorical site with few classes needs no int32. For draws only, never densities."""
    dtype = np.dtype(dtype)
    support = getattr(site.get("fn"), "support", None) if site else None
    if support is constraints.boolean:
        return np.dtype(np.int8)
    upper = getattr(support, "upper_bound", None)
    lower = getattr(support, "lower_bound", None)
    if dtype.kind in "iu" and upper is not None and lower is not None and np.ndim(upper) == 0:
        for small in (np.int8, np.int16):
            if np.iinfo(small).min <= int(lower) and int(upper) <= np.iinfo(small).max:
                return np.dtype(small)
    return dtype


def _dims(site: Mapping[str, Any], name: str, ndim: int) -> tuple[str, ...]:
    """Dim names of a site's value: its plates' names where they apply, else ``<site>_dim_i``.
    A plate's ``dim`` counts from the right of the batch shape, left of the event dims."""
    names = [f"{name}_dim_{i}" for i in range(ndim)]
    event_dim = getattr(site.get("fn"), "event_dim", 0)
    for frame in site.get("cond_indep_stack", ()):
        axis = ndim - event_dim + frame.dim if frame.dim < 0 else frame.dim
        if 0 <= axis < ndim:
            names[axis] = frame.name
    return tuple(names)


def _extra_dims(name: str, ndim: int) -> tuple[str, ...]:
    return tuple(f"{name}_dim_{i}" for i in range(ndim))


def _padded(array: np.ndarray, rows: int) -> np.ndarray:
    if array.shape[0] == rows:
        return array
    padding = np.repeat(array[-1:], rows - array.shape[0], axis=0)
    return np.concatenate([array, padding])


def _rows(values: jax.Array, count: int) -> jax.Array:
    """The first ``count`` rows (the last batch's padding cut off; no copy of a whole batch)."""
    return values if values.shape[2] == count else values[:, :, :count]
