"""Effects of interventions: contrasts of two prediction stores drawn with the same random
numbers (see :mod:`aimz_trainer.predictor`)."""

from __future__ import annotations

import numbers
import warnings
from typing import Any

import numpy as np
import xarray as xr

from aimz_trainer.errors import ConfigurationError, SamplingNoiseWarning

__all__ = ["estimate_effect", "scenario_difference"]

_PREDICTION_GROUPS = ("posterior_predictive", "predictions")  # in sample, out of sample


def estimate_effect(baseline: xr.DataTree, intervened: xr.DataTree, site: str, *, ci: float = 0.94) -> xr.DataTree:
    """The effect of an intervention on ``site``: per-draw differences and a summary.

    Both trees come from :meth:`Predictor.predict` with the same Predictor (hence the same
    random numbers): the difference ``intervened - baseline`` then carries no sampling noise of
    its own. Trees drawn with different keys or posterior draws give a
    :class:`~aimz_trainer.errors.SamplingNoiseWarning`: their difference mixes the effect with
    the noise of two draws.

    Returns:
        A DataTree with ``effect/<site>`` (chain, draw, rows: the per-draw differences) and
        ``summary``: ``mean_effect`` per observation, ``average_effect`` per draw (the mean
        over rows), and its mean with the central ``ci`` credible interval as attributes.
    """
    if not isinstance(site, str):
        raise ConfigurationError(f"site must be the name of a predicted site (a str); got {site!r}.")
    if isinstance(ci, bool) or not isinstance(ci, numbers.Real) or not 0 < ci <= 1:
        raise ConfigurationError(f"ci must be a number in (0, 1], the interval's probability; got {ci!r}.")
    group, before = _predictions(baseline, "baseline", site)
    other_group, after = _predictions(intervened, "intervened", site)
    if (other_group, after.shape) != (group, before.shape):
        raise ConfigurationError(
            f"baseline holds {group}/{site} of shape {before.shape} and intervened {other_group}/{site} of shape "
            f"{after.shape}: predict both for the same rows, both in sample or both not."
        )
    _warn_unless_same_draws(baseline, intervened)
    difference = (after.astype("float64") - before.astype("float64")).compute()
    rows_dim = difference.dims[2]
    average = difference.mean(rows_dim)
    low, high = np.quantile(average.values.ravel(), [(1 - ci) / 2, (1 + ci) / 2])
    summary = xr.Dataset(
        {"mean_effect": difference.mean(("chain", "draw")), "average_effect": average},
        attrs={"average_effect_mean": float(average.mean()), "ci": ci, "ci_low": float(low), "ci_high": float(high)},
    )
    return xr.DataTree.from_dict({"effect": xr.Dataset({site: difference}), "summary": summary})


def scenario_difference(baseline: xr.DataTree, intervened: xr.DataTree) -> xr.DataTree:
    """Every site of the predictive group the two trees share, ``intervened - baseline`` draw
    by draw, with the baseline's ``posterior`` group: the reference library's effect layout
    (:meth:`ImpactModel.estimate_effect <aimz_trainer.ImpactModel.estimate_effect>`).

    Each tree's ``artifact_path`` becomes ``artifact_path_baseline`` /
    ``artifact_path_intervention`` of the result. Trees drawn with different keys or
    posterior draws give a :class:`~aimz_trainer.errors.SamplingNoiseWarning`.

    Raises:
        ConfigurationError: an argument is not a DataTree, or the two share no predictive group.
    """
    for argument, tree in [("output_baseline", baseline), ("output_intervention", intervened)]:
        if not isinstance(tree, xr.DataTree):
            raise ConfigurationError(f"{argument} must be a DataTree from predict; got {type(tree).__name__}.")
    groups = ("prior_predictive", *_PREDICTION_GROUPS)
    group = next((g for g in groups if g in baseline.children and g in intervened.children), None)
    if group is None:
        raise ConfigurationError(
            f"the scenarios share no predictive group ({', '.join(groups)}): the baseline has "
            f"{sorted(baseline.children)}, the intervention {sorted(intervened.children)}."
        )
    _warn_unless_same_draws(baseline, intervened)
    before, after = baseline[group].to_dataset(), intervened[group].to_dataset()
    shared = [name for name in after.data_vars if name in before.data_vars]
    difference = xr.Dataset({name: after[name] - before[name] for name in shared}, attrs=dict(after.attrs))
    children = {group: difference}
    if "posterior" in baseline.children:
        children["posterior"] = baseline["posterior"].to_dataset()
    tree = xr.DataTree.from_dict(children)
    for role, source in [("baseline", baseline), ("intervention", intervened)]:
        if "artifact_path" in source.attrs:
            tree.attrs[f"artifact_path_{role}"] = source.attrs["artifact_path"]
    return tree


def _predictions(tree: Any, argument: str, site: str) -> tuple[str, xr.DataArray]:
    """``(group, draws of site)`` of a tree from :meth:`Predictor.predict`, or a
    :class:`~aimz_trainer.errors.ConfigurationError` naming ``argument``."""
    if not isinstance(tree, xr.DataTree):
        raise ConfigurationError(f"{argument} must be a DataTree from Predictor.predict; got {type(tree).__name__}.")
    group = next((name for name in _PREDICTION_GROUPS if name in tree.children), None)
    if group is None:
        raise ConfigurationError(
            f"{argument} holds no predictions (a group {' or '.join(map(repr, _PREDICTION_GROUPS))}); its groups are "
            f"{sorted(tree.children)}."
        )
    if site not in tree[group].data_vars:
        raise ConfigurationError(
            f"site={site!r} is not in {argument}'s {group}; its sites there are {sorted(tree[group].data_vars)}."
        )
    return group, tree[group][site]


def _warn_unless_same_draws(baseline: xr.DataTree, intervened: xr.DataTree) -> None:
    differing = []
    if baseline.attrs.get("rng_key") != intervened.attrs.get("rng_key"):
        differing.append(f"random keys ({baseline.attrs.get('rng_key')} and {intervened.attrs.get('rng_key')})")
    both = "posterior" in baseline.children and "posterior" in intervened.children
    # The draws' values and coordinates, not the groups' attributes (their creation times differ).
    if both and not baseline["posterior"].to_dataset().equals(intervened["posterior"].to_dataset()):
        differing.append("posterior draws")
    if differing:
        warnings.warn(
            f"the two trees were drawn with different {' and '.join(differing)}: their difference carries the "
            "sampling noise of both draws, not the effect alone. Predict both with one Predictor (one rng_key, one "
            "posterior).",
            SamplingNoiseWarning,
            stacklevel=3,
        )
