"""MCMC through ImpactModel: NUTS via fit_on_batch, chains kept along ``chain``; and the
Predictor fed samples grouped by chain."""

from __future__ import annotations

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import MCMC, NUTS

from aimz_trainer import ImpactModel, Predictor

ROWS, SLOPE, EFFECT, NOISE = 200, 1.5, 0.7, 0.2


def linear(X, t, y=None):
    w = numpyro.sample("w", dist.Normal())
    tau = numpyro.sample("tau", dist.Normal())
    with numpyro.plate("data", X.shape[0]):
        mu = numpyro.deterministic("mu", w * X + tau * t)
        numpyro.sample("y", dist.Normal(mu, NOISE), obs=y)


@pytest.fixture(scope="module")
def mcmc_fitted():
    rng = np.random.default_rng(0)
    X = rng.normal(size=ROWS).astype(np.float32)
    t = rng.integers(0, 2, ROWS).astype(np.float32)
    y = (SLOPE * X + EFFECT * t + NOISE * rng.normal(size=ROWS)).astype(np.float32)
    mcmc = MCMC(
        NUTS(linear), num_warmup=200, num_samples=150, num_chains=2, chain_method="sequential", progress_bar=False
    )
    im = ImpactModel(linear, rng_key=jax.random.key(0), inference=mcmc).fit_on_batch(X, y, t=t)
    yield im, (X, t, y)
    im.cleanup()


def test_nuts_recovers_the_coefficients_and_keeps_its_chains(mcmc_fitted):
    im, (X, t, y) = mcmc_fitted
    assert im.is_fitted() and set(im.posterior) == {"w", "tau"} and im.posterior["w"].shape == (300,)
    # The least-squares fit is the posterior mean here (flat-ish prior, 200 rows).
    design = np.stack([X, t], 1)
    w_hat, tau_hat = np.linalg.lstsq(design, y, rcond=None)[0]
    assert abs(float(np.mean(im.posterior["w"])) - w_hat) < 0.02
    assert abs(float(np.mean(im.posterior["tau"])) - tau_hat) < 0.03
    dt = im.predict(X, t=t, progress=False)
    assert dt["posterior_predictive"]["y"].shape == (2, 150, ROWS)
    np.testing.assert_array_equal(dt["posterior"]["w"].values, im.posterior["w"].reshape(2, 150))
    assert im.describe()["num_chains"] == 2


def test_estimate_effect_is_the_analytic_effect(mcmc_fitted):
    im, (X, _, _) = mcmc_fitted
    effect = im.estimate_effect(
        args_baseline={"X": X, "t": np.zeros(ROWS, np.float32), "progress": False},
        args_intervention={"X": X, "t": np.ones(ROWS, np.float32), "progress": False},
    )
    # mu = w X + tau t: setting t from 0 to 1 moves every row by tau, draw by draw.
    expected = np.repeat(im.posterior["tau"].reshape(2, 150)[..., None], ROWS, 2)
    np.testing.assert_allclose(effect["posterior_predictive"]["mu"].values, expected, atol=1e-5)
    np.testing.assert_allclose(effect["posterior_predictive"]["y"].values, expected, atol=1e-4)


def test_sample_continues_the_chains_and_set_posterior_sample_takes_chains(mcmc_fitted):
    im, (X, t, y) = mcmc_fitted
    more = im.sample(X=X, t=t, y=y, return_datatree=False)
    assert more["w"].shape == (300,) and not np.array_equal(more["w"], im.posterior["w"])
    other = ImpactModel(linear, rng_key=jax.random.key(1), inference=im.inference)
    other.set_posterior_sample(im.posterior, num_chains=2)
    assert other.predict_on_batch(X[:5], t=t[:5])["posterior_predictive"]["y"].shape == (2, 150, 5)


def test_the_predictor_takes_samples_grouped_by_chain(mcmc_fitted):
    im, (X, t, _) = mcmc_fitted
    grouped = im.inference.get_samples(group_by_chain=True)
    predictor = Predictor(linear, grouped, batch_ndims=2, rng_key=jax.random.key(0))
    dt = predictor.predict({"X": X, "t": t}, batch_size=100)
    mu = dt["posterior_predictive"]["mu"].values
    assert mu.shape == (2, 150, ROWS)
    expected = np.asarray(grouped["w"])[..., None] * X + np.asarray(grouped["tau"])[..., None] * t
    np.testing.assert_allclose(mu, expected, rtol=1e-5, atol=1e-5)
    predictor.cleanup()
