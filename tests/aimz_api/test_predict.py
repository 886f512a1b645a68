"""ImpactModel.predict: streamed posterior-predictive draws, fresh per call unless given a key."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import pytest

from aimz_trainer import NotFittedError
from aimz_trainer.array_data import ArrayDataset, ArrayLoader
from aimz_trainer.errors import ConfigurationError, DataError, KernelArgumentError
from tests.aimz_api.conftest import NUM_ROWS, new_model


def test_the_groups_values_and_artifact_path(fitted):
    im, (X, t, _) = fitted
    dt = im.predict(X, t=t, batch_size=500, progress=False)
    assert set(dt.children) >= {"posterior_predictive", "posterior"}
    assert dt["posterior_predictive"]["y"].shape == (1, 40, NUM_ROWS)
    np.testing.assert_array_equal(dt["posterior"]["w"].values[0], im.posterior["w"])
    mu = dt["posterior_predictive"]["mu"].values[0]
    np.testing.assert_allclose(
        mu, im.posterior["w"][:, None] * X + im.posterior["tau"][:, None] * t, rtol=1e-5, atol=1e-5
    )
    assert Path(dt.attrs["artifact_path"]).parent == Path(im.temp_dir) and Path(dt.attrs["artifact_path"]).is_dir()
    assert dt.attrs["shard_axis"] == "obs"


def test_each_call_draws_afresh_unless_given_a_key(fitted):
    im, (X, t, _) = fitted
    first = im.predict(X[:300], t=t[:300], progress=False)["posterior_predictive"]["y"].values
    second = im.predict(X[:300], t=t[:300], progress=False)["posterior_predictive"]["y"].values
    assert not np.array_equal(first, second)
    key = jax.random.key(11)
    a = im.predict(X[:300], t=t[:300], rng_key=key, progress=False)["posterior_predictive"]["y"].values
    b = im.predict(X[:300], t=t[:300], rng_key=key, progress=False)["posterior_predictive"]["y"].values
    np.testing.assert_array_equal(a, b)


def test_store_memory_returns_a_loaded_tree_and_leaves_no_store(fitted):
    im, (X, t, _) = fitted
    im.cleanup()
    dt = im.predict(X[:300], t=t[:300], store="memory", shard_axis="draw", progress=False)
    assert "artifact_path" not in dt.attrs and dt.attrs["shard_axis"] == "draw"
    assert isinstance(dt["posterior_predictive"]["y"].variable._data, np.ndarray)
    assert not [name for name in os.listdir(im.temp_dir) if name.startswith("predict-")]  # the staging store is gone
    out_of_sample = im.predict(X[:10], t=t[:10], in_sample=False, store="memory", progress=False)
    assert "predictions" in out_of_sample.children


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"store": "disk"}, ConfigurationError, "store must be 'persistent' or 'memory'; got 'disk'"),
        ({"shard_axis": "rows"}, ConfigurationError, "shard_axis must be 'obs' or 'draw'; got 'rows'"),
        (
            {"store": "memory", "output_dir": "/tmp/x"},
            ConfigurationError,
            "output_dir must be None with store='memory'",
        ),
        ({"condition": [1.0]}, KernelArgumentError, "condition must map site names to values"),
        ({"intervention": {"zz": 1.0}}, ConfigurationError, r"intervention names \['zz'\]"),
        ({"nope": 1.0}, KernelArgumentError, r"got \['nope'\], which are not parameters of the kernel"),
    ],
)
def test_bad_arguments_are_errors_of_the_reference_librarys_built_in_types(fitted, kwargs, error, message):
    im, (X, t, _) = fitted
    with pytest.raises(error, match=message) as caught:
        im.predict(X[:20], t=t[:20], progress=False, **kwargs)
    assert isinstance(caught.value, TypeError if error is KernelArgumentError else ValueError)


def test_scalar_or_empty_input_and_an_unfitted_model(fitted):
    im, (_, t, _) = fitted
    with pytest.raises(DataError, match="got a scalar"):
        im.predict(np.float32(1.0), t=t)
    with pytest.raises(DataError, match="X has no rows"):
        im.predict(np.zeros(0, np.float32), t=t[:0])
    with pytest.raises(NotFittedError, match="predict needs a fitted model") as caught:
        new_model().predict(np.zeros(10, np.float32), t=np.zeros(10, np.float32))
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, AttributeError)


def test_a_conditioned_site_returns_the_given_values_and_loaders_are_read(fitted):
    im, (X, t, _) = fitted
    history = np.full(50, 7.0, np.float32)
    conditioned = im.predict(
        X[:50], t=t[:50], condition={"y": history}, store="memory", in_sample=False, progress=False
    )
    np.testing.assert_array_equal(conditioned["predictions"]["y"].values[0], np.broadcast_to(history, (40, 50)))
    mu = conditioned["predictions"]["mu"].values[0]
    np.testing.assert_allclose(
        mu, im.posterior["w"][:, None] * X[:50] + im.posterior["tau"][:, None] * t[:50], rtol=1e-5, atol=1e-5
    )
    loader = ArrayLoader(ArrayDataset(X=X[:300], t=t[:300]), jax.random.key(0), batch_size=100)
    key = jax.random.key(2)
    from_loader = im.predict(loader, rng_key=key, store="memory", progress=False)
    from_arrays = im.predict(X[:300], t=t[:300], batch_size=100, rng_key=key, store="memory", progress=False)
    np.testing.assert_array_equal(
        from_loader["posterior_predictive"]["y"].values, from_arrays["posterior_predictive"]["y"].values
    )
    batches = [{"X": X[i : i + 100], "t": t[i : i + 100]} for i in range(0, 300, 100)]
    from_batches = im.predict(batches, batch_size=100, rng_key=key, store="memory", progress=False)
    np.testing.assert_array_equal(
        from_batches["posterior_predictive"]["y"].values, from_arrays["posterior_predictive"]["y"].values
    )
