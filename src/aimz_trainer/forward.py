"""The forward of a prediction: the traced function that computes every draw over one batch
of rows, and the prior draws of the model's global latent sites.

:func:`make_forward` gives the forward of a plan
(:class:`~aimz_trainer.prediction_plan.PredictionPlan`), ``forward(latent, inputs, rng_key,
first_block, constants, guide_params)``: every draw over one batch of rows, predictive draws or
log-densities (:class:`Mode`). The rows are cut into key blocks of ``rows_per_key`` rows (draw
``s`` of key block ``k`` runs under ``fold_in(fold_in(rng_key, s), k)``, see
:mod:`aimz_trainer.predictor`); the work is cut into tiles of ``rows_per_tile`` rows per device
by ``draws_per_tile`` draws, computed together (``vmap``), one tile after the other
(``lax.map``), so that device memory stays bounded. Row-wise intervention values are the row
inputs named ``DO_PREFIX + site``; per-row latent sites are drawn from the fitted guide inside
the forward (:class:`LocalDraws`). The global deterministic sites are computed once per draw,
not per row (:func:`deterministic_draws`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from numpyro import handlers
from numpyro.infer.util import log_likelihood as numpyro_log_likelihood

from aimz_trainer.plates import on_rows, trace_model
from aimz_trainer.step import guide_draw, guide_on_rows

if TYPE_CHECKING:
    from aimz_trainer.prediction_plan import PredictionPlan

__all__ = ["DO_PREFIX", "LocalDraws", "Mode", "deterministic_draws", "make_forward", "prior_draws"]

Draws = dict[str, jax.Array]

DO_PREFIX = "__do__:"  # a row-wise intervention value among the forward's row inputs
_PRIOR_STREAM = 0x7072696F  # the prior draws' key: fold_in(rng_key, "prio")
_GUIDE_STREAM = 0x6775696465 & 0xFFFFFFFF  # a key block's per-row guide draws: fold_in(its key, "guide")
_DETERMINISTIC_STREAM = 0x64657465  # "dete": the key of the global deterministic sites' runs


class Mode(enum.Enum):
    """What a prediction computes at its output sites."""

    DRAWS = enum.auto()  # predictive draws (posterior or prior predictive, with an intervention or not)
    LOG_LIKELIHOOD = enum.auto()  # the observed sites' pointwise log-densities of the observed values


class LocalDraws(NamedTuple):
    """Per-row latent sites drawn from the fitted guide inside the forward."""

    guide: Callable[..., Any]
    sites: tuple[str, ...]
    static_kwargs: Mapping[str, Any]


def make_forward(model: Callable[..., Any], plan: PredictionPlan) -> Callable[..., tuple[Draws, Draws]]:
    """``forward(latent, inputs, rng_key, first_block, constants, guide_params) -> ({site:
    (draws, rows, ...)}, {site: count})``: every draw of ``plan.outputs`` over one batch of
    ``inputs`` (``plan.model_inputs``' rows; those named ``DO_PREFIX + site`` are row-wise
    intervention values, ``constants`` the others), whose first key block is ``first_block``.
    Every subsampled plate holds the key block's dataset rows; with ``plan.local``, each
    draw's per-row latent sites come from the guide (``guide_params``) on those rows, given
    the draw's global sites, under a key of their own. The counts are the batch's non-finite
    values per site (empty unless ``plan.check_finite``); the values have ``plan.dtypes`` (the
    model's where it names none)."""
    outputs, dtypes, local, check_finite = plan.outputs, plan.dtypes, plan.local, plan.check_finite
    log_densities = plan.mode is Mode.LOG_LIKELIHOOD
    rows_per_key, num_samples, rows_per_tile, draws_per_tile = (
        plan.rows_per_key, plan.num_samples, plan.rows_per_tile, plan.draws_per_tile
    )  # fmt: skip
    shards = plan.devices

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
        if log_densities:
            values = numpyro_log_likelihood(
                handlers.seed(intervened, key), {k: v[None] for k, v in theta.items()}, **block_inputs
            )
            densities = {name: values[name][0] for name in outputs}
            # -inf is a density's true value (an impossible observation); NaN and +inf are not.
            bad = {name: jnp.isnan(v) | (v == jnp.inf) for name, v in densities.items()} if check_finite else {}
            return densities, {name: jnp.sum(b, dtype=jnp.int32) for name, b in bad.items()}
        # The draw's values are substituted inside the seed: the seed then splits keys only for
        # the sites still to draw, not for every latent site (fewer small ops per forward).
        conditioned = handlers.seed(handlers.substitute(intervened, data=theta), key)
        trace = handlers.trace(conditioned).get_trace(**block_inputs)
        counts = {name: _nonfinite(trace[name]) for name in outputs} if check_finite else {}
        return {name: trace[name]["value"] for name in outputs}, counts

    def rows_of_one_tile(
        latent: Draws,
        inputs: Mapping[str, jax.Array],
        rng_key: jax.Array,
        first_block: jax.Array,
        blocks_in_batch: jax.Array,
        constants: Draws,
        guide_params: Draws,
    ) -> Draws:
        """Every draw over the rows of one tile, ``draws_per_tile`` draws at a time."""
        rows = jax.tree.leaves(inputs)[0].shape[0]
        blocked = {k: v.reshape(rows // rows_per_key, rows_per_key, *v.shape[1:]) for k, v in inputs.items()}
        block_ids = first_block + blocks_in_batch.astype(jnp.uint32)
        # Each key block's dataset rows (those of the batch's padding point past the data).
        block_rows = block_ids.astype(jnp.int32)[:, None] * rows_per_key + jnp.arange(rows_per_key, dtype=jnp.int32)
        # Every (draw, key block) key at once, before the loop: one vectorised hash instead of
        # two small ones in every iteration.
        keys = jax.vmap(
            lambda draw: jax.vmap(lambda block: jax.random.fold_in(jax.random.fold_in(rng_key, draw), block))(block_ids)
        )(jnp.arange(num_samples, dtype=jnp.uint32))

        def one_draw(args: tuple[Draws, jax.Array]) -> tuple[Draws, Draws]:
            theta, keys = args
            per_block, counts = jax.vmap(one_draw_one_block, in_axes=(None, 0, 0, 0, None, None))(
                theta, blocked, keys, block_rows, constants, guide_params
            )
            # Cast here, tile by tile: a cast after the map would write and read every draw
            # in the wide dtype once more.
            values = {k: v.reshape(rows, *v.shape[2:]).astype(dtypes.get(k, v.dtype)) for k, v in per_block.items()}
            return values, {k: jnp.sum(v) for k, v in counts.items()}

        values, counts = lax.map(one_draw, (latent, keys), batch_size=min(draws_per_tile, num_samples))
        return values, {k: jnp.sum(v) for k, v in counts.items()}

    def forward(
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
            return rows_of_one_tile(latent, inputs, rng_key, first_block, blocks, constants, guide_params)

        # Every draw of one tile's rows, then the next tile's: a tile's inputs and activations
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
            lambda a: rows_of_one_tile(latent, a[0], rng_key, first_block, a[1], constants, guide_params),
            (tiled, tile_blocks),
        )
        values = {
            k: jnp.moveaxis(v.reshape(tiles, num_samples, shards, rows_per_tile, *v.shape[3:]), 0, 2).reshape(
                num_samples, rows, *v.shape[3:]
            )
            for k, v in out.items()
        }
        return values, {k: jnp.sum(v) for k, v in counts.items()}

    return forward


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


def prior_draws(
    model: Callable[..., Any], probe: Mapping[str, Any], sites: Sequence[str], rng_key: jax.Array, num_samples: int
) -> Draws:
    """``num_samples`` prior draws of the model's global latent ``sites`` under the prior
    stream of ``rng_key`` (per-row sites are drawn row by row in the forward)."""
    keys = jax.random.split(jax.random.fold_in(rng_key, _PRIOR_STREAM), num_samples)
    return _site_values(model, probe, sites, keys, {})


def deterministic_draws(
    model: Callable[..., Any], probe: Mapping[str, Any], sites: Sequence[str], latent: Mapping[str, Any]
) -> Draws:
    """The global deterministic ``sites`` of every draw of the global ``latent`` sites
    (``{site: (draws, ...)}``): the model run on the rows ``probe`` with each draw substituted.
    They go with the draws, as ``arviz.from_numpyro`` puts them in ``posterior`` (or ``prior``)."""
    num_samples = len(next(iter(latent.values())))
    keys = jax.random.split(jax.random.key(_DETERMINISTIC_STREAM), num_samples)  # for sites left to draw, if any
    return _site_values(model, probe, sites, keys, latent)


def _site_values(
    model: Callable[..., Any], probe: Mapping[str, Any], sites: Sequence[str], keys: jax.Array, given: Draws
) -> Draws:
    """The values of ``sites`` in one run of ``model`` on ``probe`` per key, with ``given``
    (one draw per key) substituted, as host arrays with a leading draw axis."""

    def one(key: jax.Array, values: Draws) -> Draws:
        trace = trace_model(handlers.substitute(model, data=values), probe, rng_seed=key)
        return {name: trace[name]["value"] for name in sites}

    return {k: np.asarray(v) for k, v in jax.jit(jax.vmap(one))(keys, dict(given)).items()}
