"""ImpactModel.sample_prior_predictive[_on_batch]: draws from the prior, no fit needed."""

from __future__ import annotations

import jax
import numpy as np


def test_prior_draws_need_no_fit_and_default_to_1000():
    from tests.aimz_api.conftest import new_model

    im = new_model()
    zeros = np.zeros(100, np.float32)
    prior = im.sample_prior_predictive(zeros, t=zeros, progress=False)
    w = prior["prior"]["w"].values[0]
    assert w.shape == (1000,) and 0.9 < np.std(w) < 1.1  # Normal(0, 1)
    assert prior["prior_predictive"]["y"].shape == (1, 1000, 100)
    im.cleanup()


def test_an_intervention_and_the_on_batch_dict(fitted):
    im, (X, t, _) = fitted
    ones = np.ones(20, np.float32)
    treated = im.sample_prior_predictive_on_batch(
        X[:20], t=t[:20], intervention={"t": ones}, num_samples=50, rng_key=jax.random.key(3), return_datatree=False
    )
    assert treated["y"].shape == (50, 20)
    control = im.sample_prior_predictive_on_batch(
        X[:20], t=t[:20], intervention={"t": 0 * ones}, num_samples=50, rng_key=jax.random.key(3), return_datatree=False
    )
    prior = im.sample_prior_predictive(X[:20], t=t[:20], num_samples=50, rng_key=jax.random.key(3), progress=False)
    tau = prior["prior"]["tau"].values[0]
    np.testing.assert_allclose(treated["mu"] - control["mu"], np.repeat(tau[:, None], 20, 1), atol=1e-5)
