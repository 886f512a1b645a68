"""ImpactModel.fit_on_batch: full-batch SVI steps (continuing a state) or an MCMC run."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from aimz_trainer.errors import ConfigurationError
from tests.aimz_api.conftest import EFFECT, SLOPE, data, new_model, svi


def test_svi_steps_continue_the_state_as_numpyro_would():
    X, t, y = data()
    im = new_model()
    state, _ = im.train_on_batch(X, y, t=t)
    im.fit_on_batch(X, y, t=t, num_steps=4, num_samples=30, progress=False)
    reference = svi()
    reference.init(jax.random.key(0), X=X, t=t, y=y)
    expected = []
    for _ in range(4):
        state, loss = reference.update(state, X=X, t=t, y=y)
        expected.append(float(loss))
    np.testing.assert_allclose(im.vi_result.losses, expected, rtol=1e-5)
    assert im.is_fitted() and im.posterior["w"].shape == (30,)


def test_a_long_fit_recovers_the_coefficients_and_num_steps_is_checked():
    X, t, y = data()
    im = new_model().fit_on_batch(X, y, t=t, num_steps=400, num_samples=50, progress=False)
    assert im.vi_result.losses.shape == (400,)
    assert abs(float(np.mean(im.posterior["w"])) - SLOPE) < 0.05
    assert abs(float(np.mean(im.posterior["tau"])) - EFFECT) < 0.05
    with pytest.raises(ConfigurationError, match="num_steps must be a positive int; got 0"):
        new_model().fit_on_batch(X, y, t=t, num_steps=0)
