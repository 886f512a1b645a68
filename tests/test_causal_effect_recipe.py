"""The impact-modelling recipe end to end at a tiny size: its interval covers the simulated
effect that the naive difference misses, and its two stores share their random numbers."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from aimz_trainer import open_store
from aimz_trainer.cli import load_recipe
from tests.test_cli import aimz_trainer as run_command

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ROWS, DRAWS = 4000, 100
TINY = [
    "--model.num_rows", str(ROWS), "--fit.batch_size", "500", "--trainer.max_epochs", "25", "--fit.num_samples",
    str(DRAWS), "--trainer.enable_progress_bar", "false",
]  # fmt: skip


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("causal_effect", RECIPES)


@pytest.fixture(scope="module")
def run(recipe, tmp_path_factory):
    """One run shared by the tests: ``(summary, printed output, output dir)``."""
    output_dir = tmp_path_factory.mktemp("causal_effect")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = recipe.main([*TINY, "--output_dir", str(output_dir)])
    return summary, printed.getvalue(), output_dir


@pytest.fixture(scope="module")
def stores(run):
    """The (untreated, treated) stores, opened from disk."""
    summary, _, _ = run
    return open_store(summary["untreated_store"]), open_store(summary["treated_store"])


def test_the_data_are_confounded_as_documented(recipe):
    data = recipe.make_data(ROWS, 0)
    Z, t, y = data["Z"].astype(np.float64), data["t"].astype(np.float64), data["y"].astype(np.float64)
    assert set(np.unique(t)) == {0.0, 1.0}
    # The treated have confounders that raise the outcome: ignoring them inflates the effect.
    raise_outcome = Z @ np.asarray(recipe.TRUE_BETA)
    assert raise_outcome[t == 1].mean() - raise_outcome[t == 0].mean() > 1.0
    assert recipe.naive_difference(data) == pytest.approx(y[t == 1].mean() - y[t == 0].mean(), rel=1e-5)
    # Adjusting for them by least squares recovers tau: the simulation's truth is what it says.
    design = np.column_stack([np.ones(ROWS), Z, t])
    coefficients, *_ = np.linalg.lstsq(design, y, rcond=None)
    assert coefficients[-1] == pytest.approx(recipe.TRUE_TAU, abs=0.1)


def test_the_interval_covers_the_true_effect_that_the_naive_difference_misses(run):
    summary, printed, _ = run
    truth = summary["true_effect"]
    assert truth == 1.5
    assert summary["covers_true_effect"] is True
    assert summary["ci_low"] <= truth <= summary["ci_high"]
    assert summary["ci_high"] - summary["ci_low"] < 0.3  # an informative interval, not a vague one
    assert summary["naive_difference"] - truth > 1.0  # biased upwards, by more than the interval's width
    assert abs(summary["average_effect"] - truth) < abs(summary["naive_difference"] - truth) / 10
    assert f"naive difference in means:   {summary['naive_difference']:+.3f}" in printed
    assert (
        f"estimated average effect:    {summary['average_effect']:+.3f}, 94% interval "
        f"[{summary['ci_low']:+.3f}, {summary['ci_high']:+.3f}]"
    ) in printed
    assert "true effect:                 +1.500 (inside the interval)" in printed


def test_the_stores_are_under_output_dir_with_both_worlds(run, stores, recipe):
    summary, printed, output_dir = run
    predictions = output_dir / "predictions"
    paths = sorted(str(path) for path in predictions.glob("predict-*"))
    assert paths == sorted([summary["untreated_store"], summary["treated_store"]])
    assert summary["store"] == str(predictions)
    assert f"stores in {predictions}:" in printed and f"t = 1: {summary['treated_store']}" in printed
    data = recipe.make_data(ROWS, 0)
    for tree, value in zip(stores, (0.0, 1.0), strict=True):
        assert set(tree.children) == {"posterior_predictive", "posterior", "observed_data"}
        assert tree["posterior_predictive"]["y"].shape == (1, DRAWS, ROWS)
        assert tree["posterior_predictive"]["y"].dims == ("chain", "draw", "data")
        assert tree["posterior"]["tau"].shape == (1, DRAWS)
        assert tree["posterior"]["beta"].shape == (1, DRAWS, 3)
        # The observed outcome is kept beside the predictions, which are not conditioned on it.
        np.testing.assert_array_equal(tree["observed_data"]["y"].values, data["y"])
        assert set(json.loads(tree.attrs["intervention"])["t"]) == {value}
    untreated, treated = stores
    for site in ("alpha", "beta", "tau", "sigma", "gamma"):
        np.testing.assert_array_equal(untreated["posterior"][site].values, treated["posterior"][site].values)


def test_both_worlds_share_their_random_numbers(run, stores, recipe):
    summary, _, _ = run
    untreated, treated = stores
    y0 = untreated["posterior_predictive"]["y"].values[0].astype(np.float64)
    y1 = treated["posterior_predictive"]["y"].values[0].astype(np.float64)
    posterior = {site: untreated["posterior"][site].values[0].astype(np.float64) for site in untreated["posterior"]}
    # The noise cancels: each draw's difference is that draw's tau, in every row.
    np.testing.assert_allclose(y1 - y0, np.broadcast_to(posterior["tau"][:, None], y0.shape), atol=2e-5)
    # ... and there was noise to cancel: around its mean, each draw scatters by its sigma.
    Z = recipe.make_data(ROWS, 0)["Z"].astype(np.float64)
    mean = posterior["alpha"][:, None] + posterior["beta"] @ Z.T
    standardized = (y0 - mean) / posterior["sigma"][:, None]
    assert standardized.std() == pytest.approx(1.0, abs=0.02)
    assert abs(standardized.mean()) < 0.02
    # So the average effect is the posterior of tau, summarized.
    assert summary["average_effect"] == pytest.approx(posterior["tau"].mean(), rel=1e-6)
    assert summary["ci_low"] == pytest.approx(np.quantile(posterior["tau"], 0.03), rel=1e-6)


@pytest.mark.slow
def test_the_command_runs_it_and_says_where_the_stores_went(tmp_path):
    completed = run_command(
        "fit", "--recipe", "causal_effect", "--trainer.max_epochs", "5", "--fit.batch_size", "500",
        "--output_dir", str(tmp_path), "--model.num_rows", "2000", "--fit.num_samples", "20",
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    assert "causal_effect: 2,000 rows, 3 confounders" in out
    assert "fit: 20 steps" in out
    assert re.search(r"estimated average effect: +[+-]\d\.\d{3}, 94% interval \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]", out)
    assert "true effect:                 +1.500 (" in out
    footer = out[out.index("causal_effect wrote:") :].splitlines()
    assert footer[1] == f"  config: {tmp_path / 'config.yaml'}"
    assert footer[-1] == f"  predictions: {tmp_path / 'predictions'}"
    assert len(list((tmp_path / "predictions").glob("predict-*"))) == 2
