"""The model's row plates: which plates run over the rows of the data, which latent sites
belong to a row, and the handler that puts a batch's dataset row indices into those plates.

A minibatch plate, ``plate("data", n, subsample_size=len(x))``, left to itself draws ``len(x)``
random indices out of ``n`` on every run. Its scale (``n / len(x)``) does not depend on them,
so a model with global latents only trains right either way; but a guide's per-row parameters
(``AutoNormal``'s ``z_auto_loc`` of shape ``(n,)``) are indexed by those indices, so a per-row
latent would be trained against random rows. :func:`at_rows` substitutes the indices of the
rows the batch really holds, in the model and in the guide alike.

Which plates run over the rows is read from the model itself: :func:`model_layout` traces it
(abstractly, nothing is computed) on two batch lengths, and the plates whose size follows the
batch are the row plates. A group plate that happens to have as many entries as a batch is
therefore never mistaken for one.

A batch whose rows do not split evenly over the devices is padded with rows that stand for
nothing (:mod:`aimz_trainer.data`). :func:`padding_masked` takes them out of the ELBO, site by
site, through those same plates: every sample site inside a plate over the rows, of the model
and of the guide, is masked at the padding positions, and a subsampled plate's scale is put
back to the real batch's (``n / batch_size``, not ``n / padded``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.infer.autoguide import AutoContinuous
from numpyro.primitives import Messenger

from aimz_trainer.errors import AimzTrainerError, ConfigurationError, DataError, MinibatchScalingWarning

__all__ = [
    "ModelLayout",
    "RowPadding",
    "SiteFn",
    "abstract_sites",
    "at_rows",
    "check_paddable",
    "check_trainable",
    "model_guide_checked",
    "model_layout",
    "on_rows",
    "padding_masked",
    "site_dims",
    "split_arrays",
    "trace_model",
]


class ModelLayout(NamedTuple):
    """How a model's sites sit on the rows of its data.

    Attributes:
        row_plates: subsampled plates over the rows (``plate(name, n, subsample_size=len(x))``),
            whose indices :func:`at_rows` substitutes.
        plate_sizes: each row plate's full size ``n``.
        fixed_row_plates: plates over the rows that are not subsampled (``plate(name, len(x))``).
        local_sites: latent sample sites inside a row plate (one value per row), in trace order;
            enumerated discrete sites are not counted (the ELBO sums them out).
        unindexed_local: local sites inside no subsampled row plate: a guide's parameters for
            them would belong to positions in a batch, not to rows.
        global_sites: latent sample sites outside every row plate.
        global_deterministic: deterministic sites outside every row plate whose shape does not
            follow the batch (``b = exp(log_b)``; not ``mu = w * x``).
        observed_sites: observed sample sites, in trace order.
        unscaled_observed: observed sites inside no subsampled row plate: their minibatch
            likelihood is not scaled up to the whole data.
        fixed_subsample_plates: subsampled plates whose subsample size does not follow the
            batch (``plate("data", n, subsample_size=100)``): ``{name: (size, subsample_size)}``.
        unplated_row_sites: sample sites (observed or latent) whose shape follows the batch
            but that sit in no plate over the rows (``sample("y", Normal(mu).to_event(1),
            obs=y)``): the rows of a padded batch cannot be masked there.
    """

    row_plates: tuple[str, ...]
    plate_sizes: dict[str, int]
    fixed_row_plates: tuple[str, ...]
    local_sites: tuple[str, ...]
    unindexed_local: tuple[str, ...]
    global_sites: tuple[str, ...]
    global_deterministic: tuple[str, ...]
    observed_sites: tuple[str, ...]
    unscaled_observed: tuple[str, ...]
    fixed_subsample_plates: dict[str, tuple[int, int]]
    unplated_row_sites: tuple[str, ...]


def model_layout(
    model: Callable[..., Any],
    rows: Mapping[str, Any],
    *,
    batch_rows: int,
    static_kwargs: Mapping[str, Any] | None = None,
    name: str = "train_data",
) -> ModelLayout:
    """Trace ``model`` on ``batch_rows`` and ``batch_rows + 1`` rows shaped like ``rows`` (arrays
    or shape structs; only each one's row shape and dtype are used) and sort its sites. A model
    that cannot run on them raises :class:`DataError` naming ``name`` (the data's argument).

    Example:
        >>> import numpyro, numpyro.distributions as dist
        >>> def model(x, y=None):
        ...     b = numpyro.sample("b", dist.Normal())
        ...     with numpyro.plate("data", 500, subsample_size=len(x)):
        ...         z = numpyro.sample("z", dist.Normal())
        ...         numpyro.sample("y", dist.Normal(z + b * x), obs=y)
        >>> layout = model_layout(model, {"x": np.zeros(500), "y": np.zeros(500)}, batch_rows=50)
        >>> layout.row_plates, layout.local_sites, layout.global_sites
        (('data',), ('z',), ('b',))
    """
    first = _trace_structure(model, rows, batch_rows, static_kwargs or {}, name)
    second = _trace_structure(model, rows, batch_rows + 1, static_kwargs or {}, name)
    plates, sites = first
    following = {name for name, args in plates.items() if second[0].get(name) != args}
    row_plates = tuple(name for name, (_, subsample) in plates.items() if name in following and subsample is not None)
    fixed_row_plates = tuple(name for name, (_, subsample) in plates.items() if name in following and subsample is None)
    fixed_subsample = {
        name: (size, subsample)
        for name, (size, subsample) in plates.items()
        if subsample is not None and name not in following
    }
    local, unindexed, global_, observed, unscaled, unplated = [], [], [], [], [], []
    deterministic = [
        name
        for name, site in sites.items()
        if site["deterministic"]
        and not any(frame in following for frame in site["frames"])
        and site["shape"] == second[1][name]["shape"]
    ]
    for name, site in sites.items():
        if site["deterministic"]:
            continue
        in_rows = any(frame in following for frame in site["frames"])
        if not in_rows and site["shape"] != second[1][name]["shape"]:
            unplated.append(name)
        if site["observed"]:
            observed.append(name)
            if not any(frame in row_plates for frame in site["frames"]):
                unscaled.append(name)
        elif in_rows:
            if not site["enumerated"]:
                local.append(name)
                if not any(frame in row_plates for frame in site["frames"]):
                    unindexed.append(name)
        else:
            global_.append(name)
    return ModelLayout(
        row_plates=row_plates,
        plate_sizes={name: plates[name][0] for name in row_plates},
        fixed_row_plates=fixed_row_plates,
        local_sites=tuple(local),
        unindexed_local=tuple(unindexed),
        global_sites=tuple(global_),
        global_deterministic=tuple(deterministic),
        observed_sites=tuple(observed),
        unscaled_observed=tuple(unscaled),
        fixed_subsample_plates=fixed_subsample,
        unplated_row_sites=tuple(unplated),
    )


def check_trainable(layout: ModelLayout, guide: Any, num_rows: int, batch_size: int) -> None:
    """Raise :class:`ConfigurationError` for a model that minibatch SVI over ``num_rows`` rows
    would fit wrong, and warn when its minibatch likelihood is not scaled."""
    for name in layout.row_plates:
        size = layout.plate_sizes[name]
        if size != num_rows:
            raise ConfigurationError(
                f"plate {name!r} has size {size}, but fit was given {num_rows} rows: a minibatch plate's size is "
                "the number of rows its batches are scaled up to, and its indices are the rows of the data. Write "
                f"plate({name!r}, {num_rows}, subsample_size=len(x)), or fit it on the {size} rows it was written for."
            )
    for name, (size, subsample) in layout.fixed_subsample_plates.items():
        if size == num_rows:
            raise ConfigurationError(
                f"plate {name!r} subsamples a fixed {subsample} of its {size} rows, but the Trainer already passes the "
                f"model batches of batch_size={batch_size} rows: write plate({name!r}, {size}, "
                "subsample_size=len(x)) so that the plate follows the batch."
            )
    if layout.unindexed_local and batch_size < num_rows:
        raise ConfigurationError(
            f"the per-row latent site(s) {list(layout.unindexed_local)} sit in a plate over the batch's rows that is "
            "not subsampled, so their guide parameters would belong to positions in a batch, not to rows of the "
            f"data. Write the plate as plate(name, {num_rows}, subsample_size=len(x))."
        )
    if layout.local_sites and isinstance(guide, AutoContinuous):
        raise ConfigurationError(
            f"{type(guide).__name__} cannot fit the per-row latent site(s) {list(layout.local_sites)}: NumPyro's "
            "AutoContinuous guides (AutoDiagonalNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal, "
            "AutoIAFNormal, AutoBNAFNormal, ...) are one joint distribution over every latent value and do not "
            "support latent sites in a subsampled plate. Use AutoNormal or AutoDelta, or an AutoGuideList that "
            "gives the per-row sites to one of them."
        )
    if layout.unscaled_observed and batch_size < num_rows:
        warnings.warn(
            f"the observed site(s) {list(layout.unscaled_observed)} are not inside a subsampled plate, so each "
            f"batch's likelihood counts {batch_size} rows where the data have {num_rows}: the prior weighs "
            f"{num_rows / batch_size:.3g}x too much. Put them in plate('data', {num_rows}, subsample_size=len(x)).",
            MinibatchScalingWarning,
            stacklevel=3,
        )


def check_paddable(
    layout: ModelLayout, batch_size: int, num_devices: int, num_rows: int | None = None, *, name: str = "batch_size"
) -> None:
    """Raise :class:`ConfigurationError` when batches of ``batch_size`` rows cannot be padded to a
    multiple of ``num_devices`` without changing the fit: a site follows the rows outside every
    plate over them (its padding rows cannot be masked), or a per-row latent site sits in a plate
    that is not subsampled (its guide parameters would have one entry per padded position).
    The sizes it suggests are at most ``num_rows`` (when given)."""
    remainder = batch_size % num_devices
    if not remainder or not (layout.unplated_row_sites or layout.unindexed_local):
        return
    padded = batch_size - remainder + num_devices
    nearest = " or ".join(str(size) for size in (padded - num_devices, padded) if 1 <= size <= (num_rows or size))
    if layout.unplated_row_sites:
        problem = (
            f"the site(s) {list(layout.unplated_row_sites)} follow the batch's rows outside every plate over them, "
            "where the padding rows cannot be masked. Put them in plate('data', n, subsample_size=len(x))"
        )
    else:
        problem = (
            f"the per-row latent site(s) {list(layout.unindexed_local)} sit in a plate over the rows that is not "
            f"subsampled, so their guide parameters would have {padded} entries, padding included. Write the plate "
            "as plate(name, n, subsample_size=len(x))"
        )
    fix = f"pick a {name} that splits evenly: {nearest}" if nearest else "fit on fewer devices"
    raise ConfigurationError(
        f"{name}={batch_size} does not split evenly over {num_devices} devices, so each batch is padded to {padded} "
        f"rows that are masked out of the ELBO plate by plate; but {problem}, or {fix}."
    )


class RowPadding(NamedTuple):
    """A batch padded for the devices: its first ``rows`` columns are the batch's rows, the
    others padding (see :func:`padding_masked`).

    Attributes:
        rows: the batch's real rows (the ``batch_size`` asked for).
        subsampled: the row plates whose scale follows the batch (the layout's ``row_plates``).
        fixed: the plates over the rows that are not subsampled (masked, scale 1).
    """

    rows: int
    subsampled: tuple[str, ...]
    fixed: tuple[str, ...]

    @classmethod
    def of(cls, layout: ModelLayout, rows: int) -> RowPadding:
        """The padding of ``rows``-row batches of a model laid out as ``layout``."""
        return cls(rows, layout.row_plates, layout.fixed_row_plates)


class _MaskPadding(Messenger):
    """Masks every sample site inside a plate over the rows at the positions past
    ``padding.rows``, and multiplies a subsampled plate's scale ``n / columns`` by
    ``columns / rows``. Under the plates on NumPyro's stack: it sees each site's frames."""

    def __init__(self, padding: RowPadding) -> None:
        self._padding = padding
        self._plates = {*padding.subsampled, *padding.fixed}
        super().__init__()

    def process_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] != "sample":
            return
        rows = self._padding.rows
        for frame in msg["cond_indep_stack"]:
            if frame.name not in self._plates or frame.size <= rows:
                continue
            # The plate's dim counts from the right of the site's batch shape.
            keep = (np.arange(frame.size) < rows).reshape((frame.size,) + (1,) * (-frame.dim - 1))
            msg["fn"] = msg["fn"].mask(keep)
            if frame.name in self._padding.subsampled:
                msg["scale"] = frame.size / rows * (1.0 if msg["scale"] is None else msg["scale"])


@contextlib.contextmanager
def padding_masked(padding: RowPadding | None, columns: int) -> Iterator[None]:
    """Inside: batches of ``columns`` columns whose first ``padding.rows`` are real rows and the
    others padding. Every sample site in a plate over the rows, in the model and in the guide
    (local latents too), has its log-density masked at the padding positions, and a subsampled
    plate's scale is the real batch's, ``n / padding.rows`` instead of ``n / columns``: the ELBO,
    its gradient and every per-row value at the real positions are those of the unpadded batch.
    Nothing is added to the program when there is no padding (``padding`` is ``None`` or
    ``columns == padding.rows``)."""
    if padding is None or columns == padding.rows:
        yield
        return
    with _MaskPadding(padding):
        yield


_GUIDE_NOT_MODEL = "Found non-auxiliary vars in guide but not model"


@contextlib.contextmanager
def model_guide_checked() -> Iterator[None]:
    """Around the first traces of the SVI step, where the model first runs on the guide's draws
    (it ran on its own prior draws when :func:`model_layout` traced it): a failure there is a
    guide that does not fit the model, and becomes a :class:`ConfigurationError` saying so.
    NumPyro only warns when the guide samples sites the model does not have (a guide built for
    another model), and the fit would train on: made an error too. Other warnings pass through
    as they were."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    except AimzTrainerError:
        raise
    except Exception as error:  # NumPyro's shape check, or the model's own broadcasting error
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigurationError(
            f"the guide does not fit the model: the model fails on the guide's draws ({type(error).__name__}: "
            f"{first_line}). A hand-written guide must sample each latent site with the model's shape and "
            "support; an autoguide must be built from this model."
        ) from error
    for warning in caught:
        message = str(warning.message)
        if message.startswith(_GUIDE_NOT_MODEL):
            sites = message.split("\n", 1)[-1]
            raise ConfigurationError(
                f"the guide samples sites the model does not have: {sites} (a guide built for another model?). "
                "Build the guide from this model, e.g. AutoNormal(model), or mark a guide-only site "
                "infer={'is_auxiliary': True}."
            )
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


def _trace_structure(
    model: Callable[..., Any], rows: Mapping[str, Any], count: int, static_kwargs: Mapping[str, Any], name: str
) -> tuple[dict[str, tuple[int, int | None]], dict[str, dict[str, Any]]]:
    """``(plates, sample sites)`` of one abstract run of ``model`` on ``count`` rows:
    ``{plate: (size, subsample_size)}`` and ``{site: {"deterministic", "observed", "enumerated",
    "frames", "shape"}}`` of the sample and deterministic sites."""
    found: list[Any] = []
    # A closure, not one merged dict: a data key that is also a static argument stays an error.
    with_static = (lambda **rows: model(**rows, **static_kwargs)) if static_kwargs else model

    def run(inputs: Mapping[str, Any]) -> None:
        found.append(trace_model(with_static, inputs))

    inputs = {
        key: jax.ShapeDtypeStruct((count, *np.shape(value)[1:]), jax.dtypes.canonicalize_dtype(value.dtype))
        for key, value in rows.items()
    }
    try:
        jax.eval_shape(run, inputs)
    except Exception as error:  # the model's own error, from deep inside NumPyro or JAX
        shapes = ", ".join(f"{key} {struct.shape} {struct.dtype}" for key, struct in inputs.items())
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise DataError(
            f"the model cannot run on a batch of {name} ({shapes}): {type(error).__name__}: {first_line}. "
            f"Check that the keys of {name} are the model's arguments and that each array has the row shape the "
            "model expects (nothing was computed or written)."
        ) from error
    trace = found[0]
    plates = {name: tuple(site["args"]) for name, site in trace.items() if site["type"] == "plate"}
    sites = {
        name: {
            "deterministic": site["type"] == "deterministic",
            "observed": bool(site.get("is_observed")),
            "enumerated": bool((site.get("infer") or {}).get("enumerate")),
            "frames": tuple(frame.name for frame in site.get("cond_indep_stack", ())),
            "shape": tuple(np.shape(site["value"])),
        }
        for name, site in trace.items()
        if site["type"] in ("sample", "deterministic")
    }
    return plates, sites  # type: ignore[return-value]


def site_dims(site: Mapping[str, Any], name: str, ndim: int) -> tuple[str, ...]:
    """Dim names of a site's value: its plates' names where they apply, else ``<site>_dim_i``.
    A plate's ``dim`` counts from the right of the batch shape, left of the event dims."""
    names = [f"{name}_dim_{i}" for i in range(ndim)]
    event_dim = getattr(site.get("fn"), "event_dim", 0)
    for frame in site.get("cond_indep_stack", ()):
        axis = ndim - event_dim + frame.dim if frame.dim < 0 else frame.dim
        if 0 <= axis < ndim:
            names[axis] = frame.name
    return tuple(names)


def trace_model(model: Callable[..., Any], kwargs: Mapping[str, Any], *, rng_seed: Any = 0) -> dict[str, Any]:
    """The trace (``{name: site}``, in run order) of one run of ``model(**kwargs)`` under
    :func:`on_rows` (every subsampled plate on ``arange`` indices) and ``seed(rng_seed)``: an
    int or a key (a traced one too, inside ``jit`` or ``vmap``).

    Example:
        >>> import numpyro, numpyro.distributions as dist
        >>> def model(x):
        ...     w = numpyro.sample("w", dist.Normal())
        ...     with numpyro.plate("data", 100, subsample_size=len(x)):
        ...         numpyro.sample("y", dist.Normal(w * x))
        >>> trace = trace_model(model, {"x": np.zeros(3)})
        >>> [(name, site["type"]) for name, site in trace.items()]
        [('w', 'sample'), ('data', 'plate'), ('y', 'sample')]
    """
    with handlers.trace() as trace, handlers.seed(rng_seed=rng_seed):
        on_rows(model)(**kwargs)
    return trace


class SiteFn(NamedTuple):
    """What is read of a site's distribution without running it: its support, event shape and
    event dim."""

    support: Any
    event_shape: tuple[int, ...]
    event_dim: int


def abstract_sites(model: Callable[..., Any], kwargs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The sample and deterministic sites of one run of ``model(**kwargs)``, in run order, as
    :func:`trace_model` records them, from an abstract run on the array arguments (nothing is
    computed; the other arguments pass as they are): each site's ``"value"`` is a
    ``jax.ShapeDtypeStruct`` and its ``"fn"`` a :class:`SiteFn` (``None`` for a deterministic
    site); ``"type"``, ``"is_observed"`` and ``"cond_indep_stack"`` are the trace's. A run on
    values computes op by op, each operation compiled on its first use in a process. Where a
    support's bound comes from a computed value (an integer interval up to a count the model
    computes), only a run on values knows it: the model then runs on ``kwargs``
    (:func:`trace_model`) and that run's sites are returned.

    Example:
        >>> import numpyro, numpyro.distributions as dist
        >>> def model(x):
        ...     p = numpyro.sample("p", dist.Beta(1.0, 1.0))
        ...     with numpyro.plate("data", 100, subsample_size=len(x)):
        ...         numpyro.sample("y", dist.Binomial(10, p))
        >>> sites = abstract_sites(model, {"x": np.zeros(3)})
        >>> sites["y"]["value"].shape, sites["y"]["fn"].support.upper_bound
        ((3,), 10)
    """
    found: dict[str, dict[str, Any]] = {}
    arrays, static = split_arrays(kwargs)

    def run(arrays: Mapping[str, Any]) -> None:
        for name, site in trace_model(model, {**arrays, **static}).items():
            if site["type"] not in ("sample", "deterministic"):
                continue
            fn, value = site.get("fn"), site["value"]
            support = getattr(fn, "support", None)
            bounds = (getattr(support, "lower_bound", None), getattr(support, "upper_bound", None))
            if any(isinstance(bound, jax.core.Tracer) for bound in bounds):
                raise _NeedsValues
            found[name] = {
                "type": site["type"],
                "value": jax.ShapeDtypeStruct(np.shape(value), jnp.result_type(value)),
                "is_observed": bool(site.get("is_observed")),
                "cond_indep_stack": tuple(site.get("cond_indep_stack", ())),
                "fn": None if fn is None else SiteFn(support, tuple(fn.event_shape), fn.event_dim),
            }

    try:
        jax.eval_shape(run, arrays)
    except _NeedsValues:
        return {n: s for n, s in trace_model(model, kwargs).items() if s["type"] in ("sample", "deterministic")}
    return found


def split_arrays(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(arrays, the rest)`` of a model's keyword arguments: what a trace takes as its inputs,
    and what passes into the model as it is."""
    arrays = {key: value for key, value in kwargs.items() if isinstance(value, jax.Array | np.ndarray)}
    return arrays, {key: value for key, value in kwargs.items() if key not in arrays}


class _NeedsValues(Exception):
    """Raised inside :func:`abstract_sites`' abstract run: a support's bound is a computed value."""


def on_rows(fn: Callable[..., Any], rows: jax.Array | None = None) -> Callable[..., Any]:
    """``fn`` (a model or a guide) with every subsampled plate's indices given instead of drawn:
    ``rows`` (dataset row indices, clipped to the plate's size) where the subsample has their
    length, ``arange(subsample_size)`` otherwise. Where the values do not depend on which rows
    a plate holds, this saves drawing them (a permutation of all n rows, per run); and a
    subsample longer than its plate (the padded rows of a small prediction) is no error."""

    def indices(msg: Mapping[str, Any]) -> jax.Array | None:
        if msg["type"] != "plate" or msg["args"][1] is None:
            return None
        size, subsample_size = msg["args"]
        if rows is not None and rows.shape[0] == subsample_size:
            return jnp.minimum(rows, size - 1)
        return jnp.arange(subsample_size)

    return handlers.substitute(fn, substitute_fn=indices)


@contextlib.contextmanager
def at_rows(row_plates: Sequence[str], indices: jax.Array) -> Iterator[None]:
    """Inside: every one of ``row_plates`` takes ``indices`` (the batch's dataset rows) as its
    subsample, in the model and in the guide (a handler on NumPyro's stack reaches both)."""
    if not row_plates:
        yield
        return
    with handlers.substitute(data=dict.fromkeys(row_plates, indices)):
        yield
