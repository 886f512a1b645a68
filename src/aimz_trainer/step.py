"""Pure factories for the compiled pieces of SVI training.

Each factory returns a plain function meant for :func:`jax.jit`: state in, state out, nothing
kept on an object. The functions take the training data (``device_data``, possibly empty) and
a per-step *batch input* (row indices when the data live on the devices, the rows themselves
when the host gathered them); :func:`batch_from` turns the pair into the model's keyword
arguments, so every compiled function shares one notion of "a batch".

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
from numpyro.infer import SVI
from numpyro.infer.svi import SVIState

from aimz_trainer.errors import DataError

__all__ = [
    "TrainState",
    "batch_from",
    "check_model_accepts",
    "make_finish",
    "make_init",
    "make_train_chunk",
    "sample_posterior",
    "traced_svi",
]

Batch = dict[str, jax.Array]


class TrainState(NamedTuple):
    """What the compiled training chunk carries from step to step.

    Attributes:
        svi_state: NumPyro's ``SVIState`` (optimizer state, mutable state, rng key).
        finite: ``True`` while every loss so far was finite. Once a loss is not, the update of
            that step is discarded and the state stays frozen, so the last good state survives.
    """

    svi_state: SVIState
    finite: jax.Array


def batch_from(device_data: Mapping[str, jax.Array], batch_input: Any) -> Batch:
    """The model's keyword arguments for one step.

    With device-resident data, ``batch_input`` holds row indices and the rows are gathered
    here, on the device; otherwise ``batch_input`` already is the batch.
    """
    if device_data:
        return {key: array[batch_input["indices"]] for key, array in device_data.items()}
    return dict(batch_input)


@contextlib.contextmanager
def traced_svi(svi: SVI, batch: Batch) -> Iterator[None]:
    """Inside a trace: set up ``svi`` and its guide for ``batch``, then restore them on exit."""
    saved = [(obj, dict(vars(obj))) for obj in (svi, svi.guide)]
    try:
        # init records the guide's prototype and svi.constrain_fn; its arrays are unused and
        # compiled away.
        svi.init(jax.random.key(0), **batch)
        yield
    finally:
        for obj, attributes in saved:
            vars(obj).clear()
            vars(obj).update(attributes)


def _first_batch(device_data: Mapping[str, jax.Array], chunk_input: Any) -> Batch:
    return batch_from(device_data, jax.tree.map(lambda leaf: leaf[0], chunk_input))


def make_init(svi: SVI) -> Callable[[jax.Array, Mapping[str, jax.Array], Any], TrainState]:
    """``init(rng_key, device_data, chunk_input) -> TrainState`` from the chunk's first batch."""

    def init(rng_key: jax.Array, device_data: Mapping[str, jax.Array], chunk_input: Any) -> TrainState:
        batch = _first_batch(device_data, chunk_input)
        with traced_svi(svi, batch):
            svi_state = svi.init(rng_key, **batch)
        return TrainState(svi_state, jnp.asarray(True))

    return init


def make_train_chunk(
    svi: SVI,
) -> Callable[[TrainState, Mapping[str, jax.Array], Any], tuple[TrainState, jax.Array]]:
    """``chunk(state, device_data, chunk_input) -> (state, losses)``: K SVI updates in one
    ``lax.scan``, K being the leading axis of ``chunk_input``; the K losses come back together.
    """

    def train_chunk(
        state: TrainState, device_data: Mapping[str, jax.Array], chunk_input: Any
    ) -> tuple[TrainState, jax.Array]:
        def step(carry: TrainState, batch_input: Any) -> tuple[TrainState, jax.Array]:
            updated, loss = svi.update(carry.svi_state, **batch_from(device_data, batch_input))
            finite = carry.finite & jnp.isfinite(loss)
            svi_state = lax.cond(finite, lambda: updated, lambda: carry.svi_state)
            return TrainState(svi_state, finite), loss

        with traced_svi(svi, _first_batch(device_data, chunk_input)):
            return lax.scan(step, state, chunk_input)

    return train_chunk


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
        lambda key: svi.guide.sample_posterior(key, params, **batch),
        keys,
        batch_size=min(draws_per_chunk, num_samples),
    )


def make_finish(
    svi: SVI, num_samples: int
) -> Callable[
    [TrainState, jax.Array, Mapping[str, jax.Array], Any], tuple[dict[str, jax.Array], dict[str, jax.Array] | None]
]:
    """``finish(state, rng_key, device_data, chunk_input) -> (params, posterior)``: the
    constrained variational parameters and ``num_samples`` posterior draws (``None`` for 0)."""

    def finish(
        state: TrainState, rng_key: jax.Array, device_data: Mapping[str, jax.Array], chunk_input: Any
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array] | None]:
        batch = _first_batch(device_data, chunk_input)
        with traced_svi(svi, batch):
            params = svi.get_params(state.svi_state)
            posterior = sample_posterior(svi, rng_key, params, batch, num_samples) if num_samples else None
        return params, posterior

    return finish


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
