"""The trees the Predictor returns are what ArviZ's own converters give (ArviZ 1.3): integer
coordinates on every dim, ArviZ's group attributes, deterministic sites where
``arviz.from_numpyro`` puts them; ArviZ's functions run on them as they are; a fitted
ImpactModel's guide works with ``arviz.from_numpyro_svi``; stores read as dask arrays and are
cut into blocks of draws."""

from __future__ import annotations

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import zarr
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from optax import adam

from aimz_trainer import ImpactModel, Predictor
from aimz_trainer import store as store_module
from aimz_trainer.errors import ConfigurationError
from aimz_trainer.store import ArraySpec, ZarrStore
from aimz_trainer.store_reading import COMPLETE, open_store, verify_store

NUM_ROWS, NUM_DRAWS = 60, 100  # enough draws for loo's Pareto smoothing
GROUP_ATTRS = {
    "created_at", "creation_library", "creation_library_version", "creation_library_language",
    "inference_library", "inference_library_version", "sample_dims",
}  # fmt: skip


def model(X, y=None):
    w = numpyro.sample("w", dist.Normal(jnp.zeros(2), 1.0).to_event(1))
    numpyro.deterministic("w2", 2 * w)  # global: with the draws, as from_numpyro has it
    with numpyro.plate("data", NUM_ROWS, subsample_size=X.shape[0]):
        mu = numpyro.deterministic("mu", X @ w)  # per row: with the predictions
        numpyro.sample("y", dist.Normal(mu, 0.5), obs=y)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(NUM_ROWS, 2)).astype(np.float32)
    return X, (X @ np.array([1.0, -1.0]) + 0.5 * rng.normal(size=NUM_ROWS)).astype(np.float32)


@pytest.fixture(scope="module")
def fitted(data):
    X, y = data
    svi = SVI(model, AutoNormal(model), adam(0.05), Trace_ELBO())
    im = ImpactModel(model, rng_key=jax.random.key(0), inference=svi)
    im.fit(X, y, num_samples=NUM_DRAWS, batch_size=20, epochs=3, progress=False)
    yield im
    im.cleanup()


@pytest.fixture(scope="module")
def trees(fitted, data):
    X, y = data
    # The Predictor takes the observed y along (group observed_data, what plot_ppc_dist compares
    # with); ImpactModel.predict, like the reference library's, takes no y.
    predictor = Predictor(
        model, fitted.posterior, rng_key=jax.random.key(1), guide=fitted.inference.guide, params=fitted.vi_result.params
    )
    predicted = predictor.predict({"X": X, "y": y})
    log_likelihood = fitted.log_likelihood(X, y, progress=False)
    return predicted, log_likelihood


def test_every_dim_has_an_integer_coordinate_and_every_group_arviz_attrs(trees):
    for tree in trees:
        for node in tree.subtree:
            if node.is_root:
                assert node.attrs[COMPLETE] is True and "aimz_trainer_fingerprint" in node.attrs
                continue
            assert set(node.attrs) >= GROUP_ATTRS, node.path
            assert (node.attrs["creation_library"], node.attrs["inference_library"]) == ("aimz_trainer", "numpyro")
            assert node.attrs["inference_library_version"] == numpyro.__version__
            assert node.attrs["sample_dims"] == ([] if node.name == "observed_data" else ["chain", "draw"])
            for dim, size in node.dataset.sizes.items():
                assert node.coords[dim].dtype == np.int64, (node.path, dim)
                np.testing.assert_array_equal(node.coords[dim].values, np.arange(size))
    predicted, _ = trees
    assert set(predicted.children) == {"posterior", "posterior_predictive", "observed_data"}
    assert predicted["posterior"]["w"].dims == ("chain", "draw", "w_dim_0")
    assert predicted["posterior_predictive"]["y"].dims == ("chain", "draw", "data")


def test_deterministic_sites_sit_where_from_numpyro_puts_them(trees, fitted, data):
    predicted, log_likelihood = trees
    posterior = predicted["posterior"]
    # Global: in the posterior, computed from every draw (not from the fit's prototype batch).
    np.testing.assert_allclose(posterior["w2"].values, 2 * posterior["w"].values, rtol=1e-6)
    assert posterior["w2"].dims == ("chain", "draw", "w2_dim_0") and "w2" in log_likelihood["posterior"]
    # Per row: with the predictions, one value per row and draw.
    X, _ = data
    expected = np.einsum("rk,cdk->cdr", X, posterior["w"].values)
    np.testing.assert_allclose(predicted["posterior_predictive"]["mu"].values, expected, rtol=1e-5, atol=1e-6)
    assert set(predicted["posterior_predictive"].data_vars) == {"mu", "y"}
    prior = fitted.sample_prior_predictive(X, num_samples=5, progress=False)
    np.testing.assert_allclose(prior["prior"]["w2"].values, 2 * prior["prior"]["w"].values, rtol=1e-6)
    assert set(prior["prior_predictive"].data_vars) == {"mu", "y"}
    with pytest.raises(ConfigurationError, match="global deterministic"):
        fitted.predict(X, return_sites=["w2"], progress=False)


def test_arviz_functions_run_on_the_trees_as_they_are(trees):
    pytest.importorskip("matplotlib").use("Agg")  # in the dev group: skipped only outside it
    predicted, log_likelihood = trees
    loo = az.loo(log_likelihood)
    assert np.isfinite(loo.elpd) and loo.n_data_points == NUM_ROWS
    summary = az.summary(predicted, var_names=["w"])
    assert list(summary.index) == ["w[0]", "w[1]"] and np.isfinite(summary["mean"]).all()
    plots = az.plot_ppc_dist(predicted, var_names=["y"], backend="matplotlib", num_samples=5)
    assert plots is not None


def test_from_numpyro_svi_works_on_a_fitted_impact_model(fitted, data):
    X, y = data
    tree = az.from_numpyro_svi(
        fitted.inference, svi_result=fitted.vi_result, model_kwargs={"X": X, "y": y}, num_samples=7
    )
    assert tree["posterior"]["w"].shape == (7, 2)
    np.testing.assert_allclose(tree["posterior"]["w"].mean("sample"), fitted.posterior["w"].mean(0), atol=0.5)


def test_a_set_up_guide_does_not_change_the_next_fit(fitted, data):
    """The compiled fit sets the guide up afresh inside its trace: a refit of the same model
    with the same key gives the same parameters, whether the guide was set up in between."""
    X, y = data
    params = {name: np.asarray(value) for name, value in fitted.vi_result.params.items()}
    again = ImpactModel(model, rng_key=jax.random.key(0), inference=fitted.inference)
    again.fit(X, y, num_samples=NUM_DRAWS, batch_size=20, epochs=3, progress=False)
    for name, value in again.vi_result.params.items():
        np.testing.assert_array_equal(np.asarray(value), params[name], err_msg=name)


def test_dask_backed_reading_gives_dask_arrays_of_the_same_values(fitted, data, tmp_path):
    dask_array = pytest.importorskip("dask.array")  # in the dev group: skipped only outside it
    X, _ = data
    predictor = Predictor(model, fitted.posterior, rng_key=jax.random.key(3), rows_per_key=4)
    lazy = predictor.predict({"X": X}, batch_size=32, output_dir=tmp_path)
    chunked = predictor.predict({"X": X}, batch_size=32, output_dir=tmp_path, chunks={})
    assert isinstance(chunked["posterior_predictive"]["y"].data, dask_array.Array)
    assert chunked["posterior_predictive"]["y"].chunks == ((1,), (NUM_DRAWS,), (32, NUM_ROWS - 32))
    np.testing.assert_array_equal(chunked["posterior_predictive"]["y"].values, lazy["posterior_predictive"]["y"].values)
    reopened = open_store(lazy.attrs["store_path"], chunks={})
    assert isinstance(reopened["posterior"]["w"].data, dask_array.Array)
    np.testing.assert_array_equal(reopened["posterior"]["w"].values, lazy["posterior"]["w"].values)
    predictor.cleanup()


def test_blocks_are_cut_along_the_draws_and_every_one_is_written(fitted, data, tmp_path, monkeypatch):
    """With blocks of at most 5,120 bytes, 32 rows x 100 draws of float32 (12,800 bytes) are
    three blocks of 34 draws (the last 32): the values equal a store of blocks of every draw, and
    every block is on the disk."""
    X, _ = data
    predictor = Predictor(model, fitted.posterior, rng_key=jax.random.key(3), rows_per_key=4)
    whole = predictor.predict({"X": X}, batch_size=32, output_dir=tmp_path / "whole")
    monkeypatch.setattr(store_module, "BLOCK_BYTES", 5120)
    cut = predictor.predict({"X": X}, batch_size=32, output_dir=tmp_path / "cut")
    array = zarr.open_group(cut.attrs["store_path"], mode="r")["posterior_predictive/y"]
    assert array.chunks == (1, 34, 32) and array.cdata_shape == (1, 3, 2)
    np.testing.assert_array_equal(cut["posterior_predictive"]["y"].values, whole["posterior_predictive"]["y"].values)
    blocks = {path.parts[-3:] for path in (tmp_path / "cut").glob("*/posterior_predictive/y/c/*/*/*")}
    assert blocks == {("0", str(draws), str(rows)) for draws in range(3) for rows in range(2)}
    assert verify_store(cut.attrs["store_path"]) > 3 * 2  # every block of every array reads back intact
    predictor.cleanup()


def test_a_resumed_store_checks_every_block_of_draws(tmp_path, monkeypatch):
    """A damaged block of draws of a written batch makes a resume compute that batch again."""
    monkeypatch.setattr(store_module, "BLOCK_BYTES", 64)
    spec = ArraySpec("predictions", "p", (1, 8, 6), np.dtype(np.float32), ("chain", "draw", "obs"), 2, draw_axis=1)
    assert spec.chunks(4) == (1, 4, 4)  # 8 draws x 4 rows x 4 bytes = 128 bytes: two blocks of draws
    path = tmp_path / "store"
    store = ZarrStore(path, [spec], batch_size=4)
    store.write_batch(0, 4, {("predictions", "p"): np.ones((1, 8, 4), np.float32)})
    store.flush()
    blocks = store.chunk_paths(("predictions", "p"), 0)
    assert store.rows_written == 4 and [path.parts[-3:] for path in blocks] == [("0", "0", "0"), ("0", "1", "0")]
    blocks[1].write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="computed again"):
        resumed = ZarrStore(path, [spec], batch_size=4, resume=True)
    assert resumed.rows_written == 0
    resumed.abort()
