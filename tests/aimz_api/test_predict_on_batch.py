"""ImpactModel.predict_on_batch and sample_posterior_predictive[_on_batch]: in-memory trees or
dicts, the same draws as predict for the same key."""

from __future__ import annotations

import jax
import numpy as np


def test_a_loaded_tree_or_a_dict_of_draws_by_rows(fitted):
    im, (X, t, _) = fitted
    key = jax.random.key(7)
    tree = im.predict_on_batch(X[:5], t=t[:5], rng_key=key)
    assert {"posterior", "posterior_predictive"} <= set(tree.children) and "artifact_path" not in tree.attrs
    draws = im.predict_on_batch(X[:5], t=t[:5], rng_key=key, return_datatree=False)
    assert {k: v.shape for k, v in draws.items()} == {"y": (40, 5), "mu": (40, 5)}
    np.testing.assert_array_equal(draws["y"], tree["posterior_predictive"]["y"].values[0])
    streamed = im.predict(X[:5], t=t[:5], rng_key=key, progress=False)
    np.testing.assert_array_equal(streamed["posterior_predictive"]["y"].values[0], draws["y"])
    only_mu = im.predict_on_batch(X[:5], t=t[:5], return_sites="mu", return_datatree=False)
    assert set(only_mu) == {"mu"}


def test_sample_posterior_predictive_is_predict_in_sample(fitted):
    im, (X, t, _) = fitted
    key = jax.random.key(8)
    a = im.sample_posterior_predictive(X[:50], t=t[:50], rng_key=key, progress=False)
    b = im.predict(X[:50], t=t[:50], rng_key=key, in_sample=True, progress=False)
    np.testing.assert_array_equal(a["posterior_predictive"]["y"].values, b["posterior_predictive"]["y"].values)
    c = im.sample_posterior_predictive_on_batch(X[:50], t=t[:50], rng_key=key, return_datatree=False)
    np.testing.assert_array_equal(c["y"], b["posterior_predictive"]["y"].values[0])
