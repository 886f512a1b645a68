"""ImpactModel.log_likelihood: checked against NumPyro's own log_likelihood."""

from __future__ import annotations

import numpy as np
import pytest
from numpyro.infer import log_likelihood

from aimz_trainer.array_data import ArrayDataset, ArrayLoader
from aimz_trainer.errors import DataError
from tests.aimz_api.conftest import NUM_ROWS, model


def test_pointwise_values_equal_numpyros(fitted):
    im, (X, t, y) = fitted
    ll = im.log_likelihood(X, y, t=t, batch_size=500, progress=False)
    assert set(ll.children) >= {"log_likelihood", "posterior"} and "artifact_path" in ll.attrs
    ours = ll["log_likelihood"]["y"].values[0]
    theirs = log_likelihood(model, im.posterior, X=X, t=t, y=y)["y"]
    assert ours.shape == (40, NUM_ROWS)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_y_is_required_with_arrays_and_carried_by_a_loader(fitted):
    im, (X, t, y) = fitted
    with pytest.raises(DataError, match="log_likelihood: y is required"):
        im.log_likelihood(X, t=t)
    import jax

    loader = ArrayLoader(ArrayDataset(X=X[:200], t=t[:200], y=y[:200]), jax.random.key(0), batch_size=100)
    from_loader = im.log_likelihood(loader, store="memory", progress=False)["log_likelihood"]["y"].values
    direct = im.log_likelihood(X[:200], y[:200], t=t[:200], batch_size=100, store="memory", progress=False)
    np.testing.assert_array_equal(from_loader, direct["log_likelihood"]["y"].values)
