"""ImpactModel.fit: minibatch SVI through the Trainer, continued across calls, as in aimz 0.17.0."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from numpyro.infer import MCMC, NUTS
from numpyro.infer.svi import SVIRunResult

from aimz_trainer import CSVLogger, ImpactModel, Trainer
from aimz_trainer.array_data import ArrayDataset, ArrayLoader
from aimz_trainer.errors import DataError, KernelArgumentError
from tests.aimz_api.conftest import EFFECT, NUM_ROWS, SLOPE, data, model, new_model


def test_fit_returns_the_model_with_vi_result_and_a_posterior_of_latent_sites(fitted):
    im, _ = fitted
    assert im.is_fitted() and isinstance(im.vi_result, SVIRunResult)
    assert im.vi_result.losses.shape == (8 * NUM_ROWS // 200,)
    assert im.vi_result.losses[-1] < im.vi_result.losses[0]
    assert set(im.vi_result.params) >= {"w_auto_loc", "tau_auto_loc"}
    assert set(im.posterior) == {"w", "tau"}  # no deterministic site at a prototype batch's shape
    assert im.posterior["w"].shape == (40,)
    assert abs(float(np.mean(im.posterior["w"])) - SLOPE) < 0.1  # 80 steps: near, not converged
    assert abs(float(np.mean(im.posterior["tau"])) - EFFECT) < 0.1
    assert isinstance(im.trainer, Trainer) and im.trainer.mesh is im.mesh


def test_a_second_fit_continues_from_the_svi_state():
    X, t, y = data()
    im = new_model()
    im.fit(X, y, t=t, num_samples=2, batch_size=NUM_ROWS, epochs=3, shuffle=False, progress=False)
    first = im.vi_result
    im.fit(X, y, t=t, num_samples=2, batch_size=NUM_ROWS, epochs=2, shuffle=False, progress=False)
    # NumPyro's own SVI, continued from the first fit's state, gives the second fit's losses.
    svi = im.inference
    svi.init(jax.random.key(1), X=X, t=t, y=y)
    state, expected = first.state, []
    for _ in range(2):
        state, loss = svi.update(state, X=X, t=t, y=y)
        expected.append(float(loss))
    np.testing.assert_allclose(im.vi_result.losses, expected, rtol=1e-5)
    assert im.vi_result.losses.shape == (2,)  # this fit's losses, as in aimz


def test_each_fit_without_rng_key_draws_a_fresh_key_and_the_same_key_repeats():
    X, t, y = data()
    a = new_model().fit(X, y, t=t, num_samples=3, batch_size=500, progress=False)
    b = new_model().fit(X, y, t=t, num_samples=3, batch_size=500, progress=False)
    np.testing.assert_array_equal(a.vi_result.losses, b.vi_result.losses)  # the same model key
    key_before = jax.random.key_data(a.rng_key)
    c = new_model().fit(X, y, t=t, num_samples=3, batch_size=500, progress=False, rng_key=jax.random.key(5))
    assert not np.array_equal(c.vi_result.losses, a.vi_result.losses)
    assert not np.array_equal(key_before, jax.random.key_data(jax.random.key(0)))  # the model key advanced


def test_fit_without_y_is_a_value_error_and_mcmc_is_a_type_error():
    X, t, _ = data()
    with pytest.raises(DataError, match="fit: y is required when X is an array") as caught:
        new_model().fit(X, t=t, progress=False)
    assert isinstance(caught.value, ValueError)
    mcmc = ImpactModel(model, rng_key=jax.random.key(0), inference=MCMC(NUTS(model), num_warmup=2, num_samples=2))
    with pytest.raises(TypeError, match="use fit_on_batch"):
        mcmc.fit(X, np.zeros_like(X), t=t, progress=False)


def test_aimz_keywords_are_the_methods_and_unknown_or_reserved_ones_are_type_errors():
    X, t, y = data()
    im = new_model().fit(X, y, t=t, rng_key=jax.random.key(2), num_samples=2, progress=False)  # rng_key is fit's
    assert im.is_fitted()
    with pytest.raises(KernelArgumentError, match=r"got \['learning_rate'\], which are not parameters of the kernel"):
        new_model().fit(X, y, t=t, learning_rate=0.1)
    with pytest.raises(TypeError, match=r"\['y'\] are set by the method"):
        im.predict(X, t=t, y=y)


def test_trainer_and_fit_arguments_and_callbacks_pass_through(tmp_path):
    X, t, y = data()
    held_out = dict(zip(("X", "t", "y"), data(seed=1), strict=True))
    im = new_model().fit(
        X, y, t=t, num_samples=5, batch_size=500, epochs=2, progress=False,
        callbacks=[CSVLogger(tmp_path / "metrics.csv")], log_every_n_steps=1, val_data=held_out,
    )  # fmt: skip
    assert "val_loss" in im.trainer.callback_metrics
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert sum(",train_loss," in line for line in lines) == 8  # logged every step


def test_an_array_loader_gives_the_data_batch_size_and_shuffle():
    X, t, y = data()
    loader = ArrayLoader(ArrayDataset(X=X, t=t, y=y), jax.random.key(0), batch_size=250, shuffle=True)
    im = new_model().fit(loader, num_samples=5, epochs=10, progress=False)
    assert im.vi_result.losses.shape == (10 * NUM_ROWS // 250,)
    assert abs(float(np.mean(im.posterior["w"])) - SLOPE) < 0.1
    with pytest.raises(TypeError, match="y must be None when X is a data loader"):
        new_model().fit(loader, y)


def test_a_kernel_argument_that_is_not_one_row_per_observation_is_passed_whole():
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoNormal
    from optax import adam

    def scaled(X, scale, y=None):
        w = numpyro.sample("w", dist.Normal())
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Normal(w * X * scale[0], 0.1), obs=y)

    X = np.linspace(-1, 1, 300, dtype=np.float32)
    im = ImpactModel(
        scaled, rng_key=jax.random.key(0), inference=SVI(scaled, AutoNormal(scaled), adam(0.05), Trace_ELBO())
    )
    im.fit(X, 3 * X, scale=np.array([3.0, 0.0], np.float32), num_samples=20, epochs=300, progress=False)
    assert abs(float(np.mean(im.posterior["w"])) - 1.0) < 0.05  # w * 3 = 3
    predicted = im.predict_on_batch(X, scale=np.array([3.0, 0.0], np.float32), return_datatree=False)["y"]
    np.testing.assert_allclose(predicted.mean(0), 3 * X, atol=0.1)  # 20 draws of noise 0.1
