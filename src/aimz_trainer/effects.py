"""Effects of interventions: contrasts of two prediction stores drawn with the same random
numbers (see :mod:`aimz_trainer.predictor`)."""

from __future__ import annotations

import numpy as np
import xarray as xr

__all__ = ["estimate_effect"]


def estimate_effect(baseline: xr.DataTree, intervened: xr.DataTree, site: str, *, ci: float = 0.94) -> xr.DataTree:
    """The effect of an intervention on ``site``: per-draw differences and a summary.

    Both trees come from :meth:`Predictor.predict` with the same Predictor (hence the same
    random numbers): the difference ``intervened - baseline`` then carries no sampling noise of
    its own.

    Returns:
        A DataTree with ``effect/<site>`` (chain, draw, rows: the per-draw differences) and
        ``summary``: ``mean_effect`` per observation, ``average_effect`` per draw (the mean
        over rows), and its mean with the central ``ci`` credible interval as attributes.
    """
    group = "posterior_predictive" if "posterior_predictive" in baseline.children else "predictions"
    difference = (intervened[group][site].astype("float64") - baseline[group][site].astype("float64")).compute()
    rows_dim = difference.dims[2]
    average = difference.mean(rows_dim)
    low, high = np.quantile(average.values.ravel(), [(1 - ci) / 2, (1 + ci) / 2])
    summary = xr.Dataset(
        {"mean_effect": difference.mean(("chain", "draw")), "average_effect": average},
        attrs={"average_effect_mean": float(average.mean()), "ci": ci, "ci_low": float(low), "ci_high": float(high)},
    )
    return xr.DataTree.from_dict({"effect": xr.Dataset({site: difference}), "summary": summary})
