"""ImpactModel.train_on_batch: one SVI step, state kept; checked against NumPyro's SVI.update."""

from __future__ import annotations

import jax
import numpy as np
from numpyro.infer.svi import SVIState

from tests.aimz_api.conftest import data, new_model, svi


def test_steps_match_numpyro_and_continue_from_the_kept_state():
    X, t, y = data()
    im = new_model()
    state, loss = im.train_on_batch(X[:500], y[:500], t=t[:500], rng_key=jax.random.key(4))
    assert isinstance(state, SVIState) and loss.shape == ()
    assert not im.is_fitted() and im.vi_result is None  # as in aimz: a step does not fit the model
    reference = svi()
    expected_state = reference.init(jax.random.key(4), X=X[:500], t=t[:500], y=y[:500])
    expected_state, expected = reference.update(expected_state, X=X[:500], t=t[:500], y=y[:500])
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    for _ in range(3):
        state, loss = im.train_on_batch(X[500:1000], y[500:1000], t=t[500:1000])
        expected_state, expected = reference.update(expected_state, X=X[500:1000], t=t[500:1000], y=y[500:1000])
        np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_a_fit_after_steps_continues_from_their_state():
    X, t, y = data()
    im = new_model()
    for _ in range(5):
        state, _ = im.train_on_batch(X, y, t=t)
    im.fit(X, y, t=t, num_samples=2, epochs=1, shuffle=False, progress=False)
    reference = svi()
    reference.init(jax.random.key(0), X=X, t=t, y=y)
    _, expected = reference.update(state, X=X, t=t, y=y)
    np.testing.assert_allclose(im.vi_result.losses, [expected], rtol=1e-5)
