"""The multilevel recipe end to end at a tiny size: the regions' effects and the customers' own
latents are recovered, the intervals cover the simulated effects, and the two stores hold the
global draws and share their random numbers (each customer's latent included)."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from aimz_trainer import open_store
from aimz_trainer.cli import build_parser, load_recipe, parse

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ROWS, GROUPS, WEEKS, DRAWS = 4000, 20, 8, 100
TINY = [
    "--model.num_rows", str(ROWS), "--model.num_groups", str(GROUPS), "--model.pre_periods", str(WEEKS),
    "--fit.batch_size", "500", "--trainer.max_epochs", "30", "--fit.num_samples", str(DRAWS),
    "--trainer.enable_progress_bar", "false",
]  # fmt: skip
GLOBAL_SITES = {"mu_a", "sd_a", "mu_b", "sd_b", "beta", "sd_u", "sigma", "treated_logit", "a", "b"}


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("hierarchical", RECIPES)


@pytest.fixture(scope="module")
def simulated(recipe):
    """The run's ``(data, truth)``: the recipe simulates them from ``--seed`` (0)."""
    return recipe.make_data(ROWS, GROUPS, WEEKS, 0)


@pytest.fixture(scope="module")
def run(recipe, tmp_path_factory):
    """One run shared by the tests: ``(summary, printed output, output dir)``."""
    output_dir = tmp_path_factory.mktemp("hierarchical")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        summary = recipe.main([*TINY, "--output_dir", str(output_dir)])
    return summary, printed.getvalue(), output_dir


@pytest.fixture(scope="module")
def stores(run):
    """The (untreated, treated) stores, opened from disk."""
    summary, _, _ = run
    return open_store(summary["untreated_store"]), open_store(summary["treated_store"])


def test_the_data_are_simulated_as_documented(recipe, simulated):
    data, truth = simulated
    assert {k: (v.shape, v.dtype.name) for k, v in data.items()} == {
        "x": ((ROWS, 2), "float32"),
        "g": ((ROWS,), "int32"),
        "t": ((ROWS,), "float32"),
        "y_pre": ((ROWS, WEEKS), "float32"),
        "y": ((ROWS,), "float32"),
    }
    g, t = data["g"], data["t"].astype(np.float64)
    assert set(np.unique(g)) == set(range(GROUPS))  # every region has customers...
    sizes = np.bincount(g, minlength=GROUPS)
    assert sizes.max() > 2 * sizes.min()  # ... in regions of unequal sizes
    assert set(np.unique(t)) == {0.0, 1.0} and abs(t.mean() - recipe.TREATED_SHARE) < 0.03
    # The simulated regions have exactly the population's mean and spread.
    assert truth["a"].shape == truth["b"].shape == (GROUPS,) and truth["u"].shape == (ROWS,)
    assert truth["b"].mean() == pytest.approx(recipe.TRUE_MU_B) and truth["b"].std() == pytest.approx(recipe.TRUE_SD_B)
    assert truth["a"].mean() == pytest.approx(recipe.TRUE_MU_A) and truth["a"].std() == pytest.approx(recipe.TRUE_SD_A)
    # Before the campaign, each customer's weeks share their u: its variance is the weeks'
    # covariance, the noise's the rest.
    mean = truth["a"][g] + data["x"].astype(np.float64) @ np.asarray(recipe.TRUE_BETA)
    before = data["y_pre"].astype(np.float64) - mean[:, None]
    covariance = np.cov(before[:, 0], before[:, 1])
    assert covariance[0, 1] == pytest.approx(recipe.TRUE_SD_U**2, abs=0.1)
    assert covariance[0, 0] - covariance[0, 1] == pytest.approx(recipe.TRUE_SIGMA**2, abs=0.1)
    np.testing.assert_allclose((before - truth["u"][:, None]).std(), recipe.TRUE_SIGMA, atol=0.02)
    # The campaign week adds the region's effect for the treated: the difference in differences
    # (campaign week minus the weeks before, treated minus untreated) recovers the average effect.
    change = data["y"] - data["y_pre"].astype(np.float64).mean(axis=1)
    true_effect = recipe.true_average_effect(data, truth)
    assert true_effect == pytest.approx(np.mean(truth["b"][g]))
    assert change[t == 1].mean() - change[t == 0].mean() == pytest.approx(true_effect, abs=0.12)
    # The same seed gives the same data.
    again, _ = recipe.make_data(ROWS, GROUPS, WEEKS, 0)
    for key, values in data.items():
        np.testing.assert_array_equal(again[key], values)


def test_the_regions_effects_and_the_population_effect_are_recovered(run):
    summary, printed, _ = run
    assert summary["group_effect_corr"] > 0.9
    assert summary["group_level_corr"] > 0.95
    assert summary["group_effect_rmse"] < 0.2  # the regions' effects spread by 0.5
    assert summary["true_population_effect"] == 1.0
    assert summary["covers_population_effect"] is True
    assert summary["population_ci_low"] <= 1.0 <= summary["population_ci_high"]
    assert (
        f"region effects:              correlation {summary['group_effect_corr']:.3f} with the truth, "
        f"RMSE {summary['group_effect_rmse']:.3f}"
    ) in printed
    assert re.search(r"population effect mu_b: +[+-]\d\.\d{3}, 94% interval .* true \+1\.000 \(inside\)", printed)


def test_each_customers_latent_is_fitted_from_their_own_rows(run):
    """The fitted ``u_auto_loc`` follows the simulated ``u`` row by row: each batch's plate
    indices were the rows it held (random indices would leave no correlation at all)."""
    summary, printed, _ = run
    assert summary["row_latent_corr"] > 0.85
    assert f"customer latents u:          correlation {summary['row_latent_corr']:.3f}" in printed


def test_the_interval_covers_the_true_average_effect(run, recipe, simulated):
    summary, printed, _ = run
    data, truth = simulated
    truth_effect = recipe.true_average_effect(data, truth)
    assert summary["true_effect"] == pytest.approx(truth_effect)
    assert abs(truth_effect - recipe.TRUE_MU_B) > 0.02  # the customers' average effect is not mu_b
    assert summary["covers_true_effect"] is True
    assert summary["ci"] == 0.94
    assert summary["ci_low"] <= truth_effect <= summary["ci_high"]
    assert summary["ci_high"] - summary["ci_low"] < 0.25  # informative: the regions' effects spread by 0.5
    # Narrower than the population effect's: these customers' regions are known, a new region's effect is not.
    assert summary["ci_high"] - summary["ci_low"] < summary["population_ci_high"] - summary["population_ci_low"]
    assert (
        f"estimated average effect:    {summary['average_effect']:+.3f}, 94% interval "
        f"[{summary['ci_low']:+.3f}, {summary['ci_high']:+.3f}]"
    ) in printed
    assert f"true effect:                 {truth_effect:+.3f} (inside the interval)" in printed


def test_the_stores_hold_both_worlds_with_the_global_draws(run, stores, simulated):
    summary, printed, output_dir = run
    data, _ = simulated
    predictions = output_dir / "predictions"
    paths = sorted(str(path) for path in predictions.glob("predict-*"))
    assert paths == sorted([summary["untreated_store"], summary["treated_store"]])
    assert summary["store"] == str(predictions)
    assert f"stores in {predictions}:" in printed and f"t = 1: {summary['treated_store']}" in printed
    for tree, value in zip(stores, (0.0, 1.0), strict=True):
        assert set(tree.children) == {"posterior_predictive", "posterior", "observed_data"}
        assert set(tree["posterior_predictive"].data_vars) == {"y"}
        assert tree["posterior_predictive"]["y"].shape == (1, DRAWS, ROWS)
        assert tree["posterior_predictive"]["y"].dims == ("chain", "draw", "data")
        # The posterior holds the global sites only: each customer's u stays in the guide.
        assert set(tree["posterior"].data_vars) == GLOBAL_SITES
        for site in ("a", "b"):
            assert tree["posterior"][site].shape == (1, DRAWS, GROUPS)
        assert tree["posterior"]["beta"].shape == (1, DRAWS, 2)
        assert tree["posterior"]["mu_b"].shape == (1, DRAWS)
        assert set(tree["observed_data"].data_vars) == {"y"}
        np.testing.assert_array_equal(tree["observed_data"]["y"].values, data["y"])
        assert set(json.loads(tree.attrs["intervention"])["t"]) == {value}
    untreated, treated = stores
    for site in GLOBAL_SITES:
        np.testing.assert_array_equal(untreated["posterior"][site].values, treated["posterior"][site].values)


def test_both_worlds_share_their_random_numbers_and_latents(run, stores, simulated):
    summary, _, _ = run
    data, _ = simulated
    untreated, treated = stores
    y0 = untreated["posterior_predictive"]["y"].values[0].astype(np.float64)
    y1 = treated["posterior_predictive"]["y"].values[0].astype(np.float64)
    b = untreated["posterior"]["b"].values[0].astype(np.float64)
    # The noise and each customer's u cancel: each draw's difference is that draw's effect of
    # the customer's region.
    np.testing.assert_allclose(y1 - y0, b[:, data["g"]], atol=1e-4)
    assert summary["average_effect"] == pytest.approx(b[:, data["g"]].mean(), rel=1e-5)


def test_in_sample_predictions_draw_each_customers_latent_from_the_fitted_guide(stores, simulated, recipe):
    """Without the campaign, a draw minus its region's level and covariates leaves that draw's
    u and noise: averaged over the draws, it follows the simulated u (u drawn from the prior
    would leave no correlation)."""
    data, truth = simulated
    untreated, _ = stores
    posterior = {site: untreated["posterior"][site].values[0].astype(np.float64) for site in ("a", "beta")}
    y0 = untreated["posterior_predictive"]["y"].values[0].astype(np.float64)
    x = data["x"].astype(np.float64)
    mean = posterior["a"][:, data["g"]] + posterior["beta"] @ x.T
    residual = y0 - mean
    assert np.corrcoef(residual.mean(axis=0), truth["u"])[0, 1] > 0.85
    # Each draw scatters around it by the noise and what the guide leaves uncertain in u.
    spread = (residual - residual.mean(axis=0)).std()
    assert 0.9 * recipe.TRUE_SIGMA < spread < 1.25 * recipe.TRUE_SIGMA


def test_its_options_and_defaults(recipe):
    """``aimz-trainer fit --recipe hierarchical`` takes its settings as ``--model.*`` options, next
    to the Trainer's and the fit's. (The run itself is the fixture's: a second one through the
    command would cost most of a minute of compiling.)"""
    parser = build_parser("fit", recipe.RECIPE, None)
    config = parse(
        parser,
        ["--trainer.max_epochs", "3", "--fit.batch_size", "200", "--trainer.devices", "1", "--output_dir", "out",
         "--model.num_groups", "7", "--model.pre_periods", "3", "--model.num_rows", "900", "--fit.num_samples", "9",
         "--model.learning_rate", "0.1", "--seed", "4"],
    )  # fmt: skip
    assert vars(config.model) == {"num_rows": 900, "num_groups": 7, "pre_periods": 3, "learning_rate": 0.1}
    assert (config.trainer.max_epochs, config.trainer.devices, config.fit.batch_size) == (3, 1, 200)
    assert (config.fit.num_samples, config.output_dir, config.seed) == (9, "out", 4)
    defaults = parse(parser, [])
    assert vars(defaults.model) == {"num_rows": 20_000, "num_groups": 40, "pre_periods": 8, "learning_rate": 0.05}
    assert (defaults.trainer.max_epochs, defaults.fit.batch_size, defaults.fit.num_samples) == (50, 1000, 200)
    assert defaults.output_dir is None
