"""Pure factories for the compiled pieces of SVI training.

Each factory returns a plain function meant for :func:`jax.jit`: state in, state out, nothing
kept on an object. The functions take the training data (``device_data``, possibly empty) and
a *record* from the data pipeline whose ``rows`` stack K per-step batch inputs (row indices
when the data live on the devices, the rows themselves when the host gathered them);
:func:`batch_from` turns the pair into the model's keyword arguments, so every compiled
function shares one notion of "a batch".

NumPyro's guides and ``SVI.init`` store what they learn about the model (the guide's
prototype trace, ``svi.constrain_fn``) on the objects themselves. Set up inside a trace, those
attributes would hold tracers that escape it (an ``UnexpectedTracerError`` later). Every
function here therefore runs inside :func:`traced_svi`, which sets them up under the current
trace and then puts the objects back exactly as the user handed them over: the user's ``svi``
and guide never hold a tracer, and set-up costs one trace instead of hundreds of eager
compilations.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import logsumexp
from numpyro.handlers import seed
from numpyro.infer import SVI
from numpyro.infer.svi import SVIState
from numpyro.infer.util import log_likelihood

from aimz_trainer.errors import DataError

__all__ = [
    "TrainState",
    "batch_from",
    "check_model_accepts",
    "first_batch",
    "latent_sites",
    "make_init",
    "make_params",
    "make_posterior_sampler",
    "make_train_chunk",
    "make_validation_step",
    "model_kwargs",
    "pointwise_lpd",
    "sample_posterior",
    "traced_svi",
]

Batch = dict[str, jax.Array]
Record = Mapping[str, Any]


class TrainState(NamedTuple):
    """What the compiled training chunk carries from step to step.

    Attributes:
        svi_state: NumPyro's ``SVIState`` (optimizer state, mutable state, rng key).
        finite: ``True`` while every loss so far was finite. Once a loss is not, the update of
            that step is discarded and the state stays frozen, so the last good state survives.
    """

    svi_state: SVIState
    finite: jax.Array


def batch_from(device_data: Mapping[str, jax.Array], rows: Mapping[str, jax.Array]) -> Batch:
    """The model's keyword arguments for one step.

    With device-resident data, ``rows`` holds row ``indices`` and the rows are gathered here,
    on the device; otherwise ``rows`` already is the batch.
    """
    if device_data:
        return {key: array[rows["indices"]] for key, array in device_data.items()}
    return dict(rows)


@contextlib.contextmanager
def traced_svi(svi: SVI, batch: Batch, rng_key: jax.Array | None = None) -> Iterator[SVIState]:
    """Inside a trace: set up ``svi`` and its guide for ``batch``, then restore them on exit.

    Yields the ``SVIState`` of ``svi.init(rng_key, **batch)``: the guide draws its initial
    values from ``rng_key`` while it sets itself up, so this is the one init of a fit. Callers
    that only need the set-up leave ``rng_key`` out (the state is then compiled away).
    """
    saved = [(obj, dict(vars(obj))) for obj in _stateful_parts(svi)]
    try:
        yield svi.init(jax.random.key(0) if rng_key is None else rng_key, **batch)
    finally:
        for obj, attributes in saved:
            vars(obj).clear()
            vars(obj).update(attributes)


def _stateful_parts(svi: SVI) -> list[Any]:
    """``svi``, its guide and, for an ``AutoGuideList``, every guide inside it."""
    parts, pending = [svi], [svi.guide]
    while pending:
        guide = pending.pop()
        parts.append(guide)
        pending.extend(getattr(guide, "_guides", ()))
    return parts


def model_kwargs(svi: SVI, batch: Batch) -> dict[str, Any]:
    """A batch plus the ``SVI``'s static keyword arguments: what the model and guide take."""
    return {**batch, **svi.static_kwargs}


def first_batch(device_data: Mapping[str, jax.Array], record: Record) -> Batch:
    """The batch of a record's first step (the prototype batch every traced function uses)."""
    return batch_from(device_data, jax.tree.map(lambda leaf: leaf[0], record["rows"]))


def make_init(svi: SVI) -> Callable[[jax.Array, Mapping[str, jax.Array], Record], TrainState]:
    """``init(rng_key, device_data, record) -> TrainState`` from the record's first batch."""

    def init(rng_key: jax.Array, device_data: Mapping[str, jax.Array], record: Record) -> TrainState:
        with traced_svi(svi, first_batch(device_data, record), rng_key) as svi_state:
            return TrainState(svi_state, jnp.asarray(True))

    return init


def make_train_chunk(
    svi: SVI,
) -> Callable[[TrainState, Mapping[str, jax.Array], Record], tuple[TrainState, jax.Array]]:
    """``chunk(state, device_data, record) -> (state, losses)``: SVI updates in one
    ``lax.scan`` over the record's K stacked batches, of which the first ``record["num_steps"]``
    are real; the others skip the update (their loss is NaN), so one compiled function serves
    every chunk length. The K losses come back together.
    """

    def train_chunk(
        state: TrainState, device_data: Mapping[str, jax.Array], record: Record
    ) -> tuple[TrainState, jax.Array]:
        def update(svi_state: SVIState, batch: Batch) -> tuple[SVIState, jax.Array]:
            return svi.update(svi_state, **batch)

        def skip(svi_state: SVIState, batch: Batch) -> tuple[SVIState, jax.Array]:
            return svi_state, jnp.asarray(jnp.nan, jnp.result_type(float))

        def step(carry: TrainState, inputs: tuple[jax.Array, Any]) -> tuple[TrainState, jax.Array]:
            position, rows = inputs
            real = position < record["num_steps"]
            updated, loss = lax.cond(real, update, skip, carry.svi_state, batch_from(device_data, rows))
            finite = carry.finite & (jnp.isfinite(loss) | ~real)
            svi_state = lax.cond(finite, lambda: updated, lambda: carry.svi_state)
            return TrainState(svi_state, finite), loss

        positions = jnp.arange(jax.tree.leaves(record["rows"])[0].shape[0])
        with traced_svi(svi, first_batch(device_data, record)):
            return lax.scan(step, state, (positions, record["rows"]))

    return train_chunk


def make_params(svi: SVI) -> Callable[[SVIState, Mapping[str, jax.Array], Record], dict[str, jax.Array]]:
    """``params(svi_state, device_data, record)``: the constrained variational parameters."""

    def params(svi_state: SVIState, device_data: Mapping[str, jax.Array], record: Record) -> dict[str, jax.Array]:
        with traced_svi(svi, first_batch(device_data, record)):
            return svi.get_params(svi_state)

    return params


def sample_posterior(
    svi: SVI,
    rng_key: jax.Array,
    params: dict[str, jax.Array],
    batch: Batch,
    num_samples: int,
    *,
    draws_per_chunk: int = 100,
) -> dict[str, jax.Array]:
    """``num_samples`` draws from the guide, ``draws_per_chunk`` at a time (vectorised within a
    chunk, sequential across chunks) so memory stays bounded. Call under :func:`traced_svi`.
    Deterministic sites are computed on ``batch``."""
    keys = jax.random.split(rng_key, num_samples)
    return lax.map(
        lambda key: svi.guide.sample_posterior(key, params, **model_kwargs(svi, batch)),
        keys,
        batch_size=min(draws_per_chunk, num_samples),
    )


def make_posterior_sampler(
    svi: SVI, num_samples: int
) -> Callable[[SVIState, jax.Array, Mapping[str, jax.Array], Record], dict[str, jax.Array]]:
    """``sample(svi_state, rng_key, device_data, record)``: ``num_samples`` posterior draws."""

    def sample(
        svi_state: SVIState, rng_key: jax.Array, device_data: Mapping[str, jax.Array], record: Record
    ) -> dict[str, jax.Array]:
        batch = first_batch(device_data, record)
        with traced_svi(svi, batch):
            return sample_posterior(svi, rng_key, svi.get_params(svi_state), batch, num_samples)

    return sample


def pointwise_lpd(log_likelihoods: Mapping[str, jax.Array]) -> jax.Array:
    """Per-observation log predictive density from ``(draws, rows, ...)`` log-likelihoods:
    ``log mean_s p(y_i | theta_s)``, summed over the observed sites and their event dims."""
    total = None
    for values in log_likelihoods.values():
        draws = values.shape[0]
        per_row = logsumexp(values, axis=0) - jnp.log(draws)
        per_row = per_row.reshape(per_row.shape[0], -1).sum(axis=1)
        total = per_row if total is None else total + per_row
    assert total is not None, "the model has no observed site"
    return total


def make_validation_step(
    svi: SVI, num_samples: int, num_train_rows: int
) -> Callable[[SVIState, jax.Array, Mapping[str, jax.Array], Record], tuple[jax.Array, jax.Array | None, jax.Array]]:
    """``val(svi_state, rng_key, device_data, record) -> (loss, lpd_sum, weight_sum)`` for one
    validation batch.

    ``loss`` is the SVI loss (the negative ELBO, with the model's own minibatch scaling) on the
    batch divided by ``num_train_rows``: the held-out negative ELBO per observation, on the
    scale of the training loss per observation. ``lpd_sum`` sums, over the batch's weighted
    rows, the log predictive density under ``num_samples`` guide draws (``None`` when the
    model has no observed site); ``weight_sum`` counts the batch's real rows. ``rng_key`` is
    split into the keys of the ELBO estimate, of the draws and of the model's plates.
    """

    def validate(
        svi_state: SVIState, rng_key: jax.Array, device_data: Mapping[str, jax.Array], record: Record
    ) -> tuple[jax.Array, jax.Array | None, jax.Array]:
        batch = first_batch(device_data, record)
        weights = record["weights"][0]
        loss_key, draw_key, plate_key = jax.random.split(rng_key, 3)
        with traced_svi(svi, batch):
            params = svi.get_params(svi_state)
            loss = svi.loss.loss(loss_key, params, svi.model, svi.guide, **model_kwargs(svi, batch))
            latent = latent_sites(svi)
            observed = [name for name, site in svi.guide.prototype_trace.items() if _is_observed(site)]
            if not observed:
                return loss / num_train_rows, None, jnp.sum(weights)
            draws = sample_posterior(svi, draw_key, params, batch, num_samples)
            draws = {name: value for name, value in draws.items() if name in latent}
            # seeded: a subsampling plate draws (unused) indices even on a whole batch.
            log_likelihoods = log_likelihood(seed(svi.model, plate_key), draws, **model_kwargs(svi, batch))
        lpd = pointwise_lpd({name: log_likelihoods[name] for name in observed})
        return loss / num_train_rows, jnp.sum(lpd * weights), jnp.sum(weights)

    return validate


def latent_sites(svi: SVI) -> set[str]:
    """Names of the model's latent sample sites (what a guide's draws may substitute); the
    guide's prototype must be set up (inside :func:`traced_svi`)."""
    return {
        name for name, site in svi.guide.prototype_trace.items() if site["type"] == "sample" and not site["is_observed"]
    }


def _is_observed(site: dict[str, Any]) -> bool:
    return site["type"] == "sample" and site["is_observed"]


def check_model_accepts(model: Callable[..., Any], keys: list[str]) -> None:
    """Raise if the model cannot take every data key as a keyword argument."""
    try:
        parameters = inspect.signature(model).parameters.values()
    except (TypeError, ValueError):  # builtins and C callables: nothing to check
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    accepted = [
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    unknown = [key for key in keys if key not in accepted]
    if unknown:
        raise DataError(
            f"the model does not accept the data key(s) {unknown}: batches are passed as keyword "
            f"arguments and the model's keyword parameters are {accepted}. Rename the keys of "
            "the data mapping to match."
        )
