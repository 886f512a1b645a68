"""The plan of one prediction: what it computes and writes, decided before its first batch. The
:class:`~aimz_trainer.Predictor` builds a plan, compiles its forward (:mod:`aimz_trainer.forward`)
and streams the batches into a store.

A :class:`PredictionPlan` holds what one call computes and writes: the mode (draws or
log-densities), the output sites, the latent draws, the interventions, the row inputs, the
batch and tile sizes and the store's arrays. :func:`make_plan` builds it from the request, the
data and the model (traced on a few rows; nothing runs on the devices).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import constraints

from aimz_trainer.data import digest_rows, nonfinite, require_finite_rows
from aimz_trainer.errors import ConfigurationError, DataError
from aimz_trainer.forward import DO_PREFIX, LocalDraws, Mode, deterministic_draws, make_forward
from aimz_trainer.plates import ModelLayout, abstract_sites, model_layout, site_dims
from aimz_trainer.store import ArraySpec

__all__ = ["NONFINITE_PREDICTIONS", "PredictionPlan", "batch_rows", "make_plan", "require_finite"]

# How keys become draws (the Predictor's module docstring); part of a store's fingerprint, so
# a store begun under another scheme is not resumed into a mix of two.
_KEY_SCHEME = 2


@dataclass(frozen=True)
class PredictionPlan:
    """What one prediction computes and writes, decided before its first batch.

    Attributes:
        mode: draws or log-densities (:class:`Mode`).
        group: the store group of the outputs: ``posterior_predictive``, ``predictions``,
            ``prior_predictive`` or ``log_likelihood``.
        draws_group: the store group of the latent draws: ``posterior`` or ``prior``.
        outputs: the sites computed batch by batch and written to ``group``.
        latent: the draws of the model's latent sample sites, ``{site: (draws, ...)}``.
        deterministic: the model's global deterministic sites computed from each draw of
            ``latent``, ``{site: (draws, ...)}``: written to ``draws_group`` with them.
        constants: the intervention values applied to every row (arguments of the compiled
            forward, not constants of its program).
        intervention: the intervention as the caller gave it (recorded in the store).
        observed_data: the targets in the data (the model's optional arguments, such as
            ``y=None``), ``{site: rows}``: written to ``observed_data`` batch by batch with the
            outputs; only the log-likelihood conditions on them.
        model_inputs: the forward's row inputs: the data's, the targets in
            :attr:`Mode.LOG_LIKELIHOOD`, and the row-wise intervention values named
            ``DO_PREFIX + site``.
        local: the per-row latent sites drawn from the fitted guide, row by row (in sample);
            ``None`` when the model draws them all.
        guide_params: the guide's parameters when ``local`` is set, else empty.
        check_finite: the forward counts the outputs' non-finite values.
        num_rows: rows of the data.
        num_samples: draws, of all chains (chain by chain along the draw axis).
        num_chains: chains the draws are stacked from; the store keeps them along ``chain``.
        rng_key: the key of every random draw of the prediction.
        rows_per_key: rows sharing one random key (a key block): the Predictor's, or all the
            rows when there are fewer.
        batch: rows per compiled call, a multiple of ``rows_per_key`` x ``devices``; the last
            batch is padded to it.
        devices: devices the rows of a batch are split over.
        process_rows: ``(first, last)``: the rows of every batch this process writes.
        rows_per_tile: rows per device of a tile, a multiple of ``rows_per_key``.
        draws_per_tile: draws of a tile.
        dtypes: each output's dtype in the store (empty while the plan is being built).
        specs: the store's arrays: the outputs, the draws and the observed data, and an integer
            coordinate for every dim of every group.
        fingerprint: a digest of what decides the values: a resume must compute the same.
    """

    mode: Mode
    group: str
    draws_group: str
    outputs: tuple[str, ...]
    latent: dict[str, np.ndarray]
    deterministic: dict[str, np.ndarray]
    constants: dict[str, np.ndarray]
    intervention: Mapping[str, Any]
    observed_data: dict[str, Any]
    model_inputs: dict[str, Any]
    local: LocalDraws | None
    guide_params: Mapping[str, Any]
    check_finite: bool
    num_rows: int
    num_samples: int
    num_chains: int
    rng_key: jax.Array
    rows_per_key: int
    batch: int
    devices: int
    process_rows: tuple[int, int]
    rows_per_tile: int
    draws_per_tile: int
    dtypes: Mapping[str, np.dtype]
    specs: tuple[ArraySpec, ...]
    fingerprint: str

    @property
    def chain_draws(self) -> tuple[int, int]:
        """``(chains, draws per chain)``: the leading dims of every stored array of draws."""
        return self.num_chains, self.num_samples // self.num_chains

    @property
    def signature(self) -> tuple[Any, ...]:
        """What the compiled forward depends on besides the model: plans of one signature
        share one compile. Constant intervention values are arguments, so a baseline and an
        intervention (``t = 0``, ``t = 1``) share it."""
        constant_shapes = {name: f"{value.shape}{value.dtype}" for name, value in self.constants.items()}
        return (
            list(self.outputs), self.mode.name, self.batch, sorted(self.model_inputs), constant_shapes,
            self.num_samples, self.num_chains, self.local and self.local.sites, self.check_finite,
        )  # fmt: skip

    def process_span(self, start: int) -> tuple[int, int]:
        """``(begin, end)``: the rows of the batch at ``start`` that this process reads and
        writes; none (``end <= begin``) when its share of a last batch is padding only."""
        first, last = self.process_rows
        return start + first, min(start + last, self.num_rows)

    def whole_arrays(self) -> dict[tuple[str, str], np.ndarray]:
        """The arrays written whole, ``{(group, name): values}``: the draws (with their chains)
        and the coordinates. The observed data are rows, written batch by batch with the outputs."""
        draws = {**self.latent, **self.deterministic}
        arrays = {(self.draws_group, n): v.reshape(*self.chain_draws, *v.shape[1:]) for n, v in draws.items()}
        # A coordinate is the array named after its one dim (plates and sites share one namespace).
        arrays.update({(s.group, s.name): np.arange(s.shape[0]) for s in self.specs if s.dims == (s.name,)})
        return arrays


def batch_rows(num_rows: int, batch_size: int, rows_per_key: int, devices: int) -> tuple[int, int]:
    """``(rows_per_key, batch)``: data of fewer rows than a key block are one key block of
    that many rows (no padding to compute); a batch is ``batch_size`` rows (at most the data's)
    rounded up to whole key blocks on every device."""
    rows_per_key = min(rows_per_key, num_rows)
    block = rows_per_key * devices
    return rows_per_key, math.ceil(min(batch_size, num_rows) / block) * block


def make_plan(
    model: Callable[..., Any],
    arrays: dict[str, Any],
    num_rows: int,
    *,
    mode: Mode,
    group: str,
    draws: Mapping[str, np.ndarray],
    draws_group: str,
    intervention: Mapping[str, Any],
    return_sites: str | Sequence[str] | None,
    in_sample: bool,
    optional: frozenset[str] | set[str],
    guide: Callable[..., Any] | None,
    params: Mapping[str, Any] | None,
    static_kwargs: Mapping[str, Any],
    rng_key: jax.Array,
    num_chains: int,
    rows_per_key: int,
    batch: int,
    devices: int,
    process_rows: tuple[int, int],
    rows_per_tile: int | None,
    draws_per_tile: int | None,
    check_finite: bool,
) -> PredictionPlan:
    """The plan of one prediction of ``model`` (its static arguments bound) on ``arrays``.

    ``draws`` are the latent draws (``draws_group``: ``posterior`` or ``prior``); ``in_sample``:
    the data are the fit's rows, so per-row latent sites come from ``guide`` (with
    ``params``); ``optional``: the model's optional arguments (targets, never conditioned on
    in :attr:`Mode.DRAWS`); ``rows_per_key`` and ``batch`` as :func:`batch_rows` gives them;
    ``rows_per_tile`` and ``draws_per_tile``: the Predictor's, ``None`` for the defaults;
    ``num_chains``: the draws are that many chains, stacked chain by chain.
    Takes the targets out of ``arrays``.

    Raises:
        ConfigurationError: the draws, the intervention or ``return_sites`` do not fit the
            model, or per-row latent sites cannot be drawn.
        DataError: nothing to compute a log-likelihood of, or (``check_finite``) a non-finite
            intervention value or draw.
    """
    num_samples = len(next(iter(draws.values())))
    probe = {key: np.asarray(value[:rows_per_key]) for key, value in arrays.items()}
    layout = model_layout(model, arrays, batch_rows=rows_per_key, name="data")
    sites = abstract_sites(model, probe)
    constants, row_values = _split_intervention(intervention, sites, layout.global_sites, num_rows)
    samples = [n for n, s in sites.items() if s["type"] == "sample"]
    problems = []
    if unknown := sorted(set(draws) - set(sites)):
        problems.append(f"{unknown} are not sites of the model")
    if missing := sorted(set(layout.global_sites) - set(draws) - set(intervention)):
        problems.append(f"the model's latent site(s) {missing} have no draws")
    if problems:
        raise ConfigurationError(
            f"the {draws_group} draws do not fit the model: {'; '.join(problems)}. The draws are of "
            f"{sorted(draws)}; the model's global latent sites are {sorted(layout.global_sites)}."
        )
    latent = {n: v for n, v in draws.items() if n in samples}
    # Computed here from every draw, whatever values of them the draws bring (a fit's come from
    # its prototype batch); with the draws, as arviz.from_numpyro has them.
    deterministic = (
        deterministic_draws(model, probe, layout.global_deterministic, latent)
        if layout.global_deterministic and latent
        else {}
    )
    # Values of a site the model takes as an optional argument (``y=None``) are targets:
    # written to observed_data, not conditioned on. Required arguments stay inputs.
    observed_data = {n: arrays.pop(n) for n in list(arrays) if n in samples and n not in latent and n in optional}
    observed = [n for n in samples if n not in latent and n not in arrays and n not in intervention]
    outputs = _outputs(
        mode, return_sites, sites, samples, {**latent, **deterministic}, observed, observed_data, draws_group
    )
    # Targets (``y=None``) are observed in training: never the guide's to draw.
    not_guided = {*latent, *intervention, *(n for n in samples if n in optional)}
    local_sites = _guided_sites(layout, guide, not_guided, num_rows) if in_sample else ()
    local = LocalDraws(guide, local_sites, static_kwargs) if local_sites else None
    guide_params = params if local is not None else {}
    # Predictions are not conditioned on the observed values; the log-likelihood is.
    model_inputs = {**arrays, **(observed_data if mode is Mode.LOG_LIKELIHOOD else {})}
    model_inputs.update({DO_PREFIX + name: value for name, value in row_values.items()})
    if check_finite:  # the data were checked as they came in
        require_finite("intervention", row_values, per_row=True)
        require_finite("intervention", constants, per_row=False)
        require_finite(draws_group, latent, per_row=False)
    tile_rows = _tile_rows(batch // devices, rows_per_key, rows_per_tile)
    # The default keeps a tile at about 20,000 rows x draws: on CPU one draw at a time over
    # 10,000 rows beat 10 or 50 at a time (a 32-wide layer's activations stay in cache).
    draft = PredictionPlan(
        mode=mode, group=group, draws_group=draws_group, outputs=tuple(outputs), latent=latent,
        deterministic=deterministic, constants=constants, intervention=intervention, observed_data=observed_data,
        model_inputs=model_inputs,
        local=local, guide_params=guide_params or {}, check_finite=check_finite, num_rows=num_rows,
        num_samples=num_samples, num_chains=num_chains, rng_key=rng_key, rows_per_key=rows_per_key, batch=batch,
        devices=devices, process_rows=process_rows,
        rows_per_tile=tile_rows, draws_per_tile=draws_per_tile or max(1, 20_000 // tile_rows), dtypes={}, specs=(),
        fingerprint=_fingerprint(
            rng_key, latent, arrays, intervention, outputs, group, rows_per_key, _KEY_SCHEME, guide_params or {}
        ),
    )  # fmt: skip
    # Densities keep their dtype, whatever the support.
    shapes = _output_shapes(make_forward(model, draft), draft, {} if mode is Mode.LOG_LIKELIHOOD else sites)
    return replace(
        draft, dtypes={name: dtype for name, (_, dtype) in shapes.items()}, specs=_specs(draft, shapes, sites)
    )


def _outputs(
    mode: Mode,
    return_sites: str | Sequence[str] | None,
    sites: Mapping[str, Any],
    samples: list[str],
    drawn: Mapping[str, Any],
    observed: list[str],
    observed_data: Mapping[str, Any],
    draws_group: str,
) -> list[str]:
    """The sites a prediction writes batch by batch, checked against the model's: never those
    ``drawn`` (the latent draws and the global deterministic sites, in ``draws_group``)."""
    if mode is Mode.LOG_LIKELIHOOD:
        outputs = [n for n in samples if n not in drawn and (n in observed_data or sites[n]["is_observed"])]
        if not outputs:
            raise DataError(
                f"log_likelihood needs the observed values in data: add {observed} (the model's observed sites)."
            )
        return outputs
    defaults = observed + [n for n, s in sites.items() if s["type"] == "deterministic" and n not in drawn]
    if isinstance(return_sites, str):  # one site
        return_sites = [return_sites]
    outputs = defaults if return_sites is None else list(return_sites)
    unknown = sorted(set(outputs) - set(sites))
    if unknown:
        raise ConfigurationError(f"return_sites {unknown} are not sites of the model; its sites are {sorted(sites)}.")
    given = sorted(set(outputs) & set(drawn))
    if given:
        raise ConfigurationError(
            f"return_sites {given} are {draws_group} draws (or global deterministic sites, computed from them "
            f"alone), not predictions: they are written to the {draws_group!r} group already."
        )
    return outputs


def _guided_sites(
    layout: ModelLayout, guide: Callable[..., Any] | None, not_guided: set[str], num_rows: int
) -> tuple[str, ...]:
    """In sample: the per-row latent sites to draw from the guide (empty when the model has
    none but ``not_guided``), after checking that ``data`` can be the fit's rows."""
    # Per-row sites of a plate that is not subsampled are drawn by the model, as any
    # other predicted site: a guide's parameters for them would not belong to rows.
    unindexed = [s for s in layout.unindexed_local if s not in not_guided]
    if guide is not None and unindexed:
        raise ConfigurationError(
            f"the per-row latent site(s) {unindexed} sit in a plate that is not subsampled, so the guide's "
            "parameters for them do not belong to rows of the data: write the plate as "
            "plate(name, n, subsample_size=len(x)), or predict(..., in_sample=False) to draw them from the prior."
        )
    sites = tuple(s for s in layout.local_sites if s not in not_guided and s not in unindexed)
    if not sites:
        return ()
    if guide is None:
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
    return sites


def _tile_rows(rows_per_device: int, rows_per_key: int, requested: int | None) -> int:
    """The largest multiple of ``rows_per_key`` that divides ``rows_per_device`` and is at most
    ``requested`` (default 10,000) rows, and at least one key block."""
    # With 100,000-row batches on CPU, tiles of 10,000 rows were 16% faster than the whole
    # batch per draw (its inputs no longer fit in cache).
    blocks = rows_per_device // rows_per_key
    limit = max((requested or 10_000) // rows_per_key, 1)
    return max(b for b in range(1, min(blocks, limit) + 1) if blocks % b == 0) * rows_per_key


def _split_intervention(
    intervention: Mapping[str, Any], sites: Mapping[str, Any], global_sites: Sequence[str], num_rows: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(constants, row-wise values)``. A value is constant when it is a scalar, has the
    site's event shape, or (a global site) the site's whole shape; it is row-wise when it has
    one entry per row (of the site's event shape). Anything else is refused: broadcast against
    key blocks of rows, it would be applied to the wrong rows."""
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


NONFINITE_PREDICTIONS = (
    "predictions would be NaN there. Remove or fill them, or pass check_finite=False to the Predictor to let NaN "
    "propagate."
)


def require_finite(what: str, arrays: Mapping[str, Any], *, per_row: bool) -> None:
    """Raise :class:`~aimz_trainer.errors.DataError` at the first NaN or infinity in a float
    array of ``arrays`` (``what``: ``"data"``, ``"intervention"`` or the draws' group), naming
    where it is: it would turn every prediction it touches into NaN, and a Bernoulli draw of a
    NaN probability into a 0 that looks like data. ``per_row``: the arrays' first axis is rows."""
    if per_row:
        require_finite_rows(what, arrays, NONFINITE_PREDICTIONS)
        return
    for name, value in arrays.items():
        if (found := nonfinite(value)) is not None:
            index, count = found
            where = f"draw {index[0]}" if what != "intervention" else f"index {index}"
            raise DataError(
                f"{what}[{name!r}] holds {np.asarray(value)[index]} at {where} ({count} non-finite value(s) in all): "
                + NONFINITE_PREDICTIONS
            )


def _fingerprint(rng_key: jax.Array, *parts: Any) -> str:
    """A digest of what decides a store's values: the key, the draws, the settings, and the
    inputs (:func:`~aimz_trainer.data.digest_rows`)."""
    digest = hashlib.sha256(np.asarray(jax.random.key_data(rng_key)).tobytes())
    for part in parts:
        digest_rows(digest, part if isinstance(part, Mapping) else {"": part})
    return digest.hexdigest()


def _output_shapes(
    forward: Callable[..., Any], plan: PredictionPlan, sites: Mapping[str, Any]
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{site: (shape of one draw over rows_per_key rows, compact dtype)}``, without compiling."""
    rows_per_key = plan.rows_per_key
    rows = {k: padded(np.asarray(v[:rows_per_key]), rows_per_key) for k, v in plan.model_inputs.items()}
    one = jax.ShapeDtypeStruct((), jnp.uint32)
    shapes, _ = jax.eval_shape(forward, plan.latent, rows, jax.random.key(0), one, plan.constants, plan.guide_params)
    return {
        name: (shapes[name].shape[1:], _compact_dtype(shapes[name].dtype, sites.get(name))) for name in plan.outputs
    }


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


def _specs(
    plan: PredictionPlan, shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]], sites: Mapping[str, Any]
) -> tuple[ArraySpec, ...]:
    """The store's arrays: the outputs (filled batch by batch along the rows, in blocks of
    draws) and the observed data (batch by batch too), the draws (written whole), and an ``int64`` coordinate
    ``0 .. n-1`` for every dim of every group, as arviz gives every dim."""
    outputs = [
        ArraySpec(plan.group, name, (*plan.chain_draws, plan.num_rows, *shape[1:]), dtype, (
            "chain", "draw", *site_dims(sites[name], name, len(shape)),
        ), 2, draw_axis=1)
        for name, (shape, dtype) in shapes.items()
    ]  # fmt: skip
    draws = [
        ArraySpec(plan.draws_group, name, (*plan.chain_draws, *value.shape[1:]), value.dtype, (
            "chain", "draw", *site_dims(sites[name], name, value.ndim - 1),
        ), None)
        for name, value in {**plan.latent, **plan.deterministic}.items()
    ]  # fmt: skip
    observed = [
        ArraySpec(
            "observed_data",
            name,
            tuple(value.shape),
            np.dtype(value.dtype),
            site_dims(sites[name], name, len(value.shape)),
            0,
        )
        for name, value in plan.observed_data.items()
    ]
    lengths = {(s.group, dim): n for s in (*outputs, *draws, *observed) for dim, n in zip(s.dims, s.shape, strict=True)}
    coordinates = [ArraySpec(group, dim, (n,), np.dtype(np.int64), (dim,), None) for (group, dim), n in lengths.items()]
    return (*outputs, *draws, *observed, *coordinates)


def padded(array: np.ndarray, rows: int) -> np.ndarray:
    """``array`` with its last row repeated up to ``rows`` rows."""
    if array.shape[0] == rows:
        return array
    padding = np.repeat(array[-1:], rows - array.shape[0], axis=0)
    return np.concatenate([array, padding])
