"""The Predictor's values, random-number scheme, interventions, effects and store schema.

Exact comparisons (``np.testing.assert_array_equal``) rely on dyadic posteriors and inputs (see
``tests/predictor_worker.py``): ``w * x + b`` is then exact in float32 however XLA fuses it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import arviz
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import xarray as xr
from numpyro import handlers
from numpyro.infer import Predictive
from numpyro.infer import log_likelihood as numpyro_log_likelihood

from aimz_trainer import (
    ConfigurationError,
    DataError,
    NonFinitePredictionError,
    Predictor,
    SamplingNoiseWarning,
    StoreError,
    estimate_effect,
    make_mesh,
    open_store,
)
from tests.predictor_worker import (
    NOISE,
    NUM_DRAWS,
    ROWS_PER_KEY,
    dyadic_posterior,
    dyadic_x,
    linear_model,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def values(tree: xr.DataTree, group: str, site: str) -> np.ndarray:
    return np.asarray(tree[group][site].values)


def linear_predictor(**kwargs) -> Predictor:
    options = {"mesh": make_mesh(1), "rng_key": jax.random.key(7), "rows_per_key": ROWS_PER_KEY, "draws_per_chunk": 4}
    return Predictor(linear_model, dyadic_posterior(), **{**options, **kwargs})


@pytest.fixture(scope="module")
def predictor():
    """One Predictor for the module: its compiled steps (one per batch shape) are reused."""
    predictor = linear_predictor()
    yield predictor
    predictor.cleanup()


# -- values -------------------------------------------------------------------------------------


def test_deterministic_site_equals_numpyro_predictive(predictor):
    posterior = dyadic_posterior()
    x = dyadic_x(10)
    tree = predictor.predict({"x": x}, batch_size=8)
    mu = values(tree, "posterior_predictive", "mu")
    assert mu.shape == (1, NUM_DRAWS, 10)
    reference = Predictive(linear_model, posterior_samples=posterior, return_sites=["mu"])(jax.random.key(0), x=x)
    np.testing.assert_array_equal(mu[0], np.asarray(reference["mu"]))
    np.testing.assert_array_equal(mu[0], posterior["w"][:, None] * x + posterior["b"][:, None])


def test_random_site_follows_the_documented_key_scheme(predictor):
    """Draw s of block k (rows k*R .. k*R+R-1) is the model seeded with
    fold_in(fold_in(rng_key, s), k) on that block's rows (the last block padded to R rows by
    repeating its last row), with draw s of the posterior substituted under the seed (so the
    seed's key goes to the sites still to draw)."""
    posterior = dyadic_posterior()
    x = dyadic_x(10)  # blocks of 4, 4 and 2 rows
    y = values(predictor.predict({"x": x}, batch_size=8), "posterior_predictive", "y")[0]
    for s in range(NUM_DRAWS):
        theta = {name: value[s] for name, value in posterior.items()}
        for k in range(3):
            rows = x[k * ROWS_PER_KEY : (k + 1) * ROWS_PER_KEY]
            padded = np.concatenate([rows, np.repeat(rows[-1:], ROWS_PER_KEY - len(rows))])
            key = jax.random.fold_in(jax.random.fold_in(predictor.rng_key, s), k)
            model = handlers.seed(handlers.substitute(linear_model, data=theta), key)
            expected = np.asarray(handlers.trace(model).get_trace(x=padded)["y"]["value"])[: len(rows)]
            np.testing.assert_array_equal(y[s, k * ROWS_PER_KEY : k * ROWS_PER_KEY + len(rows)], expected)
    # And the noise is what the model says: y - mu ~ Normal(0, NOISE), different in every cell.
    mu = posterior["w"][:, None] * x + posterior["b"][:, None]
    assert len(np.unique(y - mu)) == y.size


def test_bernoulli_draws_match_their_probability():
    def model(x, y=None):
        a = numpyro.sample("a", dist.Normal())
        with numpyro.plate("obs", x.shape[0]):
            numpyro.sample("y", dist.Bernoulli(logits=a * x), obs=y)

    num_draws = 2000
    x = np.array([-2.0, -1.0, 0.0, 0.0, 0.5, 1.0, 2.0, 3.0], np.float32)
    predictor = Predictor(model, {"a": np.ones(num_draws, np.float32)}, rng_key=jax.random.key(3), rows_per_key=4)
    tree = predictor.predict({"x": x}, batch_size=8)
    y = values(tree, "posterior_predictive", "y")
    assert tree["posterior_predictive"]["y"].dtype == np.int8
    assert set(np.unique(y)) == {0, 1}
    p = 1 / (1 + np.exp(-x))
    np.testing.assert_allclose(y[0].mean(axis=0), p, atol=0.045)  # > 4 standard errors
    # Blocks 0 and 1 (identical row 2 and 3 of x=0 aside) use different keys: not the same draws.
    assert not np.array_equal(y[0, :, 0:4], y[0, :, 4:8])
    assert not np.array_equal(y[0, :, 2], y[0, :, 3])  # rows inside a block differ too
    predictor.cleanup()


def test_posterior_deterministic_sites_are_ignored(predictor):
    """``guide.sample_posterior`` returns ``mu`` computed on the guide's batch: never substituted,
    whether its length differs from the rows' or (by chance) matches a block."""
    posterior = dyadic_posterior()
    x = dyadic_x(8)
    expected = posterior["w"][:, None] * x + posterior["b"][:, None]
    for stale in (np.full((NUM_DRAWS, 3), 999.0, np.float32), np.full((NUM_DRAWS, ROWS_PER_KEY), 999.0, np.float32)):
        with_mu = Predictor(linear_model, {**posterior, "mu": stale}, rows_per_key=ROWS_PER_KEY)
        tree = with_mu.predict({"x": x}, batch_size=8)
        np.testing.assert_array_equal(values(tree, "posterior_predictive", "mu")[0], expected)
        assert set(tree["posterior"].data_vars) == {"w", "b"}
        with_mu.cleanup()


def test_observed_values_in_data_are_not_conditioned_on(predictor):
    x = dyadic_x(10)
    y_obs = np.full(10, 123.0, np.float32)
    tree = predictor.predict({"x": x, "y": y_obs}, batch_size=8)
    without = predictor.predict({"x": x}, batch_size=8)
    np.testing.assert_array_equal(values(tree, "observed_data", "y"), y_obs)
    np.testing.assert_array_equal(
        values(tree, "posterior_predictive", "y"), values(without, "posterior_predictive", "y")
    )


# -- batch size and device independence -----------------------------------------------------------


def test_draws_do_not_depend_on_batch_size_or_draws_per_chunk(predictor):
    x = dyadic_x(23)  # 23 rows: no batch size below divides it
    reference = predictor.predict({"x": x}, batch_size=8)  # draws_per_chunk=4
    # (The predictors are kept alive: their scratch directories hold the stores.)
    small, large = linear_predictor(draws_per_chunk=6), linear_predictor(draws_per_chunk=3)
    others = [
        small.predict({"x": x}, batch_size=4),
        large.predict({"x": x}, batch_size=12),
        predictor.predict({"x": x}, batch_size=5),  # rounded up to 8
    ]
    assert [tree.attrs["batch_size"] for tree in [reference, *others]] == [8, 4, 12, 8]
    for tree in others:
        for site in ("y", "mu"):
            np.testing.assert_array_equal(
                values(tree, "posterior_predictive", site), values(reference, "posterior_predictive", site)
            )
    small.cleanup()
    large.cleanup()


@pytest.mark.slow
@pytest.mark.multidevice
def test_four_devices_write_the_same_values_as_one(predictor, tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    completed = subprocess.run(
        [sys.executable, "-m", "tests.predictor_worker", "predict", str(tmp_path / "four")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4
    four = open_store(result["store_path"])
    assert four.attrs["batch_size"] == 16  # 16 rounded to rows_per_key (4) x 4 devices

    one = predictor.predict({"x": dyadic_x(37)}, batch_size=8, output_dir=tmp_path / "one")
    assert predictor.mesh.size == 1
    four_tiled = open_store(result["tiled_store_path"])
    for site in ("y", "mu"):
        assert four["posterior_predictive"][site].shape == (1, NUM_DRAWS, 37)
        for tree in (four, four_tiled):
            np.testing.assert_array_equal(
                values(tree, "posterior_predictive", site), values(one, "posterior_predictive", site)
            )
    np.testing.assert_array_equal(values(four, "posterior", "w"), values(one, "posterior", "w"))


# -- interventions and effects --------------------------------------------------------------------


def treatment_model(x, t, y=None):
    """x -> t (an observed input) -> y, plus ``z`` and ``u`` that do not depend on t."""
    a = numpyro.sample("a", dist.Normal())
    beta = numpyro.sample("beta", dist.Normal())
    b = numpyro.sample("b", dist.Normal())
    with numpyro.plate("obs", x.shape[0]):
        t = numpyro.sample("t", dist.Normal(x, 1.0), obs=t)
        numpyro.deterministic("z", a * x)
        numpyro.sample("u", dist.Normal(x, 1.0))
        mu = numpyro.deterministic("mu", beta * t + a * x + b)
        numpyro.sample("y", dist.Normal(mu, NOISE), obs=y)


def treatment_problem(num_draws: int = 8, beta: float | None = None):
    rng = np.random.default_rng(5)
    posterior = {
        "a": (rng.integers(-8, 9, size=num_draws) / 8).astype(np.float32),
        "beta": (rng.integers(-8, 9, size=num_draws) / 4).astype(np.float32),
        "b": (rng.integers(-8, 9, size=num_draws) / 4).astype(np.float32),
    }
    if beta is not None:
        posterior["beta"] = np.full(num_draws, beta, np.float32)
    x = (rng.integers(-16, 17, size=11) / 4).astype(np.float32)
    t = (rng.integers(-8, 9, size=11) / 2).astype(np.float32)
    return posterior, {"x": x, "t": t}


@pytest.fixture(scope="module")
def treatment():
    """``(predictor, posterior, data)``, the predictor shared by the intervention tests."""
    posterior, data = treatment_problem()
    predictor = Predictor(treatment_model, posterior, rng_key=jax.random.key(1), rows_per_key=4)
    yield predictor, posterior, data
    predictor.cleanup()


def test_do_intervention_changes_exactly_the_descendants_of_t(treatment):
    predictor, posterior, data = treatment
    base = predictor.predict(data, batch_size=8)
    assert set(base["posterior_predictive"].data_vars) == {"u", "y", "z", "mu"}
    a, beta, b = (posterior[name][:, None] for name in ("a", "beta", "b"))
    np.testing.assert_array_equal(values(base, "posterior_predictive", "mu")[0], beta * data["t"] + a * data["x"] + b)

    row_wise = (np.arange(11) % 3).astype(np.float32)  # one value per row: follows the batches
    cases = [({"t": 1.0}, np.ones(11, np.float32), 1.0), ({"t": row_wise}, row_wise, row_wise.tolist())]
    for intervention, t_new, recorded in cases:
        tree = predictor.predict(data, batch_size=8, intervention=intervention)
        mu = values(tree, "posterior_predictive", "mu")[0]
        np.testing.assert_array_equal(mu, beta * t_new + a * data["x"] + b)
        assert not np.array_equal(mu, values(base, "posterior_predictive", "mu")[0])
        # y shares the baseline's random numbers: it moves by exactly the change of mu.
        y_diff = values(tree, "posterior_predictive", "y") - values(base, "posterior_predictive", "y")
        np.testing.assert_allclose(y_diff[0], beta * (t_new - data["t"]), atol=1e-5)
        for unrelated in ("z", "u"):
            np.testing.assert_array_equal(
                values(tree, "posterior_predictive", unrelated), values(base, "posterior_predictive", unrelated)
            )
        assert json.loads(tree.attrs["intervention"]) == {"t": recorded}


def test_do_intervention_on_a_latent_site(treatment):
    predictor, posterior, data = treatment
    tree = predictor.predict(data, batch_size=8, intervention={"beta": 0.0})
    a, b = posterior["a"][:, None], posterior["b"][:, None]
    np.testing.assert_array_equal(values(tree, "posterior_predictive", "mu")[0], a * data["x"] + b)
    np.testing.assert_array_equal(values(tree, "posterior", "beta")[0], posterior["beta"])  # the draws, unchanged


def test_unknown_intervention_site_raises_before_any_store(tmp_path):
    posterior, data = treatment_problem()
    predictor = Predictor(treatment_model, posterior, rows_per_key=4)  # its own: no scratch directory yet
    with pytest.raises(ConfigurationError, match="intervention") as info:
        predictor.predict(data, intervention={"mu": 1.0}, output_dir=tmp_path / "out")  # deterministic
    assert "['a', 'b', 'beta', 't', 'u', 'y']" in str(info.value)  # the sample sites
    with pytest.raises(ConfigurationError, match="nope"):
        predictor.predict(data, intervention={"nope": 1.0})
    assert not (tmp_path / "out").exists()
    assert not predictor._scratch.created


def test_estimate_effect_recovers_the_treatment_coefficient():
    posterior, data = treatment_problem(beta=1.5)  # a, b vary over the draws, beta does not
    predictor = Predictor(treatment_model, posterior, rng_key=jax.random.key(2), rows_per_key=4)
    for in_sample, group in [(True, "posterior_predictive"), (False, "predictions")]:
        control = predictor.predict(data, batch_size=8, intervention={"t": 0.0}, in_sample=in_sample)
        treated = predictor.predict(data, batch_size=8, intervention={"t": 1.0}, in_sample=in_sample)
        assert group in control.children
        effect = estimate_effect(control, treated, "y", ci=0.9)
        assert set(effect.children) == {"effect", "summary"}
        assert effect["effect"]["y"].dims == ("chain", "draw", "obs")
        assert effect["effect"]["y"].shape == (1, 8, 11)
        summary = effect["summary"]
        assert summary["mean_effect"].dims == ("obs",)
        assert summary["average_effect"].dims == ("chain", "draw")
        assert set(summary.attrs) == {"average_effect_mean", "ci", "ci_low", "ci_high"}
        assert summary.attrs["ci"] == 0.9
        np.testing.assert_allclose(summary["average_effect"].values, 1.5, atol=1e-5)
        np.testing.assert_allclose(summary["mean_effect"].values, 1.5, atol=1e-5)
        assert summary.attrs["average_effect_mean"] == pytest.approx(1.5, abs=1e-5)
        assert summary.attrs["ci_low"] <= 1.5 + 1e-5 and summary.attrs["ci_high"] >= 1.5 - 1e-5
        assert summary.attrs["ci_high"] - summary.attrs["ci_low"] < 1e-5  # shared random numbers: no noise
    predictor.cleanup()


def test_estimate_effect_warns_when_the_trees_were_drawn_with_other_keys_or_draws(treatment):
    predictor, posterior, data = treatment
    control = predictor.predict(data, intervention={"t": 0.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error", SamplingNoiseWarning)  # one Predictor: no warning
        estimate_effect(control, predictor.predict(data, intervention={"t": 1.0}), "y")
    other_key = Predictor(treatment_model, posterior, rng_key=jax.random.key(7))
    with pytest.warns(SamplingNoiseWarning, match=r"different random keys \(\[0, 1\] and \[0, 7\]\)"):
        estimate_effect(control, other_key.predict(data, intervention={"t": 1.0}), "y")
    shifted = {name: value + 1 for name, value in posterior.items()}
    other_draws = Predictor(treatment_model, shifted, rng_key=predictor.rng_key)
    with pytest.warns(SamplingNoiseWarning, match="different posterior draws: their difference carries"):
        estimate_effect(control, other_draws.predict(data, intervention={"t": 1.0}), "y")


def test_estimate_effect_per_draw_is_the_coefficient_draw(treatment):
    predictor, posterior, data = treatment
    control = predictor.predict(data, batch_size=8, intervention={"t": 0.0})
    treated = predictor.predict(data, batch_size=8, intervention={"t": 1.0})
    summary = estimate_effect(control, treated, "mu")["summary"]
    beta = posterior["beta"].astype(np.float64)
    np.testing.assert_array_equal(summary["average_effect"].values[0], beta)  # exact: dyadic values
    low, high = np.quantile(beta, [0.03, 0.97])
    assert (summary.attrs["ci_low"], summary.attrs["ci_high"]) == pytest.approx((low, high))
    assert summary.attrs["average_effect_mean"] == pytest.approx(beta.mean())


# -- the store's schema ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Failed to open Zarr store with consolidated metadata")
def test_datatree_schema_attrs_and_dtypes(tmp_path):
    def model(x, y=None, flag=None):
        w = numpyro.sample("w", dist.Normal())
        scales = numpyro.sample("scales", dist.HalfNormal().expand([2]).to_event(1))
        with numpyro.plate("obs", x.shape[0]):
            mu = numpyro.deterministic("mu", w * x)
            numpyro.sample("y", dist.Normal(mu, scales[0]), obs=y)
            numpyro.sample("flag", dist.Bernoulli(logits=mu), obs=flag)

    posterior = {"w": np.linspace(0.5, 1.5, 5).astype(np.float32), "scales": np.ones((5, 2), np.float32)}
    predictor = Predictor(model, posterior, mesh=make_mesh(1), rng_key=jax.random.key(0), rows_per_key=4)
    x = np.linspace(-1, 1, 9).astype(np.float32)
    data = {"x": x, "y": 2 * x, "flag": (x > 0).astype(np.int32)}
    tree = predictor.predict(data, batch_size=8, output_dir=tmp_path, intervention={"w": 1.0})
    assert set(tree.children) == {"posterior_predictive", "posterior", "observed_data"}
    pp = tree["posterior_predictive"]
    assert set(pp.data_vars) == {"y", "flag", "mu"}  # observed and deterministic sites
    for site in ("y", "flag", "mu"):
        assert pp[site].dims == ("chain", "draw", "obs")
        assert pp[site].shape == (1, 5, 9)
    assert pp["flag"].dtype == np.int8
    assert pp["y"].dtype == np.float32
    assert tree["posterior"]["w"].dims == ("chain", "draw")
    assert tree["posterior"]["scales"].dims == ("chain", "draw", "scales_dim_0")
    assert tree["observed_data"]["y"].dims == ("obs",)
    np.testing.assert_array_equal(values(tree, "observed_data", "flag"), data["flag"])
    attrs = tree.attrs
    store_path = attrs["store_path"]
    assert os.path.dirname(store_path) == str(tmp_path)
    assert os.path.basename(store_path).startswith("predict-")
    assert attrs["aimz_trainer_version"] == "0.1.0"
    assert json.loads(attrs["intervention"]) == {"w": 1.0}
    assert attrs["created_at"].endswith("+00:00")
    assert (attrs["num_rows"], attrs["rows_per_key"], attrs["aimz_trainer_rows_written"]) == (9, 4, 9)

    # The store opens with plain xarray too, lazily, in blocks of a batch.
    plain = xr.open_datatree(store_path, engine="zarr")
    np.testing.assert_array_equal(
        plain["posterior_predictive"]["flag"].values, values(tree, "posterior_predictive", "flag")
    )
    assert plain["posterior_predictive"]["mu"].encoding["chunks"] == (1, 5, 8)

    # Out of sample: group "predictions".
    out = predictor.predict({"x": x}, batch_size=8, in_sample=False, output_dir=tmp_path)
    assert set(out.children) == {"predictions", "posterior"}
    assert json.loads(out.attrs["intervention"]) == {}
    predictor.cleanup()


def test_arviz_reads_the_trees():
    rng = np.random.default_rng(0)
    posterior = {
        "w": (2 + 0.05 * rng.normal(size=200)).astype(np.float32),
        "b": (0.05 * rng.normal(size=200)).astype(np.float32),
    }
    x = rng.normal(size=30).astype(np.float32)
    y = (2 * x + NOISE * rng.normal(size=30)).astype(np.float32)
    predictor = Predictor(linear_model, posterior, rng_key=jax.random.key(1), rows_per_key=8)
    loglik = predictor.log_likelihood({"x": x, "y": y}, batch_size=16)
    assert set(loglik.children) == {"log_likelihood", "posterior", "observed_data"}
    summary = arviz.summary(loglik, group="posterior", kind="stats")
    assert set(summary.index) == {"w", "b"}
    assert float(summary.loc["w", "mean"]) == pytest.approx(float(posterior["w"].mean()), abs=0.01)
    loo = arviz.loo(loglik, var_name="y", pointwise=True)
    assert loo.n_data_points == 30
    assert loo.n_samples == 200
    assert np.isfinite(loo.elpd) and loo.elpd < 0
    predictor.cleanup()


# -- prior predictive and log-likelihood ----------------------------------------------------------


def test_prior_predictive_matches_the_prior():
    def model(x, y=None):
        w = numpyro.sample("w", dist.Normal(2.0, 0.5))
        b = numpyro.sample("b", dist.Normal(-1.0, 0.5))
        with numpyro.plate("obs", x.shape[0]):
            mu = numpyro.deterministic("mu", w * x + b)
            numpyro.sample("y", dist.Normal(mu, NOISE), obs=y)

    x = np.linspace(-2, 2, 10).astype(np.float32)
    predictor = Predictor(model, {"w": np.zeros(3), "b": np.zeros(3)}, rng_key=jax.random.key(4), rows_per_key=4)
    tree = predictor.sample_prior_predictive({"x": x, "y": x}, num_samples=2000, batch_size=8)
    assert set(tree.children) == {"prior", "prior_predictive", "observed_data"}
    assert tree["prior"]["w"].shape == (1, 2000)
    assert tree["prior_predictive"]["y"].dims == ("chain", "draw", "obs")
    w, b = values(tree, "prior", "w")[0], values(tree, "prior", "b")[0]
    se = 0.5 / np.sqrt(2000)
    assert abs(w.mean() - 2.0) < 4 * se and abs(b.mean() + 1.0) < 4 * se
    assert w.std() == pytest.approx(0.5, rel=0.1) and b.std() == pytest.approx(0.5, rel=0.1)
    # The predictive draws use the prior draws of the same index.
    mu = values(tree, "prior_predictive", "mu")[0]
    np.testing.assert_allclose(mu, w[:, None] * x + b[:, None], rtol=1e-6, atol=1e-6)
    y = values(tree, "prior_predictive", "y")[0]
    sd = np.sqrt(0.25 * x**2 + 0.25 + NOISE**2)
    assert np.all(np.abs(y.mean(axis=0) - (2 * x - 1)) < 4.5 * sd / np.sqrt(2000))
    np.testing.assert_allclose(y.std(axis=0), sd, rtol=0.1)
    # Default: as many draws as the posterior.
    assert predictor.sample_prior_predictive({"x": x}, batch_size=8)["prior"]["w"].shape == (1, 3)
    with pytest.raises(ConfigurationError, match="num_samples"):
        predictor.sample_prior_predictive({"x": x}, num_samples=0)
    predictor.cleanup()


def test_log_likelihood_equals_numpyro(predictor):
    posterior = dyadic_posterior()
    x = dyadic_x(10)
    y = (x + np.linspace(-1, 1, 10)).astype(np.float32)
    tree = predictor.log_likelihood({"x": x, "y": y}, batch_size=8)
    loglik = values(tree, "log_likelihood", "y")
    assert tree["log_likelihood"]["y"].dims == ("chain", "draw", "obs")
    assert loglik.shape == (1, NUM_DRAWS, 10)
    reference = numpyro_log_likelihood(linear_model, posterior, x=x, y=y)["y"]
    np.testing.assert_allclose(loglik[0], np.asarray(reference), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(values(tree, "observed_data", "y"), y)
    # By hand: Normal(w x + b, NOISE).log_prob(y).
    by_hand = dist.Normal(jnp.asarray(posterior["w"][:, None] * x + posterior["b"][:, None]), NOISE).log_prob(y)
    np.testing.assert_allclose(loglik[0], np.asarray(by_hand), rtol=1e-6, atol=1e-6)


def test_log_likelihood_needs_the_observed_values(predictor, tmp_path):
    with pytest.raises(DataError, match=r"\['y'\]"):
        predictor.log_likelihood({"x": dyadic_x(10)}, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- bad input ------------------------------------------------------------------------------------


def test_posterior_draws_of_different_lengths():
    with pytest.raises(ConfigurationError, match="leading draw axis"):
        Predictor(linear_model, {"w": np.zeros(5), "b": np.zeros(4)})
    with pytest.raises(ConfigurationError, match="leading draw axis"):
        Predictor(linear_model, {"w": np.zeros(5), "b": np.float32(0.0)})
    with pytest.raises(ConfigurationError):
        Predictor(linear_model, {})
    for name in ("rows_per_key", "draws_per_chunk"):
        with pytest.raises(ConfigurationError, match=name):
            Predictor(linear_model, dyadic_posterior(), **{name: 0})


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_bad_batch_size(predictor, tmp_path, batch_size):
    with pytest.raises(ConfigurationError, match="batch_size"):
        predictor.predict({"x": dyadic_x(10)}, batch_size=batch_size, output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_return_site(predictor, tmp_path):
    with pytest.raises(ConfigurationError, match=r"\['nope'\].*\['b', 'mu', 'w', 'y'\]"):
        predictor.predict({"x": dyadic_x(10)}, return_sites=["y", "nope"], output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    tree = predictor.predict({"x": dyadic_x(10)}, return_sites=["mu"], batch_size=8)
    assert set(tree["posterior_predictive"].data_vars) == {"mu"}


def test_return_site_of_a_global_latent(predictor):
    with pytest.raises(ConfigurationError, match=r"\['w'\] are posterior draws.*'posterior' group"):
        predictor.predict({"x": dyadic_x(10)}, return_sites=["w"], batch_size=8)


def test_bad_data(predictor):
    with pytest.raises(DataError):
        predictor.predict({"x": dyadic_x(10), "y": np.zeros(9, np.float32)})
    with pytest.raises(DataError):
        predictor.predict([dyadic_x(10)])


def test_constant_interventions_share_one_compiled_function():
    def model(x, t, y=None):
        w = numpyro.sample("w", dist.Normal())
        with numpyro.plate("rows", x.shape[0]):
            treated = numpyro.sample("t", dist.Bernoulli(0.5), obs=t)
            numpyro.sample("y", dist.Normal(w * x + treated, 0.1), obs=y)

    predictor = Predictor(model, {"w": np.linspace(1, 2, 4)}, rng_key=jax.random.key(0))
    data = {"x": np.arange(6.0, dtype=np.float32), "t": np.zeros(6, np.float32)}
    untreated = predictor.predict(data, batch_size=1000, intervention={"t": 0.0})
    treated = predictor.predict(data, batch_size=1000, intervention={"t": 1.0})
    assert len(predictor._compiled) == 1
    difference = treated["posterior_predictive"]["y"].values - untreated["posterior_predictive"]["y"].values
    np.testing.assert_allclose(difference, 1.0, atol=1e-5)
    predictor.cleanup()


def test_tiles_of_rows_give_the_same_draws(predictor):
    """Every draw of one tile of rows before the next tile: a loop order, not other numbers."""
    tiled = linear_predictor(rows_per_tile=ROWS_PER_KEY)  # 16-row batches: 4 tiles of one block
    data = {"x": dyadic_x(37)}
    reference = predictor.predict(data, batch_size=16)
    tree = tiled.predict(data, batch_size=16)
    for site in ("y", "mu"):
        np.testing.assert_array_equal(
            values(tree, "posterior_predictive", site), values(reference, "posterior_predictive", site)
        )
    tiled.cleanup()


def test_rows_per_tile_must_be_whole_blocks():
    with pytest.raises(ConfigurationError, match="rows_per_tile must be a multiple of rows_per_key=4; got 6"):
        linear_predictor(rows_per_tile=6)


@pytest.mark.parametrize(
    ("site", "draw"),
    [
        ("bernoulli", lambda logits: dist.Bernoulli(logits=logits)),
        ("poisson", lambda logits: dist.Poisson(jnp.exp(logits))),
        ("categorical", lambda logits: dist.Categorical(logits=jnp.stack([logits, -logits, 0 * logits], -1))),
        ("normal", lambda logits: dist.Normal(logits, 0.5)),
    ],
)
def test_log_likelihood_of_discrete_sites_is_stored_as_floats(site, draw, tmp_path):
    """Densities of a discrete site are floats (a truncation to the site's int8 would read
    -1.956 as -1), equal to NumPyro's own log_likelihood."""

    def model(x, y=None):
        w = numpyro.sample("w", dist.Normal())
        with numpyro.plate("data", x.shape[0]):
            numpyro.sample("y", draw(w * x), obs=y)

    x = np.linspace(-2, 2, 50, dtype=np.float32)
    posterior = {"w": np.linspace(0.5, 1.5, 6, dtype=np.float32)}
    y = np.asarray(Predictive(model, posterior)(jax.random.key(0), x=x)["y"][0])
    tree = Predictor(model, posterior).log_likelihood({"x": x, "y": y}, output_dir=tmp_path)
    values = tree["log_likelihood"]["y"].values[0]
    assert values.dtype == np.float32
    expected = numpyro_log_likelihood(model, posterior, x=x, y=y)["y"]
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-6)
    assert not np.all(values == np.round(values))


def test_an_intervention_of_another_length_than_the_rows_is_refused(tmp_path):
    """A value per 1,000-row block, a length that matches nothing: refused, naming the site and
    the shapes that would do, and nothing is written."""

    def model(x, t, y=None):
        beta = numpyro.sample("beta", dist.Normal().expand([2]).to_event(1))
        with numpyro.plate("data", 2000, subsample_size=len(x)):
            t = numpyro.sample("t", dist.Bernoulli(0.5), obs=t)
            numpyro.sample("y", dist.Normal(beta[0] * x + beta[1] * t), obs=y)

    x = np.linspace(-1, 1, 2000, dtype=np.float32)
    predictor = Predictor(model, {"beta": np.ones((4, 2), np.float32)})
    data = {"x": x, "t": np.zeros(2000, np.float32)}
    for value in (np.ones(1000), np.ones((2000, 2)), np.ones(3)):
        with pytest.raises(ConfigurationError, match=r"intervention\['t'\] has shape .* constant of shape \(\)"):
            predictor.predict(data, intervention={"t": value}, output_dir=tmp_path)
    with pytest.raises(ConfigurationError, match=r"intervention\['beta'\] has shape \(3,\).*\(2,\)"):
        predictor.predict(data, intervention={"beta": np.ones(3)}, output_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    per_row = predictor.predict(data, intervention={"t": np.ones(2000)}, output_dir=tmp_path)
    constant = predictor.predict(data, intervention={"t": np.float32(1.0)}, output_dir=tmp_path)
    np.testing.assert_array_equal(
        per_row["posterior_predictive"]["y"].values, constant["posterior_predictive"]["y"].values
    )
    shifted = predictor.predict(data, intervention={"beta": np.array([1.0, 2.0])}, output_dir=tmp_path)
    assert shifted["posterior_predictive"]["y"].shape == (1, 4, 2000)


def test_non_finite_inputs_are_refused_naming_where_they_are(tmp_path):
    def model(x, t, y=None):
        w = numpyro.sample("w", dist.Normal())
        with numpyro.plate("data", 3000, subsample_size=len(x)):
            t = numpyro.sample("t", dist.Normal(), obs=t)
            p = numpyro.deterministic("p", jax.nn.sigmoid(w * x + t))
            numpyro.sample("y", dist.Bernoulli(p), obs=y)

    x = np.linspace(-1, 1, 3000, dtype=np.float32)
    t = np.zeros(3000, np.float32)
    posterior = {"w": np.ones(4, np.float32)}
    predictor = Predictor(model, posterior)
    bad_x = x.copy()
    bad_x[2500] = np.nan  # past the first block of rows
    with pytest.raises(DataError, match=r"data\['x'\] holds nan at row 2500"):
        predictor.predict({"x": bad_x, "t": t}, output_dir=tmp_path)
    bad_t = t.copy()
    bad_t[1234] = np.inf
    with pytest.raises(DataError, match=r"intervention\['t'\] holds inf at row 1234"):
        predictor.predict({"x": x, "t": t}, intervention={"t": bad_t}, output_dir=tmp_path)
    with pytest.raises(DataError, match=r"intervention\['t'\] holds nan at index \(\)"):
        predictor.predict({"x": x, "t": t}, intervention={"t": np.float32(np.nan)}, output_dir=tmp_path)
    with pytest.raises(DataError, match=r"posterior\['w'\] holds nan at draw 2"):
        Predictor(model, {"w": np.array([1, 1, np.nan, 1], np.float32)}).predict({"x": x, "t": t})
    assert list(tmp_path.iterdir()) == []
    # The opt-out lets NaN through, where it shows in the float site.
    loose = Predictor(model, posterior, check_finite=False)
    tree = loose.predict({"x": bad_x, "t": t}, output_dir=tmp_path)
    p = tree["posterior_predictive"]["p"].values[0]
    assert np.isnan(p[:, 2500]).all() and np.isfinite(np.delete(p, 2500, axis=1)).all()


def test_non_finite_values_the_model_computes_stop_at_their_batch(tmp_path):
    """Finite inputs, a model that takes a log of negative numbers from row 2,500 on: the
    batch holding them is refused (p NaN, and y drawn from NaN probabilities, which would read
    as 0), the batches before are kept, and the store stays incomplete."""

    def model(x, y=None):
        w = numpyro.sample("w", dist.Normal())
        with numpyro.plate("data", 3000, subsample_size=len(x)):
            p = numpyro.deterministic("p", jax.nn.sigmoid(w * jnp.log(x)))
            numpyro.sample("y", dist.Bernoulli(p), obs=y)

    x = np.linspace(2.0, 0.1, 3000, dtype=np.float32)
    x[2500:] = -1.0
    y = np.ones(3000, np.float32)
    predictor = Predictor(model, {"w": np.ones(4, np.float32)})
    for return_sites, counted in ((None, "'p': 2,000; 'y': 2,000"), ("y", "'y': 2,000")):
        with pytest.raises(
            NonFinitePredictionError, match=f"rows 2,000 to 3,000 hold non-finite values \\({counted}\\)"
        ):
            predictor.predict({"x": x}, batch_size=1000, return_sites=return_sites, output_dir=tmp_path)
    with pytest.raises(NonFinitePredictionError, match=r"rows 2,000 to 3,000 .*\('y': 2,000\)") as caught:
        predictor.log_likelihood({"x": x, "y": y}, batch_size=1000, output_dir=tmp_path)
    assert caught.value.rows == (2000, 3000) and caught.value.counts == {"y": 2000}
    for store in tmp_path.iterdir():
        with pytest.raises(StoreError, match="incomplete .* after 2000 rows"):
            open_store(store)
    # The opt-out writes them as computed: NaN where the float site is, whatever y got there.
    tree = Predictor(model, {"w": np.ones(4, np.float32)}, check_finite=False).predict({"x": x}, batch_size=1000)
    p = tree["posterior_predictive"]["p"].values[0]
    assert np.isnan(p[:, 2500:]).all() and np.isfinite(p[:, :2500]).all()


def test_an_impossible_observation_keeps_its_log_density_of_minus_infinity():
    def model(x, y=None):
        w = numpyro.sample("w", dist.Uniform(0.2, 0.8))
        with numpyro.plate("data", len(x)):
            numpyro.sample("y", dist.Poisson(w * x), obs=y)

    x = np.ones(10, np.float32)
    x[3] = 0.0  # a rate of 0, one event observed: impossible under every draw
    y = np.ones(10, np.float32)
    posterior = {"w": np.array([0.3, 0.7], np.float32)}
    tree = Predictor(model, posterior).log_likelihood({"x": x, "y": y})
    expected = numpyro_log_likelihood(model, posterior, x=x, y=y)["y"]
    np.testing.assert_array_equal(tree["log_likelihood"]["y"].values[0], expected)
    assert np.isneginf(expected[:, 3]).all() and np.isfinite(np.delete(expected, 3, axis=1)).all()
