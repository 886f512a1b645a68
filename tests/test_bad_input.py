"""Bad input that used to fail deep inside JAX or NumPyro, or not at all, each refused with an
error of our own that names the cause (issue 16's list)."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from optax import adam

from aimz_trainer import ConfigurationError, DataError, Predictor, Trainer

from .conftest import linear_data, linear_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dense_model(X, y=None):
    """The tutorial's shape: X is (rows, features)."""
    w = numpyro.sample("w", dist.Normal().expand([X.shape[1]]).to_event(1))
    with numpyro.plate("data", 200, subsample_size=X.shape[0]):
        numpyro.sample("y", dist.Normal(X @ w, 1.0), obs=y)


def fit(svi, data, **kwargs):
    return Trainer(max_steps=2, enable_progress_bar=False).fit(svi, data, batch_size=50, **kwargs)


def test_three_dimensional_x_is_refused_in_fit_and_predict_naming_the_shapes(tmp_path):
    X = np.zeros((200, 3, 2), np.float32)
    y = np.zeros(200, np.float32)
    svi = SVI(dense_model, AutoNormal(dense_model), adam(0.01), Trace_ELBO())
    with pytest.raises(DataError, match=r"the model cannot run on a batch of train_data \(X \(50, 3, 2\) float32"):
        fit(svi, {"X": X, "y": y})
    predictor = Predictor(dense_model, {"w": np.ones((4, 3), np.float32)})
    with pytest.raises(DataError, match=r"cannot run on a batch of data \(X \(\d+, 3, 2\) float32\)"):
        predictor.predict({"X": X}, output_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_predict_with_a_missing_or_an_extra_data_key_names_it(tmp_path):
    predictor = Predictor(linear_model(200), {"w": np.ones(4, np.float32), "b": np.zeros(4, np.float32)})
    x = np.zeros(200, np.float32)
    with pytest.raises(DataError, match=r"does not accept the data key\(s\) \['z'\].*parameters are \['x', 'y'\]"):
        predictor.predict({"x": x, "z": x}, output_dir=tmp_path)
    with pytest.raises(DataError, match=r"cannot run on a batch of data \(z .*TypeError: .*'x'"):
        Predictor(lambda x, z=None: linear_model(200)(x), {"w": np.ones(4)}).predict({"z": x}, output_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_posterior_missing_a_site_or_with_a_misnamed_one_is_refused_naming_them(tmp_path):
    model, x = linear_model(200), np.zeros(200, np.float32)
    draws = np.ones(4, np.float32)
    with pytest.raises(ConfigurationError, match=r"latent site\(s\) \['b'\] have no draws.*draws are of \['w'\]"):
        Predictor(model, {"w": draws}).predict({"x": x}, output_dir=tmp_path)
    with pytest.raises(ConfigurationError, match=r"\['bias'\] are not sites of the model; the model's latent"):
        Predictor(model, {"w": draws, "bias": draws}).predict({"x": x}, output_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    # A site given by an intervention needs no draws.
    tree = Predictor(model, {"w": draws}).predict({"x": x}, intervention={"b": np.float32(0.5)}, output_dir=tmp_path)
    np.testing.assert_allclose(tree["posterior_predictive"]["mu"].values, 0.5)


@pytest.mark.parametrize("make", [lambda: 1, lambda: jax.random.split(jax.random.key(0), 2)], ids=["int", "batch"])
def test_a_key_that_is_not_one_key_is_refused_where_it_is_given(make):
    model = linear_model(200)
    with pytest.raises(ConfigurationError, match=r"rng_key must be one key, jax.random.key\(seed\); got"):
        Predictor(model, {"w": np.ones(4)}, rng_key=make())
    with pytest.raises(ConfigurationError, match=r"rng_key must be one key"):
        Trainer(max_steps=1, rng_key=make())


def test_a_guide_built_for_another_model_is_refused_naming_its_sites():
    def other_model(x, y=None):
        slope = numpyro.sample("slope", dist.Normal())
        with numpyro.plate("data", 200, subsample_size=len(x)):
            numpyro.sample("y", dist.Normal(slope * x), obs=y)

    model = linear_model(200)
    svi = SVI(model, AutoNormal(other_model), adam(0.01), Trace_ELBO())
    with pytest.raises(ConfigurationError, match=r"the guide samples sites the model does not have: \{'slope'\}"):
        fit(svi, linear_data(200))


def test_a_hand_written_guide_with_a_wrong_site_shape_is_refused_naming_the_site():
    model = linear_model(200)

    def guide(x, y=None):
        loc = numpyro.param("w_loc", np.zeros(3, np.float32))
        numpyro.sample("w", dist.Normal(loc, 1.0).to_event(1))
        numpyro.sample("b", dist.Normal(numpyro.param("b_loc", 0.0), 1.0))

    with pytest.raises(
        ConfigurationError, match=r"the guide does not fit the model: .*TypeError: mul got incompatible shapes"
    ):
        fit(SVI(model, guide, adam(0.01), Trace_ELBO()), linear_data(200))


def test_the_command_prints_a_library_error_without_a_traceback(tmp_path):
    recipe = tmp_path / "bad_batch.py"
    recipe.write_text(
        "from aimz_trainer import Trainer\n\ndef main(argv):\n    Trainer(max_epochs=0)\n",
    )
    completed = subprocess.run(
        [sys.executable, "-m", "aimz_trainer.cli", "run", str(recipe)], cwd=ROOT, capture_output=True, text=True
    )
    assert completed.returncode == 1
    assert completed.stderr.strip() == (
        "aimz-trainer: ConfigurationError: max_epochs must be a positive int or None; got 0."
    )
