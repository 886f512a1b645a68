"""ImpactModel.set_posterior_sample (and the posterior setter): draws made elsewhere enable the
predictive methods, with chains along ``chain``."""

from __future__ import annotations

import numpy as np
import pytest

from aimz_trainer import AimzWarning
from aimz_trainer.errors import ConfigurationError
from tests.aimz_api.conftest import new_model


def test_draws_enable_predict_and_keep_their_chains():
    X = np.linspace(-1, 1, 30, dtype=np.float32)
    t = np.ones(30, np.float32)
    w, tau = np.linspace(1, 2, 12, dtype=np.float32), np.full(12, 0.5, np.float32)
    im = new_model().set_posterior_sample({"w": w, "tau": tau}, num_chains=3)
    assert im.is_fitted() and im.describe()["num_chains"] == 3
    dt = im.predict(X, t=t, store="memory", progress=False)
    mu = dt["posterior_predictive"]["mu"]
    assert mu.shape == (3, 4, 30)
    np.testing.assert_allclose(mu.values.reshape(12, 30), w[:, None] * X + 0.5, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(dt["posterior"]["w"].values.ravel(), w)
    other = new_model()
    other.posterior = {"w": w, "tau": tau}
    assert other.is_fitted() and other.predict_on_batch(X, t=t, return_datatree=False)["mu"].shape == (12, 30)


def test_the_output_is_removed_with_a_warning_and_bad_draws_are_refused():
    with pytest.warns(AimzWarning, match="the output site 'y' is removed"):
        im = new_model().set_posterior_sample({"w": np.ones(4), "tau": np.ones(4), "y": np.ones((4, 3))})
    assert set(im.posterior) == {"w", "tau"}
    for draws, message in [
        ({}, "holds no draws"),
        ({"chain": np.ones(3)}, r"\['chain'\] are dimensions"),
        ({"w": np.float32(1)}, "are scalars"),
        ({"w": np.ones(3), "tau": np.ones(4)}, "differ in length"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            new_model().set_posterior_sample(draws)
    with pytest.raises(ConfigurationError, match="num_chains must be a positive int dividing the 5 draws"):
        new_model().set_posterior_sample({"w": np.ones(5)}, num_chains=2)
