"""The compiled pieces: masked chunks equal NumPyro's own updates, validation equals a hand
computation, and no tracer leaks into the user's SVI."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.scipy.special import logsumexp
from numpyro.handlers import block, seed
from numpyro.infer import SVI, Trace_ELBO, log_likelihood
from numpyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoGuideList,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from optax import adam

from aimz_trainer import Trainer
from aimz_trainer._checks import check_model_accepts
from aimz_trainer.data import ChunkSource, ValidationSource, make_chunk_loader
from aimz_trainer.errors import DataError
from aimz_trainer.plan import FitPlan
from aimz_trainer.plates import ModelLayout, model_layout
from aimz_trainer.step import (
    TrainState,
    _reachable,
    batch_from,
    first_batch,
    make_init,
    make_params,
    make_posterior_sampler,
    make_train_chunk,
    make_validation_step,
    pointwise_lpd,
    sample_posterior,
    set_up_guide,
    traced_svi,
)

from .conftest import NOISE, linear_data, linear_svi

NUM_ROWS, BATCH, STEPS = 64, 8, 5  # training rows, rows per step, steps per compiled chunk


def record(batches: np.ndarray, num_steps: int | None = None) -> dict:
    """A training record: ``batches`` (real steps, rows) padded with row 0 to ``STEPS`` steps."""
    indices = np.zeros((STEPS, batches.shape[1]), np.int32)
    indices[: len(batches)] = batches
    return {"indices": indices, "rows": {}, "num_steps": np.int32(len(batches) if num_steps is None else num_steps)}


def layout(svi, data, rows: int) -> ModelLayout:
    return model_layout(svi.model, data, batch_rows=rows, static_kwargs=svi.static_kwargs)


def assert_same_state(actual, expected, rtol=1e-5):
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-6), actual.optim_state, expected.optim_state
    )
    np.testing.assert_array_equal(jax.random.key_data(actual.rng_key), jax.random.key_data(expected.rng_key))


class Fixture:
    """One SVI problem and its compiled functions, shared by the module (compiles are slow)."""

    def __init__(self) -> None:
        self.svi = linear_svi(NUM_ROWS)
        self.data = {key: jnp.asarray(value) for key, value in linear_data(NUM_ROWS).items()}
        self.batches = np.sort(np.random.default_rng(0).permutation(NUM_ROWS)[: STEPS * BATCH].reshape(STEPS, BATCH))
        self.key = jax.random.key(3)
        self.layout = layout(self.svi, self.data, BATCH)
        self.plates = self.layout.row_plates
        self.init = jax.jit(make_init(self.svi, self.plates))
        self.chunk = jax.jit(make_train_chunk(self.svi, self.plates))
        self.state = self.init(self.key, self.data, record(self.batches))
        self._hand = None

    def batch(self, rows: np.ndarray, data=None) -> dict[str, jax.Array]:
        data = self.data if data is None else data
        return {key: array[rows] for key, array in data.items()}

    def hand_updates(self, num_steps: int):
        """The initial state after ``num_steps`` plain NumPyro updates, and their losses."""
        if self._hand is None:
            # A user's eager init sets the guide up; the jitted update then runs as in NumPyro.
            self.svi.init(self.key, **self.batch(self.batches[0]))
            self._hand = jax.jit(self.svi.update)
        state, losses = self.state.svi_state, []
        for rows in self.batches[:num_steps]:
            state, loss = self._hand(state, **self.batch(rows))
            losses.append(loss)
        return state, np.array(losses)


@pytest.fixture(scope="module")
def fx() -> Fixture:
    return Fixture()


class TestBatches:
    def test_batch_from_gathers_rows_of_device_data(self):
        data = {"x": jnp.arange(10.0), "z": jnp.arange(20).reshape(10, 2)}
        batch = batch_from(data, {}, jnp.array([7, 1, 1]))
        np.testing.assert_array_equal(batch["x"], [7.0, 1.0, 1.0])
        np.testing.assert_array_equal(batch["z"], [[14, 15], [2, 3], [2, 3]])

    def test_batch_from_host_rows_is_the_batch(self):
        rows = {"x": jnp.ones(3), "y": jnp.zeros(3)}
        batch = batch_from({}, rows, jnp.arange(3))
        assert batch == rows and batch is not rows

    def test_first_batch_is_the_records_first_step(self):
        data = {"x": jnp.arange(10.0)}
        rec = {"indices": jnp.array([[4, 5], [6, 7]]), "rows": {}, "num_steps": 2}
        batch, indices = first_batch(data, rec)
        np.testing.assert_array_equal(batch["x"], [4.0, 5.0])
        np.testing.assert_array_equal(indices, [4, 5])
        host = {"indices": jnp.array([[0, 1], [2, 3]]), "rows": {"x": jnp.array([[1.0, 2.0], [3.0, 4.0]])}}
        np.testing.assert_array_equal(first_batch({}, host)[0]["x"], [1.0, 2.0])


class TestTracedSvi:
    def test_sets_up_inside_and_restores_after_even_on_error(self):
        svi = linear_svi(20)
        batch = {"x": jnp.ones(4), "y": jnp.ones(4)}
        svi_before, guide_before = dict(vars(svi)), dict(vars(svi.guide))
        seen = {}

        @jax.jit
        def fails(batch):
            with traced_svi(svi, batch, jnp.arange(4), ("data",)):
                trace = svi.guide.prototype_trace
                seen["latent"] = {n for n, s in trace.items() if s["type"] == "sample" and not s["is_observed"]}
                seen["constrain_fn"] = svi.constrain_fn
                raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            fails(batch)
        assert seen["latent"] == {"w", "b"}  # not the observed "y" nor the deterministic "mu"
        assert seen["constrain_fn"] is not None
        assert vars(svi) == svi_before and vars(svi.guide) == guide_before
        assert svi.guide.prototype_trace is None

    def test_compiled_functions_leave_svi_and_guide_untouched(self):
        svi = linear_svi(40)
        data = {"x": jnp.linspace(-1, 1, 40), "y": jnp.linspace(0, 1, 40)}
        rec = {"indices": jnp.arange(20).reshape(2, 10), "rows": {}, "num_steps": np.int32(2)}
        guide_before, svi_before = dict(vars(svi.guide)), dict(vars(svi))
        shape = layout(svi, data, 10)

        state = jax.jit(make_init(svi, shape.row_plates))(jax.random.key(0), data, rec)
        state, _, _ = jax.jit(make_train_chunk(svi, shape.row_plates))(state, data, rec)
        params = jax.jit(make_params(svi, shape.row_plates))(state.svi_state, data, rec)
        posterior = jax.jit(make_posterior_sampler(svi, 7, shape))(state.svi_state, jax.random.key(1), data, rec)

        assert vars(svi.guide) == guide_before and vars(svi) == svi_before
        assert svi.guide.prototype_trace is None
        assert posterior["w"].shape == (7,) and "mu" not in posterior  # per-row: one batch's values only
        assert set(params) == {"w_auto_loc", "w_auto_scale", "b_auto_loc", "b_auto_scale"}
        # Eager NumPyro use afterwards still works (a leaked tracer would raise here).
        svi.init(jax.random.key(0), x=data["x"][:10], y=data["y"][:10])
        draws = svi.guide.sample_posterior(jax.random.key(2), params, sample_shape=(3,))
        assert draws["w"].shape == (3,)

    def test_guide_lists_are_restored_to_the_last_sub_guide(self):
        def model(x, y=None):
            w = numpyro.sample("w", dist.Normal(0, 1))
            b = numpyro.sample("b", dist.Normal(0, 1))
            with numpyro.plate("data", x.shape[0]):
                numpyro.sample("y", dist.Normal(w * x + b, 0.3), obs=y)

        guide = AutoGuideList(model)
        guide.append(AutoNormal(block(model, hide=["b"])))
        guide.append(AutoDelta(block(model, expose=["b"])))
        svi = SVI(model, guide, adam(0.05), Trace_ELBO())
        data = {"x": jnp.linspace(-1, 1, 8), "y": jnp.linspace(0, 1, 8)}
        rec = {"indices": jnp.arange(8).reshape(1, 8), "rows": {}, "num_steps": np.int32(1)}
        state = jax.jit(make_init(svi, ()))(jax.random.key(0), data, rec)
        state, losses, _ = jax.jit(make_train_chunk(svi, ()))(state, data, rec)
        assert np.isfinite(losses).all()
        assert all(sub.prototype_trace is None for sub in guide._guides)
        svi.init(jax.random.key(0), **data)  # a leaked tracer would raise UnexpectedTracerError


class TestTrainChunk:
    def test_init_is_a_fresh_finite_numpyro_state(self, fx):
        expected = linear_svi(NUM_ROWS).init(fx.key, **fx.batch(fx.batches[0]))
        assert isinstance(fx.state, TrainState) and bool(fx.state.finite)
        assert jax.tree.structure(fx.state.svi_state) == jax.tree.structure(expected)
        np.testing.assert_array_equal(
            jax.random.key_data(fx.state.svi_state.rng_key), jax.random.key_data(expected.rng_key)
        )
        assert int(fx.state.svi_state.optim_state[0]) == 0
        params = fx.svi.optim.get_params(fx.state.svi_state.optim_state)
        assert set(params) == {"w_auto_loc", "w_auto_scale", "b_auto_loc", "b_auto_scale"}

    def test_init_equals_numpyro_init_on_the_first_batch(self, fx):
        expected = linear_svi(NUM_ROWS).init(fx.key, **fx.batch(fx.batches[0]))
        assert_same_state(fx.state.svi_state, expected)

    def test_full_chunk_equals_k_numpyro_updates(self, fx):
        state, losses, _ = fx.chunk(fx.state, fx.data, record(fx.batches))
        expected_state, expected_losses = fx.hand_updates(STEPS)
        assert losses.shape == (STEPS,)
        np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
        assert_same_state(state.svi_state, expected_state)
        assert bool(state.finite)

    @pytest.mark.parametrize("num_steps", [3, 1])
    def test_masked_chunk_equals_its_real_steps_only(self, fx, num_steps):
        state, losses, _ = fx.chunk(fx.state, fx.data, record(fx.batches[:num_steps]))
        expected_state, expected_losses = fx.hand_updates(num_steps)
        np.testing.assert_allclose(losses[:num_steps], expected_losses, rtol=1e-5)
        assert np.isnan(losses[num_steps:]).all()
        assert_same_state(state.svi_state, expected_state)
        assert bool(state.finite)

    def test_no_real_step_leaves_the_state_alone(self, fx):
        state, losses, _ = fx.chunk(fx.state, fx.data, record(fx.batches, num_steps=0))
        assert np.isnan(losses).all() and bool(state.finite)
        assert_same_state(state.svi_state, fx.state.svi_state, rtol=0)

    def test_inactive_steps_ignore_their_rows(self, fx):
        """Padding steps skip the update: rows that would give a NaN loss there are harmless."""
        poisoned = {**fx.data, "x": fx.data["x"].at[0].set(jnp.nan)}
        batches = fx.batches[:3].copy()
        batches[batches == 0] = 1  # the real steps avoid row 0; the padding steps read it
        state, losses, _ = fx.chunk(fx.state, poisoned, record(batches))
        clean, clean_losses, _ = fx.chunk(fx.state, fx.data, record(batches))
        assert bool(state.finite) and np.isfinite(losses[:3]).all() and np.isnan(losses[3:]).all()
        np.testing.assert_array_equal(losses[:3], clean_losses[:3])
        assert_same_state(state.svi_state, clean.svi_state, rtol=0)

    def test_non_finite_loss_freezes_the_state(self, fx):
        bad_row = int(fx.batches[2, 3])
        poisoned = {**fx.data, "x": fx.data["x"].at[bad_row].set(jnp.nan)}
        assert bad_row not in fx.batches[:2] and bad_row not in fx.batches[3:]
        frozen, losses, _ = fx.chunk(fx.state, poisoned, record(fx.batches))
        two_steps, _, _ = fx.chunk(fx.state, fx.data, record(fx.batches[:2]))

        assert np.isfinite(losses[:2]).all() and not np.isfinite(losses[2])
        assert not bool(frozen.finite)
        assert_same_state(frozen.svi_state, two_steps.svi_state, rtol=0)

        # A frozen state stays frozen, even on good batches.
        again, _, _ = fx.chunk(frozen, fx.data, record(fx.batches))
        assert not bool(again.finite)
        assert_same_state(again.svi_state, two_steps.svi_state, rtol=0)

    def test_host_gathered_rows_train_like_device_indices(self, fx):
        """The "host" placement (rows gathered by Grain, no device data) gives the same fit."""
        plan = FitPlan.create(NUM_ROWS, BATCH, drop_last=False, max_epochs=1, max_steps=None, steps_per_chunk=STEPS)
        src = ChunkSource(plan, seed=[5], shuffle=True, process_index=0, process_count=1)
        host_arrays = {key: np.asarray(value) for key, value in fx.data.items()}
        host_chunk = jax.jit(make_train_chunk(fx.svi, fx.plates))
        device_state = host_state = fx.state
        for index, rec in enumerate(make_chunk_loader(src, host_arrays)):
            assert set(rec["rows"]) == {"x", "y"}
            np.testing.assert_array_equal(rec["indices"], src[index]["indices"])
            host_state, host_losses, _ = host_chunk(host_state, {}, rec)
            device_state, device_losses, _ = fx.chunk(device_state, fx.data, src[index])
            np.testing.assert_allclose(host_losses, device_losses, rtol=1e-6)
        assert index == plan.num_chunks - 1 and any(c.num_steps < STEPS for c in plan.chunks)
        assert_same_state(host_state.svi_state, device_state.svi_state)


class TestParamsAndPosterior:
    def test_params_are_numpyros_constrained_params(self, fx):
        params = jax.jit(make_params(fx.svi, fx.plates))(fx.state.svi_state, fx.data, record(fx.batches))
        reference = linear_svi(NUM_ROWS)
        reference.init(fx.key, **fx.batch(fx.batches[0]))
        expected = reference.get_params(fx.state.svi_state)
        assert set(params) == set(expected) == {"w_auto_loc", "w_auto_scale", "b_auto_loc", "b_auto_scale"}
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), params, expected)
        assert params["w_auto_scale"] > 0 and params["b_auto_scale"] > 0

    def test_sampler_draws_from_the_guide_one_key_per_draw(self, fx):
        rng_key = jax.random.key(11)
        sample = jax.jit(make_posterior_sampler(fx.svi, 6, fx.layout))
        draws = sample(fx.state.svi_state, rng_key, fx.data, record(fx.batches))
        assert set(draws) == {"w", "b"}  # the global sites: not the per-row deterministic "mu"
        assert draws["w"].shape == draws["b"].shape == (6,)

        reference = linear_svi(NUM_ROWS)
        batch = fx.batch(fx.batches[0])  # deterministic sites are computed on the first batch
        reference.init(fx.key, **batch)
        params = reference.get_params(fx.state.svi_state)
        expected = jax.vmap(lambda key: reference.guide.sample_posterior(key, params, **batch))(
            jax.random.split(rng_key, 6)
        )
        expected = {name: expected[name] for name in draws}
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), draws, expected)

    def test_draws_per_chunk_does_not_change_the_draws(self, fx):
        batch = fx.batch(fx.batches[0])

        @jax.jit
        def both(svi_state, key):
            with traced_svi(fx.svi, batch, jnp.asarray(fx.batches[0]), fx.plates):
                params = fx.svi.get_params(svi_state)
                chunked = sample_posterior(fx.svi, key, params, batch, 7, fx.layout, draws_per_chunk=3)
                whole = sample_posterior(fx.svi, key, params, batch, 7, fx.layout)
            return chunked, whole

        chunked, whole = both(fx.state.svi_state, jax.random.key(4))
        assert chunked["w"].shape == (7,) and set(chunked) == {"w", "b"}
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), chunked, whole)
        assert len(np.unique(np.asarray(whole["w"]))) == 7


class TestPointwiseLpd:
    def test_matches_numpy_summing_sites_and_event_dims(self):
        rng = np.random.default_rng(0)
        a = rng.normal(-2.0, 1.0, size=(5, 4))  # (draws, rows)
        b = rng.normal(-1.0, 0.5, size=(5, 4, 3))  # (draws, rows, event)
        expected = np.log(np.mean(np.exp(a), axis=0)) + np.log(np.mean(np.exp(b), axis=0)).sum(axis=1)
        lpd = jax.jit(pointwise_lpd)({"a": jnp.asarray(a), "b": jnp.asarray(b)})
        assert lpd.shape == (4,)
        np.testing.assert_allclose(lpd, expected, rtol=1e-5)

    def test_stable_for_very_unlikely_rows(self):
        values = np.array([[-1000.0, -3.0], [-1001.0, -4.0], [-1002.0, -5.0]])  # exp(-1000) == 0.0
        top = values.max(axis=0)
        expected = top + np.log(np.mean(np.exp(values - top), axis=0))
        np.testing.assert_allclose(pointwise_lpd({"y": jnp.asarray(values)}), expected, rtol=1e-6)


NUM_SAMPLES, VAL_ROWS = 4, 20


@pytest.fixture(scope="module")
def val(fx):
    """Validation data (a last batch that wraps around), a trained state, the compiled step."""
    val_data = {key: jnp.asarray(value) for key, value in linear_data(VAL_ROWS, seed=1).items()}
    source = ValidationSource(VAL_ROWS, BATCH, process_index=0, process_count=1)
    trained, _, _ = fx.chunk(fx.state, fx.data, record(fx.batches))
    validate = jax.jit(make_validation_step(fx.svi, NUM_SAMPLES, NUM_ROWS, fx.layout))
    params_of = jax.jit(make_params(fx.svi, fx.plates))

    def step(svi_state, rng_key, data, rec):  # validation takes the constrained parameters
        return validate(params_of(svi_state, fx.data, record(fx.batches)), rng_key, data, rec)

    return val_data, source, trained.svi_state, step


class TestValidationStep:
    def test_outputs_match_numpyro_by_hand(self, fx, val):
        val_data, source, svi_state, step = val
        rec = source[len(source) - 1]  # rows 16..19 then 0..3 again with weight 0
        rng_key = jax.random.key(21)
        loss, lpd_sum, weight_sum = step(svi_state, rng_key, val_data, rec).values()

        rows, weights = rec["indices"][0], rec["weights"][0]
        batch = {key: array[rows] for key, array in val_data.items()}
        reference = linear_svi(NUM_ROWS)
        reference.init(fx.key, **batch)
        params = reference.get_params(svi_state)
        loss_key, draw_key, plate_key = jax.random.split(rng_key, 3)
        expected_loss = Trace_ELBO().loss(loss_key, params, reference.model, reference.guide, **batch)
        np.testing.assert_allclose(loss, expected_loss / NUM_ROWS, rtol=1e-5)

        draws = jax.vmap(lambda key: reference.guide.sample_posterior(key, params, **batch))(
            jax.random.split(draw_key, NUM_SAMPLES)
        )
        latent = {name: draws[name] for name in ("w", "b")}
        ll = log_likelihood(seed(reference.model, plate_key), latent, **batch)["y"]
        assert ll.shape == (NUM_SAMPLES, BATCH)
        lpd = logsumexp(ll, axis=0) - np.log(NUM_SAMPLES)
        np.testing.assert_allclose(lpd_sum, np.sum(lpd * weights), rtol=1e-5)
        assert float(weight_sum) == 4.0

        # The same number from the normal density itself, in NumPy.
        mu = np.asarray(latent["w"])[:, None] * np.asarray(batch["x"]) + np.asarray(latent["b"])[:, None]
        normal = -0.5 * ((np.asarray(batch["y"]) - mu) / NOISE) ** 2 - np.log(NOISE * np.sqrt(2 * np.pi))
        by_hand = np.log(np.mean(np.exp(normal.astype(np.float64)), axis=0))
        np.testing.assert_allclose(lpd_sum, np.sum(by_hand * weights), rtol=1e-4)

    def test_weights_only_weigh_the_lpd(self, fx, val):
        val_data, source, svi_state, step = val
        rec = source[len(source) - 1]
        key = jax.random.key(5)
        outputs = {}
        for name, weights in [("real", rec["weights"]), ("wrapped", 1 - rec["weights"]), ("all", np.ones((1, BATCH)))]:
            outputs[name] = step(svi_state, key, val_data, {**rec, "weights": np.asarray(weights, np.float32)}).values()
        losses = {float(loss) for loss, _, _ in outputs.values()}
        assert len(losses) == 1  # the loss does not depend on the weights
        assert [float(w) for _, _, w in outputs.values()] == [4.0, 4.0, 8.0]
        lpd = {name: float(lpd_sum) for name, (_, lpd_sum, _) in outputs.items()}
        assert lpd["real"] != lpd["wrapped"]
        np.testing.assert_allclose(lpd["real"] + lpd["wrapped"], lpd["all"], rtol=1e-5)

    def test_same_key_same_outputs(self, fx, val):
        val_data, source, svi_state, step = val
        first, again, other = (
            list(step(svi_state, jax.random.key(seed), val_data, source[0]).values()) for seed in (1, 1, 2)
        )
        assert [float(v) for v in first] == [float(v) for v in again]
        assert float(first[0]) != float(other[0]) and float(first[1]) != float(other[1])

    def test_model_without_observed_site_has_no_lpd(self):
        def model(x):
            w = numpyro.sample("w", dist.Normal(0.0, 1.0))
            numpyro.deterministic("wx", w * x)

        svi = SVI(model, AutoNormal(model), adam(0.05), Trace_ELBO())
        data = {"x": jnp.arange(6.0)}
        rec = {"indices": np.arange(6)[None], "rows": {}, "weights": np.ones((1, 6), np.float32), "num_steps": 1}
        state = jax.jit(make_init(svi, ()))(jax.random.key(0), data, rec)
        rng_key = jax.random.key(8)
        step = make_validation_step(svi, 3, 12, layout(svi, data, 6))
        outputs = jax.jit(step)(jax.jit(make_params(svi, ()))(state.svi_state, data, rec), rng_key, data, rec)
        assert set(outputs) == {"loss", "weight_sum"} and float(outputs["weight_sum"]) == 6.0
        loss = outputs["loss"]
        svi.init(jax.random.key(0), **data)
        params = svi.get_params(state.svi_state)
        expected = Trace_ELBO().loss(jax.random.split(rng_key, 3)[0], params, model, svi.guide, **data)
        np.testing.assert_allclose(loss, expected / 12, rtol=1e-5)

    def test_static_keyword_arguments_reach_the_model_and_guide(self):
        def model(x, y=None, *, noise):
            w = numpyro.sample("w", dist.Normal(0.0, 1.0))
            with numpyro.plate("data", x.shape[0]):
                numpyro.deterministic("mu", w * x)
                numpyro.sample("y", dist.Normal(w * x, noise), obs=y)

        data = {"x": jnp.linspace(-1, 1, 6), "y": jnp.linspace(-2, 2, 6)}
        rec = {"indices": np.arange(6)[None], "rows": {}, "weights": np.ones((1, 6), np.float32), "num_steps": 1}
        outputs = {}
        for noise in (0.1, 10.0):
            svi = SVI(model, AutoNormal(model), adam(0.05), Trace_ELBO(), noise=noise)
            shape = layout(svi, data, 6)
            state = jax.jit(make_init(svi, ()))(jax.random.key(0), data, rec)
            step = make_validation_step(svi, 4, 6, shape)
            params = jax.jit(make_params(svi, ()))(state.svi_state, data, rec)
            outputs[noise] = jax.jit(step)(params, jax.random.key(1), data, rec)
            draws = jax.jit(make_posterior_sampler(svi, 4, shape))(state.svi_state, jax.random.key(2), data, rec)
            assert set(draws) == {"w"}
        # A wide likelihood makes the same data far less surprising.
        assert float(outputs[10.0]["lpd_sum"]) > float(outputs[0.1]["lpd_sum"])


class TestCheckModelAccepts:
    @staticmethod
    def model(x, y=None, *, mask=None):
        pass

    def test_accepts_keyword_parameters(self):
        check_model_accepts(self.model, ["x", "y", "mask"])
        check_model_accepts(self.model, ["x"])

    def test_accepts_anything_with_var_keyword(self):
        def model(x, **kwargs):
            pass

        check_model_accepts(model, ["x", "anything"])

    def test_rejects_unknown_keys_naming_them_and_the_parameters(self):
        with pytest.raises(DataError, match=r"data key\(s\) \['X', 'z'\].*are \['x', 'y', 'mask'\]"):
            check_model_accepts(self.model, ["X", "y", "z"])

    def test_positional_only_parameters_cannot_take_keywords(self):
        def model(x, /, y):
            pass

        with pytest.raises(DataError, match=r"\['x'\]"):
            check_model_accepts(model, ["x", "y"])

    def test_uninspectable_callables_are_not_checked(self):
        check_model_accepts(max, ["anything"])  # inspect.signature(max) fails


def _guide_list(model):
    guide = AutoGuideList(model)
    guide.append(AutoNormal(block(model, hide=["b", "mu"])))
    guide.append(AutoDelta(block(model, expose=["b"])))
    return guide


class _NumpyInSetUp(AutoNormal):
    """A guide whose set-up reads a computed value with NumPy: it only runs on values."""

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        self.init_total = float(np.sum([np.sum(np.asarray(value)) for value in self._init_locs.values()]))


class TestSetUpGuide:
    """``set_up_guide`` computes NumPyro's set-up of a guide in one compiled program: the guide must
    be left as a set-up on values (the guide's own first call, op by op) leaves it."""

    @staticmethod
    def model(x, y=None, *, seen=None):
        w = numpyro.sample("w", dist.Normal(0.0, 1.0))
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        scale = numpyro.sample("scale", dist.LogNormal(0.0, 0.5))
        if seen is not None:
            seen.append(isinstance(w, jax.core.Tracer))
        with numpyro.plate("data", x.shape[0]):
            mu = numpyro.deterministic("mu", w * x + b)
            numpyro.sample("y", dist.Normal(mu, scale), obs=y)

    @staticmethod
    def compare(compiled, eager, kwargs):
        assert list(compiled.prototype_trace) == list(eager.prototype_trace)
        for name, site in eager.prototype_trace.items():
            value = compiled.prototype_trace[name]["value"]  # computed by XLA whole, or op by op: to an ulp
            np.testing.assert_allclose(np.asarray(value), np.asarray(site["value"]), rtol=1e-6)
        parts = [compiled, *getattr(compiled, "_guides", ())]
        assert not any(isinstance(node, jax.core.Tracer) for part in parts for node in _reachable(vars(part)))
        svi = SVI(TestSetUpGuide.model, eager, adam(0.05), Trace_ELBO())
        params = svi.get_params(svi.init(jax.random.key(3), **kwargs))
        params = jax.tree.map(lambda value: value * 1.1, params)  # away from the initial values
        for guide in (compiled, eager):
            guide.drawn = guide.sample_posterior(jax.random.key(4), params, sample_shape=(5,), **kwargs)
        assert sorted(compiled.drawn) == sorted(eager.drawn)
        for name, value in eager.drawn.items():
            np.testing.assert_array_equal(np.asarray(compiled.drawn[name]), np.asarray(value))
        if hasattr(eager, "median") and not isinstance(eager, AutoGuideList):
            for name, value in eager.median(params).items():
                np.testing.assert_array_equal(np.asarray(compiled.median(params)[name]), np.asarray(value))

    @pytest.mark.parametrize(
        "make_guide",
        [AutoNormal, AutoDiagonalNormal, AutoDelta, AutoMultivariateNormal, AutoLowRankMultivariateNormal, _guide_list],
    )
    def test_leaves_the_guide_as_a_set_up_on_values(self, make_guide):
        kwargs = {"x": np.linspace(-1, 1, 6, dtype=np.float32), "y": np.linspace(0, 1, 6, dtype=np.float32)}
        compiled, eager = make_guide(self.model), make_guide(self.model)
        seen = []
        set_up_guide(compiled, jax.random.key(1), {**kwargs, "seen": seen})
        assert seen and all(seen), seen  # every run of the model was traced: nothing ran op by op
        assert compiled.prototype_trace["y"]["value"] is kwargs["y"]  # the data kept as given, as on values
        seed(eager, jax.random.key(1))(**kwargs)
        self.compare(compiled, eager, kwargs)

    def test_a_set_up_that_only_runs_on_values_runs_on_values(self):
        kwargs = {"x": np.linspace(-1, 1, 6, dtype=np.float32), "y": np.linspace(0, 1, 6, dtype=np.float32)}
        compiled, eager = _NumpyInSetUp(self.model), _NumpyInSetUp(self.model)
        seen = []
        set_up_guide(compiled, jax.random.key(1), {**kwargs, "seen": seen})
        assert False in seen  # the compiled set-up could not trace: the set-up ran on values
        seed(eager, jax.random.key(1))(**kwargs)
        assert compiled.init_total == eager.init_total
        self.compare(compiled, eager, kwargs)

    @pytest.mark.parametrize("make_guide", [AutoDiagonalNormal, AutoMultivariateNormal, AutoNormal])
    def test_a_fits_parameters_read_right_by_the_guide_set_up_on_values(self, make_guide):
        """The sites' layout in a fit's parameters is the one a set-up on values reads: an
        AutoContinuous guide's latent vector in the model's order (``w`` before ``b``), not by
        name, so ``guide.sample_posterior`` gives each site its own values, those the fit drew."""
        x = np.linspace(-1, 1, 200, dtype=np.float32)
        data = {"x": x, "y": (3.0 * x - 5.0).astype(np.float32)}
        guide = make_guide(self.model)
        svi = SVI(self.model, guide, adam(0.05), Trace_ELBO())
        result = Trainer(max_epochs=150, rng_key=jax.random.key(0), enable_progress_bar=False).fit(
            svi, data, batch_size=200, num_samples=100
        )
        fitted = {name: float(result.posterior[name].mean()) for name in ("w", "b")}
        assert fitted["w"] - fitted["b"] > 2.0  # on their way to 3 and -5: apart, so a swap shows
        seed(guide, jax.random.key(1))(**data)  # NumPyro's own set-up, on values
        draws = guide.sample_posterior(jax.random.key(2), result.params, sample_shape=(400,), **data)
        for name, mean in fitted.items():
            assert abs(float(draws[name].mean()) - mean) < 0.1, (name, float(draws[name].mean()), mean)
