"""Small models and data shared by the tests."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from optax import adam

TRUE_SLOPE, TRUE_INTERCEPT, NOISE = 2.0, -0.5, 0.3


def linear_model(num_rows: int) -> Callable[..., None]:
    """y ~ Normal(w x + b, 0.3) with a minibatch plate and a deterministic ``mu`` site."""

    def model(x, y=None):
        w = numpyro.sample("w", dist.Normal(0.0, 1.0))
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", num_rows, subsample_size=x.shape[0]):
            mu = numpyro.deterministic("mu", w * x + b)
            numpyro.sample("y", dist.Normal(mu, NOISE), obs=y)

    return model


def linear_data(num_rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=num_rows).astype(np.float32)
    y = (TRUE_SLOPE * x + TRUE_INTERCEPT + NOISE * rng.normal(size=num_rows)).astype(np.float32)
    return {"x": x, "y": y}


def linear_svi(num_rows: int, learning_rate: float = 0.05) -> SVI:
    model = linear_model(num_rows)
    return SVI(model, AutoNormal(model), adam(learning_rate), Trace_ELBO())


@pytest.fixture
def make_linear():
    """``make_linear(n) -> (svi, data)`` for a fresh linear regression problem."""

    def make(num_rows: int = 1000, learning_rate: float = 0.05, seed: int = 0):
        return linear_svi(num_rows, learning_rate), linear_data(num_rows, seed)

    return make
