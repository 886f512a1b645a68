"""ImpactModel.estimate_effect: every site's difference under the predictive group, with the
posterior, as aimz 0.17.0 returns it; draws of scenarios computed here are paired."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from aimz_trainer import NotFittedError, OutputWarning
from aimz_trainer.errors import ConfigurationError
from tests.aimz_api.conftest import NUM_ROWS, new_model


def test_scenarios_from_arguments_share_a_key_so_the_effect_is_exact(fitted):
    im, (X, t, _) = fitted
    effect = im.estimate_effect(
        args_baseline={"X": X, "t": t, "intervention": {"t": 0.0}, "batch_size": 500, "progress": False},
        args_intervention={"X": X, "t": t, "intervention": {"t": 1.0}, "batch_size": 500, "progress": False},
    )
    assert set(effect.children) == {"posterior_predictive", "posterior"}
    assert set(effect["posterior_predictive"].data_vars) == {"y", "mu"}
    tau = np.repeat(im.posterior["tau"][:, None], NUM_ROWS, 1)
    np.testing.assert_allclose(effect["posterior_predictive"]["y"].values[0], tau, atol=1e-4)
    np.testing.assert_allclose(effect["posterior_predictive"]["mu"].values[0], tau, atol=1e-5)
    np.testing.assert_array_equal(effect["posterior"]["tau"].values[0], im.posterior["tau"])
    assert {"artifact_path_baseline", "artifact_path_intervention"} <= set(effect.attrs)


def test_trees_drawn_with_different_keys_warn_and_on_batch_works(fitted):
    im, (X, t, _) = fitted
    baseline = im.predict(X[:100], t=t[:100], intervention={"t": 0.0}, progress=False)
    treated = im.predict(X[:100], t=t[:100], intervention={"t": 1.0}, progress=False)
    with pytest.warns(OutputWarning, match="different random keys"):
        effect = im.estimate_effect(baseline, treated)
    np.testing.assert_allclose(
        effect["posterior_predictive"]["mu"].values[0], np.repeat(im.posterior["tau"][:, None], 100, 1), atol=1e-5
    )
    key = jax.random.key(0)
    on_batch = im.estimate_effect(
        args_baseline={"X": X[:10], "t": t[:10], "intervention": {"t": 0.0}, "rng_key": key},
        args_intervention={"X": X[:10], "t": t[:10], "intervention": {"t": 1.0}, "rng_key": key},
        on_batch=True,
    )
    assert on_batch["posterior_predictive"]["y"].shape == (1, 40, 10) and "artifact_path_baseline" not in on_batch.attrs


def test_missing_scenarios_and_an_unfitted_model(fitted):
    im, (X, t, _) = fitted
    baseline = im.predict(X[:10], t=t[:10], progress=False)
    with pytest.raises(ConfigurationError, match="pass output_intervention"):
        im.estimate_effect(baseline)
    with pytest.raises(NotFittedError):
        new_model().estimate_effect(args_baseline={"X": X[:3], "t": t[:3]}, args_intervention={"X": X[:3], "t": t[:3]})
