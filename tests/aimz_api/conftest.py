"""A small causal model and one fitted ImpactModel shared by the per-method tests of the
reference library's API (one module per ImpactModel method)."""

from __future__ import annotations

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from optax import adam

from aimz_trainer import ImpactModel

NUM_ROWS, SLOPE, EFFECT, NOISE = 2000, 2.0, 1.0, 0.1


def model(X, t, *, y=None):
    """y ~ Normal(w X + tau t, 0.1); ``t`` is a treatment to intervene on, ``mu`` deterministic."""
    w = numpyro.sample("w", dist.Normal())
    tau = numpyro.sample("tau", dist.Normal())
    with numpyro.plate("data", NUM_ROWS, subsample_size=len(X)):
        treatment = numpyro.sample("t", dist.Bernoulli(0.5), obs=t)
        mu = numpyro.deterministic("mu", w * X + tau * treatment)
        numpyro.sample("y", dist.Normal(mu, NOISE), obs=y)


def data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=NUM_ROWS).astype(np.float32)
    t = rng.integers(0, 2, NUM_ROWS).astype(np.float32)
    y = (SLOPE * X + EFFECT * t + NOISE * rng.normal(size=NUM_ROWS)).astype(np.float32)
    return X, t, y


def svi() -> SVI:
    return SVI(model, AutoNormal(model), adam(0.05), Trace_ELBO())


def new_model(rng_key=None) -> ImpactModel:
    return ImpactModel(model, rng_key=jax.random.key(0) if rng_key is None else rng_key, inference=svi())


@pytest.fixture(scope="session")
def fitted():
    """A model fitted on ``data()``: 8 epochs of batches of 200, 40 posterior draws."""
    X, t, y = data()
    im = new_model().fit(X, y, t=t, num_samples=40, batch_size=200, epochs=8, progress=False)
    yield im, (X, t, y)
    im.cleanup()
