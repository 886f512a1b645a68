"""Rows reach the model: row plates found and checked, per-row latents fitted against their own
rows and predicted from the fitted guide (in sample) or the prior (new rows), and every row
count and batch size predicted right."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import SVI, Predictive, Trace_ELBO
from numpyro.infer import log_likelihood as numpyro_log_likelihood
from numpyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from optax import adam

from aimz_trainer import ConfigurationError, ImpactModel, Predictor, Trainer, estimate_effect
from aimz_trainer.errors import MinibatchScalingWarning
from aimz_trainer.plates import abstract_sites, check_trainable, model_layout, trace_model

from .conftest import LOCAL_NOISE, local_data, local_model


def quiet_trainer(**kwargs) -> Trainer:
    return Trainer(rng_key=jax.random.key(0), enable_progress_bar=False, **kwargs)


class TestModelLayout:
    def test_sorts_sites_by_the_plates_that_follow_the_batch(self):
        def model(x, g, y=None, *, num_groups):
            mu = numpyro.sample("mu", dist.Normal())
            with numpyro.plate("groups", num_groups):  # as many groups as rows per batch: not a row plate
                a = numpyro.sample("a", dist.Normal(mu, 1))
            with numpyro.plate("data", 500, subsample_size=len(x)):
                u = numpyro.sample("u", dist.Normal())
                numpyro.sample("y", dist.Normal(a[g] + u * x), obs=y)

        rows = {"x": np.zeros(500, np.float32), "g": np.zeros(500, np.int32), "y": np.zeros(500, np.float32)}
        layout = model_layout(model, rows, batch_rows=8, static_kwargs={"num_groups": 8})
        assert layout.row_plates == ("data",) and layout.plate_sizes == {"data": 500}
        assert layout.local_sites == ("u",) and layout.global_sites == ("mu", "a")
        assert layout.observed_sites == ("y",) and layout.unscaled_observed == ()

    def test_a_plate_over_the_batch_without_subsampling_is_a_fixed_row_plate(self):
        def model(x, y=None):
            w = numpyro.sample("w", dist.Normal())
            with numpyro.plate("obs", len(x)):
                numpyro.sample("y", dist.Normal(w * x), obs=y)

        layout = model_layout(model, {"x": np.zeros(10), "y": np.zeros(10)}, batch_rows=4)
        assert layout.row_plates == () and layout.fixed_row_plates == ("obs",)
        assert layout.unscaled_observed == ("y",)


class TestCheckTrainable:
    def layout(self, model, rows=100, batch=10):
        return model_layout(model, {"x": np.zeros(rows, np.float32), "y": np.zeros(rows, np.float32)}, batch_rows=batch)

    def test_a_plate_of_another_size_names_the_plate_its_size_and_the_rows(self, make_linear):
        svi, data = make_linear(100)  # the model's plate has 100 rows
        with pytest.raises(ConfigurationError, match=r"plate 'data' has size 100, but fit was given 60 rows"):
            quiet_trainer(max_epochs=1).fit(svi, {k: v[:60] for k, v in data.items()}, batch_size=10)

    def test_a_fixed_subsample_of_the_data_plate_is_refused(self):
        def model(x, y=None):
            w = numpyro.sample("w", dist.Normal())
            with numpyro.plate("data", 100, subsample_size=5):
                numpyro.sample("y", dist.Normal(w), obs=y)

        svi = SVI(model, AutoNormal(model), adam(0.01), Trace_ELBO())
        data = {"x": np.zeros(100, np.float32), "y": np.zeros(100, np.float32)}
        with pytest.raises(ConfigurationError, match=r"plate 'data' subsamples a fixed 5 of its 100 rows"):
            quiet_trainer(max_epochs=1).fit(svi, data, batch_size=10)

    def test_autocontinuous_guides_are_refused_for_per_row_latents(self):
        model = local_model(100)
        svi = SVI(model, AutoDiagonalNormal(model), adam(0.01), Trace_ELBO())
        data, _ = local_data(100)
        with pytest.raises(
            ConfigurationError, match=r"AutoDiagonalNormal cannot fit the per-row latent site\(s\) \['z'\]"
        ):
            quiet_trainer(max_epochs=1).fit(svi, data, batch_size=10)

    def test_per_row_latents_in_a_plate_that_is_not_subsampled_are_refused(self):
        def model(x, y=None):
            with numpyro.plate("obs", len(x)):
                z = numpyro.sample("z", dist.Normal())
                numpyro.sample("y", dist.Normal(z * x), obs=y)

        with pytest.raises(
            ConfigurationError, match=r"per-row latent site\(s\) \['z'\] sit in a plate .* not subsampled"
        ):
            check_trainable(self.layout(model), AutoNormal(model), 100, 10)
        check_trainable(self.layout(model, batch=100), AutoNormal(model), 100, 100)  # whole batches: rows

    def test_an_unscaled_likelihood_warns_once_with_the_fix(self):
        def model(x, y=None):
            w = numpyro.sample("w", dist.Normal())
            with numpyro.plate("obs", len(x)):
                numpyro.sample("y", dist.Normal(w * x), obs=y)

        with pytest.warns(MinibatchScalingWarning, match=r"\['y'\] are not inside a subsampled plate.*10x too much"):
            check_trainable(self.layout(model), AutoNormal(model), 100, 10)
        svi = SVI(model, AutoNormal(model), adam(0.01), Trace_ELBO())
        data = {"x": np.ones(100, np.float32), "y": np.ones(100, np.float32)}
        with pytest.warns(MinibatchScalingWarning) as caught:
            quiet_trainer(max_epochs=2).fit(svi, data, batch_size=10)
        assert len([w for w in caught if w.category is MinibatchScalingWarning]) == 1


class TestAbstractSites:
    """The Predictor plans from an abstract run of the model: it must see the sites a run on
    values records (trace_model), without computing them."""

    @staticmethod
    def summary(site):
        fn = site.get("fn")
        support = getattr(fn, "support", None)
        return {
            "type": site["type"],
            "shape": tuple(np.shape(site["value"])),
            "dtype": np.dtype(jnp.result_type(site["value"])),
            "observed": bool(site.get("is_observed")),
            "frames": [(f.name, f.dim, f.size) for f in site.get("cond_indep_stack", ())],
            "event": None if fn is None else (tuple(fn.event_shape), fn.event_dim),
            "support": None if support is None else type(support).__name__,
            "bounds": [np.asarray(getattr(support, b, 0)).tolist() for b in ("lower_bound", "upper_bound")],
        }

    def test_the_sites_of_a_run_on_values(self):
        def model(x, k, y=None):
            p = numpyro.sample("p", dist.Beta(2.0, 2.0))
            w = numpyro.sample("w", dist.MultivariateNormal(jnp.zeros(3), jnp.eye(3)))
            mix = numpyro.sample("mix", dist.Dirichlet(jnp.ones(4)))
            numpyro.deterministic("scale", jnp.exp(w[0]))
            with numpyro.plate("groups", 4):
                numpyro.sample("g", dist.Normal(0.0, 1.0))
            with numpyro.plate("data", 1000, subsample_size=x.shape[0]):
                mu = numpyro.deterministic("mu", x @ w)
                numpyro.sample("count", dist.Binomial(10, p))
                numpyro.sample("cls", dist.Categorical(probs=mix))
                numpyro.sample("flag", dist.Bernoulli(p))
                numpyro.sample("events", dist.Poisson(jnp.exp(mu)))
                numpyro.sample("pair", dist.Normal(mu[:, None], 1.0).expand([x.shape[0], 2]).to_event(1))
                numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

        kwargs = {"x": np.ones((6, 3), np.float32), "k": np.arange(6, dtype=np.int32), "y": np.zeros(6, np.float32)}
        abstract = abstract_sites(model, kwargs)
        on_values = {n: s for n, s in trace_model(model, kwargs).items() if s["type"] in ("sample", "deterministic")}
        assert list(abstract) == list(on_values)  # run order
        assert {n: self.summary(s) for n, s in abstract.items()} == {n: self.summary(s) for n, s in on_values.items()}
        assert all(isinstance(s["value"], jax.ShapeDtypeStruct) for s in abstract.values())  # nothing computed

    @pytest.mark.parametrize("count", ["computed scalar", "per row"])
    def test_a_bound_computed_from_values_runs_the_model_on_values(self, count):
        def model(x, n):
            p = numpyro.sample("p", dist.Beta(2.0, 2.0))
            total = jnp.max(n) if count == "computed scalar" else n
            with numpyro.plate("data", 100, subsample_size=x.shape[0]):
                numpyro.sample("y", dist.Binomial(total, p))

        kwargs = {"x": np.ones(5, np.float32), "n": np.array([3, 9, 4, 1, 5], np.int32)}
        sites = abstract_sites(model, kwargs)
        assert isinstance(sites["y"]["value"], jax.Array)  # from the run on values
        expected = np.asarray(trace_model(model, kwargs)["y"]["fn"].support.upper_bound)
        np.testing.assert_array_equal(np.asarray(sites["y"]["fn"].support.upper_bound), expected)

    def test_the_predictor_plans_without_running_the_model_on_values(self, tmp_path):
        runs = []

        def model(x, n, y=None):
            runs.append(isinstance(x, jax.core.Tracer))
            p = numpyro.sample("p", dist.Beta(2.0, 2.0))
            with numpyro.plate("data", x.shape[0]):
                numpyro.sample("y", dist.Binomial(jnp.max(n) if y is None else 10, p), obs=y)

        posterior = {"p": np.linspace(0.1, 0.9, 4).astype(np.float32)}
        predictor = Predictor(model, posterior, rng_key=jax.random.key(0), rows_per_key=4)
        data = {"x": np.ones(8, np.float32), "n": np.full(8, 10, np.int32)}
        tree = predictor.predict(data, batch_size=8, output_dir=tmp_path)
        # A count the model computes from the data: its bound is only known from values, and
        # the draws of at most 10 are stored as int8, as a run on values finds.
        assert tree["posterior_predictive"]["y"].dtype == np.int8
        runs.clear()
        fixed = Predictor(lambda x, n, y=None: model(x, n, y=np.zeros(len(x), np.int32)), posterior, rows_per_key=4)
        fixed.predict(data, batch_size=8, output_dir=tmp_path / "fixed", return_sites="y")
        assert runs and all(runs), runs  # every run of the model was a trace
        predictor.cleanup()
        fixed.cleanup()


@pytest.mark.slow
def test_impact_model_fits_per_row_latents_against_their_rows():
    """The issue's case through the reference API: each row's z is learned from that row."""
    data, z = local_data(2000)
    model = local_model(2000)
    svi = SVI(model, AutoNormal(model), adam(0.05), Trace_ELBO())
    im = ImpactModel(model, rng_key=jax.random.key(0), inference=svi, param_input="x")
    im.fit(data["x"], data["y"], batch_size=200, epochs=150, num_samples=20, progress=False)
    params = im.vi_result.params
    assert np.corrcoef(params["z_auto_loc"], z)[0, 1] >= 0.99
    assert set(im.posterior) == {"b"}  # the per-row z is not a global draw
    assert abs(float(params["b_auto_loc"]) - 0.5) < 0.1


@pytest.fixture(scope="module")
def fitted_local():
    """A small fitted per-row latent model and a Predictor over it."""
    num_rows = 300
    data, z = local_data(num_rows, seed=1)
    model = local_model(num_rows)
    svi = SVI(model, AutoNormal(model), adam(0.05), Trace_ELBO())
    result = quiet_trainer(max_epochs=200).fit(svi, data, batch_size=100, num_samples=400)
    predictor = Predictor(model, result.posterior, guide=svi.guide, params=result.params, rng_key=jax.random.key(4))
    yield data, z, result, predictor
    predictor.cleanup()


class TestPerRowPredictions:
    def test_in_sample_draws_follow_each_rows_fitted_guide(self, fitted_local):
        data, z, result, predictor = fitted_local
        assert np.corrcoef(result.params["z_auto_loc"], z)[0, 1] > 0.95
        draws = predictor.predict({"x": data["x"]}, batch_size=120)["posterior_predictive"]["y"].values[0]
        assert draws.shape == (400, 300)
        # What the guide says, computed from its parameters: y = z + b x + noise with
        # z ~ Normal(z_loc, z_scale) per row and b ~ Normal(b_loc, b_scale), independent.
        params = {k: np.asarray(v, np.float64) for k, v in result.params.items()}
        x = data["x"].astype(np.float64)
        mean = params["z_auto_loc"] + params["b_auto_loc"] * x
        sd = np.sqrt(params["z_auto_scale"] ** 2 + (params["b_auto_scale"] * x) ** 2 + LOCAL_NOISE**2)
        standardized = (draws - mean) / sd
        assert abs(standardized.mean()) < 0.02 and standardized.std() == pytest.approx(1.0, abs=0.03)
        assert np.abs(standardized.mean(axis=0)).max() < 4.5 / math.sqrt(400)  # every row, not just on average

    def test_draws_do_not_depend_on_the_batch_size(self, fitted_local):
        data, _, _, predictor = fitted_local
        small = predictor.predict({"x": data["x"]}, batch_size=70)["posterior_predictive"]["y"].values
        whole = predictor.predict({"x": data["x"]}, batch_size=300)["posterior_predictive"]["y"].values
        np.testing.assert_array_equal(small, whole)

    def test_new_rows_draw_their_latents_from_the_prior(self, fitted_local):
        data, _, result, predictor = fitted_local
        tree = predictor.predict({"x": data["x"][:250]}, in_sample=False, batch_size=100)
        draws = tree["predictions"]["y"].values[0].astype(np.float64)
        b = np.asarray(result.posterior["b"], np.float64)[:, None]
        x = data["x"][:250].astype(np.float64)
        # z ~ Normal(0, 1) given each draw of b: standardized residuals are standard normal.
        standardized = (draws - b * x) / math.sqrt(1 + LOCAL_NOISE**2)
        assert abs(standardized.mean()) < 0.02 and standardized.std() == pytest.approx(1.0, abs=0.02)

    def test_in_sample_log_likelihood_averages_over_each_rows_guide(self, fitted_local):
        data, _, result, predictor = fitted_local
        values = predictor.log_likelihood(data, batch_size=300)["log_likelihood"]["y"].values[0].astype(np.float64)
        assert values.shape == (400, 300)
        # Given draw s of b and z ~ Normal(z_loc_i, z_scale_i) from row i's guide, the expected
        # log-likelihood of y_i is, in closed form,
        #   -log(sigma sqrt(2 pi)) - ((y_i - z_loc_i - b_s x_i)^2 + z_scale_i^2) / (2 sigma^2).
        params = {k: np.asarray(v, np.float64) for k, v in result.params.items()}
        b = np.asarray(result.posterior["b"], np.float64)[:, None]
        x, y = data["x"].astype(np.float64), data["y"].astype(np.float64)
        residual = y - params["z_auto_loc"] - b * x
        expected = -math.log(LOCAL_NOISE * math.sqrt(2 * math.pi)) - (residual**2 + params["z_auto_scale"] ** 2) / (
            2 * LOCAL_NOISE**2
        )
        error = values.std(axis=0) / math.sqrt(400)  # Monte Carlo error of each row's mean over the draws
        assert np.all(np.abs(values.mean(axis=0) - expected.mean(axis=0)) < 5 * error)
        assert abs(values.mean() - expected.mean()) < 0.05

    def test_in_sample_needs_the_fits_rows_and_the_guide(self, fitted_local):
        data, _, result, predictor = fitted_local
        with pytest.raises(ConfigurationError, match=r"data has 200 rows but the plate\(s\) \{'data': 300\}"):
            predictor.predict({"x": data["x"][:200]})
        bare = Predictor(local_model(300), result.posterior)
        with pytest.raises(ConfigurationError, match=r"per-row latent site\(s\) \['z'\] have no posterior draws"):
            bare.predict({"x": data["x"]})
        with pytest.raises(ConfigurationError, match="guide and params together"):
            Predictor(local_model(300), result.posterior, params=result.params)

    def test_validation_draws_held_out_latents_from_the_prior(self, fitted_local):
        data, _, _, _ = fitted_local
        model = local_model(300)
        svi = SVI(model, AutoNormal(model), adam(0.05), Trace_ELBO())
        held_out, _ = local_data(400, seed=7)
        trainer = quiet_trainer(max_epochs=60, check_val_every_n_epoch=60)  # one validation, at the end
        result = trainer.fit(svi, data, batch_size=100, val_data=held_out, val_batch_size=100, val_num_samples=3000)
        metrics = trainer.callback_metrics
        assert "val_loss" not in metrics  # held-out rows have no guide parameters: no ELBO
        # The exact density of a new row: z integrated out, y ~ Normal(b x, sqrt(1 + noise^2)).
        b = float(result.params["b_auto_loc"])
        sd = math.sqrt(1 + LOCAL_NOISE**2)
        exact = np.mean(-0.5 * ((held_out["y"] - b * held_out["x"]) / sd) ** 2 - math.log(sd * math.sqrt(2 * math.pi)))
        assert metrics["val_lpd"] == pytest.approx(exact, abs=0.15)


def tutorial_model(num_rows: int):
    """The reference tutorial's plate on a linear model with a deterministic mean."""

    def model(x, y=None):
        w = numpyro.sample("w", dist.Normal())
        b = numpyro.sample("b", dist.Normal())
        with numpyro.plate("data", size=num_rows, subsample_size=len(x)):
            mu = numpyro.deterministic("mu", w * x + b)
            numpyro.sample("y", dist.Normal(mu, 0.3), obs=y)

    return model


@pytest.mark.parametrize("num_rows", [1, 7, 300, 999, 1000, 1001])
def test_every_row_count_predicts_against_numpyro(num_rows, tmp_path):
    rng = np.random.default_rng(num_rows)
    x = rng.normal(size=num_rows).astype(np.float32)
    y = (2 * x - 0.5 + 0.3 * rng.normal(size=num_rows)).astype(np.float32)
    posterior = {"w": rng.normal(2, 0.1, size=30).astype(np.float32), "b": rng.normal(-0.5, 0.1, size=30)}
    posterior["b"] = posterior["b"].astype(np.float32)
    model = tutorial_model(num_rows)
    predictor = Predictor(model, posterior, rng_key=jax.random.key(0))
    batch = max(1, num_rows // 3 + 1)  # does not divide the rows (but for n = 1)
    tree = predictor.predict({"x": x}, batch_size=batch, return_sites="mu", output_dir=tmp_path)
    assert set(tree["posterior_predictive"].data_vars) == {"mu"}
    expected = posterior["w"][:, None] * x + posterior["b"][:, None]
    np.testing.assert_allclose(tree["posterior_predictive"]["mu"].values[0], expected, rtol=1e-5, atol=1e-6)

    ll = predictor.log_likelihood({"x": x, "y": y}, batch_size=batch)["log_likelihood"]["y"].values[0]
    reference = numpyro_log_likelihood(model, posterior, x=x, y=y)["y"]
    np.testing.assert_allclose(ll, reference, rtol=1e-5, atol=1e-5)

    prior = predictor.sample_prior_predictive({"x": x}, num_samples=20, batch_size=batch)
    assert prior["prior_predictive"]["y"].shape == (1, 20, num_rows)
    assert prior["prior"]["w"].shape == (1, 20)

    baseline = predictor.predict({"x": x}, batch_size=batch)
    shifted = predictor.predict({"x": x}, batch_size=batch, intervention={"b": np.float32(1.0)})
    effect = estimate_effect(baseline, shifted, "y")
    # The same random numbers in both worlds: each draw's difference is 1 - b exactly.
    differences = shifted["posterior_predictive"]["y"].values - baseline["posterior_predictive"]["y"].values
    np.testing.assert_allclose(differences[0], np.broadcast_to(1 - posterior["b"][:, None], (30, num_rows)), atol=1e-5)
    assert effect is not None
    predictor.cleanup()


@pytest.mark.parametrize(("num_rows", "batch_size"), [(1, 1), (7, 3), (300, 7), (999, 100), (1001, 1001)])
def test_every_row_count_and_batch_size_fits(num_rows, batch_size):
    rng = np.random.default_rng(0)
    x = rng.normal(size=num_rows).astype(np.float32)
    data = {"x": x, "y": (2 * x - 0.5 + 0.3 * rng.normal(size=num_rows)).astype(np.float32)}
    model = tutorial_model(num_rows)
    svi = SVI(model, AutoNormal(model), adam(0.05), Trace_ELBO())
    epochs = 3 if num_rows < 300 else 40
    result = quiet_trainer(max_epochs=epochs).fit(svi, data, batch_size=batch_size, num_samples=10)
    assert result.losses.shape == (epochs * math.ceil(num_rows / batch_size),)
    assert np.isfinite(result.losses).all()
    if num_rows >= 300:
        assert float(result.params["w_auto_loc"]) == pytest.approx(2.0, abs=0.1)


def test_static_keyword_arguments_reach_the_predictor():
    def model(x, y=None, *, shift):
        w = numpyro.sample("w", dist.Normal())
        with numpyro.plate("data", 50, subsample_size=len(x)):
            numpyro.deterministic("mu", w * x + shift)
            numpyro.sample("y", dist.Normal(w * x + shift, 0.1), obs=y)

    x = np.linspace(-1, 1, 50, dtype=np.float32)
    svi = SVI(model, AutoNormal(model), adam(0.05), Trace_ELBO(), shift=3.0)
    result = quiet_trainer(max_epochs=100).fit(svi, {"x": x, "y": 2 * x + 3}, batch_size=25, num_samples=10)
    assert float(result.params["w_auto_loc"]) == pytest.approx(2.0, abs=0.1)
    predictor = Predictor(model, result.posterior, static_kwargs={"shift": 3.0})
    mu = predictor.predict({"x": x}, return_sites=["mu"])["posterior_predictive"]["mu"].values[0]
    expected = Predictive(model, {"w": result.posterior["w"]}, return_sites=["mu"])(jax.random.key(0), x=x, shift=3.0)
    np.testing.assert_allclose(mu, expected["mu"], rtol=1e-5)
    predictor.cleanup()


def test_a_site_with_event_dims_names_its_row_axis_after_the_plate(tmp_path):
    def model(x, y=None, weeks=None):
        w = numpyro.sample("w", dist.Normal())
        with numpyro.plate("data", 40, subsample_size=len(x)):
            numpyro.sample("weeks", dist.Normal(w * x[:, None], 1.0).expand([len(x), 3]).to_event(1), obs=weeks)
            numpyro.sample("y", dist.Normal(w * x, 1.0), obs=y)

    x = np.linspace(-1, 1, 40, dtype=np.float32)
    predictor = Predictor(model, {"w": np.ones(5, np.float32)})
    tree = predictor.predict({"x": x, "weeks": np.zeros((40, 3), np.float32)}, output_dir=tmp_path)
    assert tree["posterior_predictive"]["weeks"].dims == ("chain", "draw", "data", "weeks_dim_1")
    assert tree["observed_data"]["weeks"].dims == ("data", "weeks_dim_1")
    assert tree["posterior_predictive"]["y"].dims == ("chain", "draw", "data")
