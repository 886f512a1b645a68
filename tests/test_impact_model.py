"""ImpactModel: the reference library's API on the Trainer and the Predictor."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.svi import SVIRunResult
from optax import adam

from aimz_trainer import CSVLogger, ImpactModel, NotFittedError, Trainer
from aimz_trainer.errors import ConfigurationError

NUM_ROWS, SLOPE, NOISE = 2000, 2.0, 0.1


def model(X, t, *, y=None):
    """y ~ Normal(w X + tau t, 0.1); ``t`` is a treatment to intervene on."""
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
    y = (SLOPE * X + 1.0 * t + NOISE * rng.normal(size=NUM_ROWS)).astype(np.float32)
    return X, t, y


def svi() -> SVI:
    return SVI(model, AutoNormal(model), adam(0.05), Trace_ELBO())


def new_model(rng_key=None) -> ImpactModel:
    return ImpactModel(model, rng_key=jax.random.key(0) if rng_key is None else rng_key, inference=svi())


@pytest.fixture(scope="module")
def fitted():
    X, t, y = data()
    im = new_model().fit(X, y, t=t, num_samples=40, batch_size=200, epochs=8, progress=False)
    yield im, (X, t, y)
    im.cleanup()


class TestConstruction:
    def test_a_legacy_uint32_key_is_converted_with_a_warning(self):
        with pytest.warns(UserWarning, match="legacy uint32 key"):
            im = new_model(jax.random.PRNGKey(3))
        assert jax.dtypes.issubdtype(im.rng_key.dtype, jax.dtypes.prng_key)
        np.testing.assert_array_equal(jax.random.key_data(im.rng_key), jax.random.key_data(jax.random.key(3)))

    def test_anything_but_an_svi_is_a_type_error(self):
        with pytest.raises(TypeError, match=r"inference must be a numpyro.infer.SVI .* got MCMC"):
            ImpactModel(model, rng_key=jax.random.key(0), inference=MCMC(NUTS(model), num_warmup=1, num_samples=1))

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"rng_key": 7}, r"rng_key must be one key, jax.random.key\(seed\); got 7"),
            (
                {"param_input": "Z"},
                r"param_input='Z' is not a parameter of the kernel; its parameters are \['X', 't', 'y'\]",
            ),
        ],
    )
    def test_bad_arguments_name_what_was_expected(self, kwargs, message):
        arguments = {"rng_key": jax.random.key(0), "inference": svi(), **kwargs}
        with pytest.raises(ConfigurationError, match=message):
            ImpactModel(model, **arguments)


class TestFit:
    def test_fit_returns_the_model_with_vi_result_and_posterior(self, fitted):
        im, _ = fitted
        assert im.is_fitted()
        assert isinstance(im.vi_result, SVIRunResult)
        assert im.vi_result.losses.shape == (8 * NUM_ROWS // 200,)
        assert im.vi_result.losses[-1] < im.vi_result.losses[0]
        assert set(im.vi_result.params) >= {"w_auto_loc", "tau_auto_loc"}
        assert im.posterior["w"].shape == (40,) and im.posterior["tau"].shape == (40,)
        assert abs(float(np.mean(im.posterior["w"])) - SLOPE) < 0.05
        assert abs(float(np.mean(im.posterior["tau"])) - 1.0) < 0.05
        assert isinstance(im.trainer, Trainer) and im.trainer.mesh is im.mesh

    def test_the_same_key_gives_the_same_fit(self, fitted):
        im, (X, t, y) = fitted
        again = new_model().fit(X, y, t=t, num_samples=40, batch_size=200, epochs=8, progress=False)
        np.testing.assert_array_equal(again.vi_result.losses, im.vi_result.losses)
        np.testing.assert_array_equal(again.posterior["w"], im.posterior["w"])

    def test_trainer_and_fit_arguments_and_callbacks_pass_through(self, tmp_path):
        X, t, y = data()
        held_out = dict(zip(("X", "t", "y"), data(seed=1)[:3], strict=True))
        im = new_model().fit(
            X, y, t=t, num_samples=5, batch_size=500, epochs=2, progress=False,
            callbacks=[CSVLogger(tmp_path / "metrics.csv")], log_every_n_steps=1, val_data=held_out,
        )  # fmt: skip
        assert "val_loss" in im.trainer.callback_metrics
        lines = (tmp_path / "metrics.csv").read_text().splitlines()
        assert sum(",train_loss," in line for line in lines) == 8  # logged every step

    def test_an_unknown_keyword_is_refused_listing_the_valid_ones(self):
        X, _, y = data()
        with pytest.raises(
            ConfigurationError, match=r"unexpected arguments \['learning_rate'\].*kernel's inputs \['t'\]"
        ):
            new_model().fit(X, y, learning_rate=0.1)


class TestPredict:
    def test_predict_before_fit_is_a_not_fitted_error(self):
        im = new_model()
        for call in (
            lambda: im.predict(np.zeros(10, np.float32), t=np.zeros(10, np.float32)),
            lambda: im.log_likelihood(np.zeros(10, np.float32), np.zeros(10, np.float32)),
            lambda: im.estimate_effect(args_baseline={"X": np.zeros(3)}, args_intervention={"X": np.zeros(3)}),
        ):
            with pytest.raises(NotFittedError, match="call fit") as caught:
                call()
            # The reference library's NotFittedError is both: code catching either still works.
            assert isinstance(caught.value, ValueError) and isinstance(caught.value, AttributeError)
            assert not isinstance(caught.value, RuntimeError)
        assert im.temp_dir is None  # nothing was created

    def test_a_batch_size_of_zero_is_refused_not_replaced(self, fitted):
        im, (X, t, _) = fitted
        with pytest.raises(ConfigurationError, match="batch_size must be a positive int; got 0"):
            im.predict(X, t=t, batch_size=0)

    def test_predict_writes_the_tutorial_groups(self, fitted):
        im, (X, t, _) = fitted
        dt = im.predict(X, t=t, batch_size=500)
        assert {"posterior_predictive", "posterior"} <= set(dt.children)
        assert dt["posterior_predictive"]["y"].shape == (1, 40, NUM_ROWS)
        assert dt["posterior_predictive"]["mu"].dims == ("chain", "draw", "data")
        np.testing.assert_array_equal(dt["posterior"]["w"].values[0], im.posterior["w"])
        mu = dt["posterior_predictive"]["mu"].values[0]
        expected = im.posterior["w"][:, None] * X + im.posterior["tau"][:, None] * t
        np.testing.assert_allclose(mu, expected, rtol=1e-5, atol=1e-5)
        assert Path(dt.attrs["store_path"]).parent == Path(im.temp_dir)

    def test_every_predict_uses_the_same_draws_so_effects_carry_no_noise(self, fitted):
        im, (X, t, _) = fitted
        effect = im.estimate_effect(
            args_baseline={"X": X, "t": t, "intervention": {"t": 0.0}, "batch_size": 500},
            args_intervention={"X": X, "t": t, "intervention": {"t": 1.0}, "batch_size": 500},
        )
        difference = effect["effect"]["y"].values[0]
        np.testing.assert_allclose(difference, np.repeat(im.posterior["tau"][:, None], NUM_ROWS, 1), atol=1e-4)
        summary = effect["summary"].attrs
        assert summary["ci_low"] <= 1.0 <= summary["ci_high"]

    def test_estimate_effect_takes_trees_and_needs_both_scenarios(self, fitted):
        im, (X, t, _) = fitted
        baseline = im.predict(X, t=t, intervention={"t": 0.0}, batch_size=500)
        treated = im.predict(X, t=t, intervention={"t": 1.0}, batch_size=500)
        effect = im.estimate_effect(baseline, treated, site="mu")
        np.testing.assert_allclose(effect["summary"]["average_effect"].values[0], im.posterior["tau"], atol=1e-5)
        with pytest.raises(ConfigurationError, match="pass output_intervention"):
            im.estimate_effect(baseline)

    def test_log_likelihood_and_prior_predictive(self, fitted):
        im, (X, t, y) = fitted
        ll = im.log_likelihood(X, y, t=t, batch_size=500)
        values = ll["log_likelihood"]["y"].values[0]
        mu = im.posterior["w"][:, None] * X + im.posterior["tau"][:, None] * t
        np.testing.assert_allclose(values, dist.Normal(mu, NOISE).log_prob(y), rtol=1e-4, atol=1e-4)
        prior = im.sample_prior_predictive(X, t=t, batch_size=500)
        assert prior["prior_predictive"]["y"].shape == (1, 40, NUM_ROWS)  # the posterior's draw count

    def test_the_prior_predictive_needs_no_fit(self):
        im = new_model()
        zeros = np.zeros(1000, np.float32)
        prior = im.sample_prior_predictive(zeros, t=zeros, num_samples=300, batch_size=1000)
        w = prior["prior"]["w"].values[0]
        assert w.shape == (300,) and 0.8 < np.std(w) < 1.2  # Normal(0, 1) prior
        im.cleanup()


class TestScratchDirectory:
    def test_created_lazily_and_removed_by_cleanup_then_a_no_op(self, fitted):
        im, (X, t, _) = fitted
        im.cleanup()
        assert im.temp_dir is None
        im.predict(X[:100], t=t[:100], batch_size=100)
        scratch = Path(im.temp_dir)
        assert any(scratch.glob("predict-*"))
        im.cleanup()
        assert not scratch.exists() and im.temp_dir is None
        im.cleanup()  # already removed: nothing happens

    def test_an_output_dir_is_never_removed(self, fitted, tmp_path):
        im, (X, t, _) = fitted
        im.cleanup()
        dt = im.predict(X[:100], t=t[:100], batch_size=100, output_dir=tmp_path)
        assert im.temp_dir is None
        im.cleanup()
        assert Path(dt.attrs["store_path"]).is_dir() and dt["posterior_predictive"]["y"].shape == (1, 40, 100)

    def test_removed_when_the_model_and_its_trees_are_collected(self):
        X, t, y = data()
        im = new_model().fit(X, y, t=t, num_samples=4, batch_size=500, epochs=1, progress=False)
        dt = im.predict(X, t=t, batch_size=1000)
        scratch = Path(im.temp_dir)
        del im
        gc.collect()
        assert scratch.exists()  # the tree still reads from it
        assert dt["posterior_predictive"]["y"].values.shape == (1, 4, NUM_ROWS)
        del dt
        gc.collect()
        assert not scratch.exists()

    def test_removed_at_interpreter_exit(self, tmp_path):
        script = textwrap.dedent(
            f"""
            import sys, jax, numpy as np
            sys.path.insert(0, {str(Path(__file__).parent.parent)!r})
            from tests.test_impact_model import data, new_model
            X, t, y = data()
            im = new_model().fit(X, y, t=t, num_samples=4, batch_size=500, epochs=1, progress=False)
            im.predict(X, t=t, batch_size=1000)
            print(im.temp_dir)
            """
        )
        completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert completed.returncode == 0, completed.stderr
        scratch = Path(completed.stdout.strip().splitlines()[-1])
        assert scratch.name.startswith("aimz-trainer-scratch-") and not scratch.exists()
