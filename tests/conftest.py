"""Small models and data shared by the tests."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from optax import adam

from aimz_trainer import Callback, make_mesh
from tests.predictor_worker import ROWS_PER_KEY, dyadic_posterior
from tests.predictor_worker import linear_model as dyadic_model

# One XLA compilation cache for the session and every subprocess it starts (they inherit the
# environment): the suite compiles the same few programs hundreds of times, and an executable
# read from the cache is the one the compile would give, so results are unchanged. Set before
# the first compile (conftest loads before any test); removed at exit by the process that made
# it. A worker that imports this module (and may be killed) uses the directory it inherited; a
# cache directory of the user's own is never written to.
if "AIMZ_TESTS_XLA_CACHE" not in os.environ:
    os.environ["AIMZ_TESTS_XLA_CACHE"] = tempfile.mkdtemp(prefix="aimz-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["AIMZ_TESTS_XLA_CACHE"], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["AIMZ_TESTS_XLA_CACHE"]
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
for _flag, _kind in [
    ("jax_compilation_cache_dir", str),
    ("jax_persistent_cache_min_compile_time_secs", float),
    ("jax_persistent_cache_min_entry_size_bytes", int),
]:
    jax.config.update(_flag, _kind(os.environ[_flag.upper()]))

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


LOCAL_NOISE, LOCAL_SLOPE = 0.05, 0.5


def local_model(num_rows: int) -> Callable[..., None]:
    """``b`` global; one latent ``z`` per row, observed through ``y = z + b x`` with little noise."""

    def model(x, y=None):
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", num_rows, subsample_size=len(x)):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            numpyro.sample("y", dist.Normal(z + b * x, LOCAL_NOISE), obs=y)

    return model


def local_data(num_rows: int, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``({"x", "y"}, z)``: standard normal ``x`` and ``z``, ``y = z + 0.5 x + noise``."""
    rng = np.random.default_rng(seed)
    x, z = rng.normal(size=(2, num_rows)).astype(np.float32)
    y = (z + LOCAL_SLOPE * x + LOCAL_NOISE * rng.normal(size=num_rows)).astype(np.float32)
    return {"x": x, "y": y}, z


@pytest.fixture
def make_linear():
    """``make_linear(n) -> (svi, data)`` for a fresh linear regression problem."""

    def make(num_rows: int = 1000, learning_rate: float = 0.05, seed: int = 0):
        return linear_svi(num_rows, learning_rate), linear_data(num_rows, seed)

    return make


class Recorder(Callback):
    """Records every hook call as (hook, step, epoch)."""

    def __init__(self, stop_after_chunks: int | None = None) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.chunks: list[tuple[np.ndarray, range]] = []
        self.stop_after_chunks = stop_after_chunks

    def _record(self, hook, progress):
        self.calls.append((hook, progress.step, progress.epoch))

    def on_fit_start(self, trainer, progress):
        self._record("fit_start", progress)

    def on_train_epoch_start(self, trainer, progress):
        self._record("epoch_start", progress)

    def on_train_chunk_end(self, trainer, progress, losses, steps):
        self._record("chunk_end", progress)
        self.chunks.append((losses, steps))
        if self.stop_after_chunks is not None and len(self.chunks) >= self.stop_after_chunks:
            trainer.request_stop()

    def on_validation_end(self, trainer, progress):
        self._record("validation_end", progress)

    def on_train_epoch_end(self, trainer, progress):
        self._record("epoch_end", progress)

    def on_fit_end(self, trainer, progress):
        self._record("fit_end", progress)

    def on_exception(self, trainer, progress, exception):
        self._record(f"exception:{type(exception).__name__}", progress)

    def teardown(self, trainer):
        self.calls.append(("teardown", -1, -1))


@pytest.fixture(scope="module")
def dyadic_predictor():
    """A one-device Predictor of the dyadic linear problem (tests.predictor_worker), whose draws
    are exact in float32: stores written by it compare bit for bit."""
    # Imported here: Predictor pulls in xarray and pandas (3 s of CPU), which the worker processes
    # that import this module for its models do not need.
    from aimz_trainer import Predictor

    predictor = Predictor(
        dyadic_model, dyadic_posterior(), mesh=make_mesh(1), rng_key=jax.random.key(7), rows_per_key=ROWS_PER_KEY
    )
    yield predictor
    predictor.cleanup()
