"""ImpactModel.sample: posterior draws from the fitted guide, as a tree or a dict."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from aimz_trainer import NotFittedError, OutputWarning
from tests.aimz_api.conftest import SLOPE, new_model


def test_draws_of_the_latent_sites_as_a_tree_with_integer_coords_or_a_dict(fitted):
    im, _ = fitted
    tree = im.sample(num_samples=7)
    posterior = tree["posterior"]
    assert set(posterior.data_vars) == {"w", "tau"} and posterior["w"].dims == ("chain", "draw")
    np.testing.assert_array_equal(posterior["draw"].values, np.arange(7))
    np.testing.assert_array_equal(posterior["chain"].values, [0])
    draws = im.sample(num_samples=500, return_datatree=False)
    assert {k: v.shape for k, v in draws.items()} == {"w": (500,), "tau": (500,)}
    assert abs(float(draws["w"].mean()) - SLOPE) < 0.1  # the fixture's fit is short
    same = im.sample(num_samples=5, rng_key=jax.random.key(1), return_datatree=False)
    again = im.sample(num_samples=5, rng_key=jax.random.key(1), return_datatree=False)
    np.testing.assert_array_equal(same["w"], again["w"])
    fresh = im.sample(num_samples=5, return_datatree=False)
    assert not np.array_equal(fresh["w"], same["w"])


def test_return_sites_and_an_unfitted_model():
    with pytest.raises(NotFittedError, match="sample needs an SVI state"):
        new_model().sample()


def test_a_missing_return_site_warns(fitted):
    im, _ = fitted
    with pytest.warns(OutputWarning, match=r"\['nope'\] are not in the posterior samples"):
        draws = im.sample(num_samples=3, return_sites=["w", "nope"], return_datatree=False)
    assert set(draws) == {"w"}
