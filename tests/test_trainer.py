"""Trainer.fit end to end on small data: results, determinism, hooks, stops and bad input."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.svi import SVIState
from optax import adam

from aimz_trainer import (
    Callback,
    ConfigurationError,
    DataError,
    ModelCheckpoint,
    NonFiniteLossError,
    ProgressBar,
    Trainer,
)

from .conftest import TRUE_SLOPE, Recorder, linear_data


def trainer(**kwargs) -> Trainer:
    kwargs.setdefault("rng_key", jax.random.key(0))
    kwargs.setdefault("enable_progress_bar", False)
    return Trainer(**kwargs)


def test_fit_learns_the_linear_model_and_returns_posterior_draws(make_linear):
    svi, data = make_linear(1000)
    t = trainer(max_epochs=30)
    result = t.fit(svi, data, batch_size=100, num_samples=50)

    assert isinstance(result.losses, np.ndarray) and result.losses.shape == (300,)
    assert result.losses[-10:].mean() < 0.2 * result.losses[:10].mean()
    assert abs(float(result.params["w_auto_loc"]) - TRUE_SLOPE) < 0.1
    assert result.posterior["w"].shape == (50,) and result.posterior["b"].shape == (50,)
    assert "mu" not in result.posterior  # a per-row deterministic site: one batch's values, left out
    assert isinstance(result.state, SVIState)
    assert t.state.step == 300 and t.state.epoch == 29
    assert t.mesh.axis_names == ("data",)
    assert set(t.callback_metrics) >= {"train_loss", "steps_per_sec"}


def test_same_key_same_losses_and_other_key_other_losses(make_linear):
    svi, data = make_linear(600)
    first = trainer(max_epochs=2).fit(svi, data, batch_size=60).losses
    again = trainer(max_epochs=2).fit(svi, data, batch_size=60).losses
    other = trainer(max_epochs=2, rng_key=jax.random.key(1)).fit(svi, data, batch_size=60).losses
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


def test_device_and_host_placement_and_chunk_size_give_the_same_fit(make_linear):
    svi, data = make_linear(600)
    device = trainer(max_epochs=2).fit(svi, data, batch_size=60, data_placement="device")
    host_trainer = trainer(max_epochs=2, steps_per_chunk=3)
    host = host_trainer.fit(svi, data, batch_size=60, data_placement="host")
    assert host_trainer.placement == "host"
    np.testing.assert_allclose(device.losses, host.losses, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), device.params, host.params)


def test_jax_arrays_and_a_legacy_key_are_accepted_with_a_warning(make_linear):
    svi, data = make_linear(200)
    jax_data = {k: jnp.asarray(v) for k, v in data.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        legacy = jax.random.PRNGKey(0)
    with pytest.warns(UserWarning, match="rng_key is a legacy uint32 key"):
        trainer_with_legacy_key = Trainer(max_steps=4, rng_key=legacy, enable_progress_bar=False)
    result = trainer_with_legacy_key.fit(svi, jax_data, batch_size=50)
    assert result.losses.shape == (4,)


def test_max_steps_stops_mid_epoch(make_linear):
    svi, data = make_linear(1000)
    t = trainer(max_epochs=5, max_steps=23, steps_per_chunk=4)
    result = t.fit(svi, data, batch_size=100)
    assert result.losses.shape == (23,)
    assert t.state.step == 23 and t.state.epoch == 2


def test_partial_batch_keeps_one_shape_and_compiles_independently_of_epochs(make_linear):
    compiles: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        counts = []
        for epochs in (2, 5):
            svi, data = make_linear(1050)
            compiles.clear()
            result = trainer(max_epochs=epochs, steps_per_chunk=4).fit(svi, data, batch_size=100, num_samples=3)
            assert result.losses.shape == (11 * epochs,)
            counts.append(len(compiles))
    finally:
        jax.monitoring.clear_event_listeners()
    assert counts[0] == counts[1]


def test_hooks_run_in_order_once_per_chunk_and_epoch(make_linear):
    svi, data = make_linear(400)
    recorder = Recorder()
    result = trainer(max_epochs=2, steps_per_chunk=2, callbacks=[recorder]).fit(svi, data, batch_size=100)
    hooks = [call[0] for call in recorder.calls]
    assert hooks == [
        "fit_start",
        "epoch_start", "chunk_end", "chunk_end", "epoch_end",
        "epoch_start", "chunk_end", "chunk_end", "epoch_end",
        "fit_end", "teardown",
    ]  # fmt: skip
    assert [steps for _, steps in recorder.chunks] == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    np.testing.assert_array_equal(np.concatenate([losses for losses, _ in recorder.chunks]), result.losses)


def test_stop_request_ends_at_a_chunk_boundary_and_still_runs_fit_end(make_linear):
    svi, data = make_linear(1000)
    recorder = Recorder(stop_after_chunks=1)
    t = trainer(max_epochs=10, steps_per_chunk=2, callbacks=[recorder])
    result = t.fit(svi, data, batch_size=100)
    # The chunk in flight when the request is made is dropped: the fit ends where it was asked.
    assert result.losses.size == 2 and t.state.step == 2
    assert [steps for _, steps in recorder.chunks] == [range(0, 2)]
    assert [call[0] for call in recorder.calls][-2:] == ["fit_end", "teardown"]


def test_exception_in_a_callback_reaches_every_callback_and_propagates(make_linear):
    class Boom(Callback):
        def on_train_chunk_end(self, trainer, progress, losses, steps):
            raise KeyboardInterrupt

    svi, data = make_linear(400)
    recorder = Recorder()
    with pytest.raises(KeyboardInterrupt):
        trainer(max_epochs=2, callbacks=[Boom(), recorder]).fit(svi, data, batch_size=100)
    assert [call[0] for call in recorder.calls][-2:] == ["exception:KeyboardInterrupt", "teardown"]


class TestNonFiniteLoss:
    @staticmethod
    def poisoned(make_linear):
        svi, data = make_linear(1000)
        # Finite, but its squared error overflows float32: with shuffle=False, row 730 is in
        # step 7 of batch 100, whose loss is inf.
        data["x"][730] = 1e30
        return svi, data

    def test_raises_naming_the_step_and_keeps_the_last_good_state(self, make_linear):
        svi, data = self.poisoned(make_linear)
        t = trainer(max_epochs=3, steps_per_chunk=3)
        with pytest.raises(NonFiniteLossError, match="step 7 is inf") as caught:
            t.fit(svi, data, batch_size=100, shuffle=False)
        assert caught.value.step == 7
        seven = trainer(max_steps=7, steps_per_chunk=3).fit(svi, data, batch_size=100, shuffle=False)
        jax.tree.map(np.testing.assert_array_equal, t.state.svi_state.optim_state, seven.state.optim_state)

    def test_warn_mode_returns_the_fit_up_to_the_bad_step(self, make_linear):
        svi, data = self.poisoned(make_linear)
        with pytest.warns(RuntimeWarning, match="step 7 is inf"):
            result = trainer(max_epochs=3, nonfinite_loss="warn").fit(svi, data, batch_size=100, shuffle=False)
        assert result.losses.shape == (7,) and np.isfinite(result.losses).all()

    @pytest.mark.parametrize("which", ["train_data", "val_data"])
    def test_non_finite_data_is_refused_before_training_naming_the_row(self, make_linear, which):
        svi, data = make_linear(200)
        val = {key: value.copy() for key, value in data.items()}
        (data if which == "train_data" else val)["x"][123] = np.nan
        with pytest.raises(DataError, match=rf"{which}\['x'\] holds nan at row 123 \(1 non-finite value\(s\) in all\)"):
            trainer(max_epochs=1).fit(svi, data, batch_size=50, val_data=val)

    def test_a_non_finite_val_lpd_is_reported_not_dropped(self, make_linear):
        svi, data = make_linear(200)
        val = {key: value.copy() for key, value in data.items()}
        val["x"][7] = 1e30  # finite, but no draw gives y a density there
        t = trainer(max_epochs=1)
        t.fit(svi, data, batch_size=50, val_data=val)
        assert t.callback_metrics["val_lpd"] == -np.inf


class TestBadInput:
    def test_no_limit_at_all(self):
        with pytest.raises(ConfigurationError, match="set max_epochs, max_steps or max_time"):
            Trainer()

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"max_epochs": 0}, "max_epochs must be a positive int or None; got 0"),
            ({"max_epochs": 1, "max_steps": 2.5}, "max_steps must be a positive int"),
            ({"max_epochs": 1, "nonfinite_loss": "ignore"}, "nonfinite_loss must be 'raise' or 'warn'"),
            ({"max_epochs": 1, "devices": 99}, r"devices=99 but \d+ device\(s\) are available"),
            ({"max_epochs": 1, "callbacks": [object()]}, "callbacks must be aimz_trainer.callbacks.Callback"),
            ({"max_epochs": 1, "rng_key": 3}, r"rng_key must be one key, jax.random.key\(seed\); got 3"),
        ],
    )
    def test_trainer_arguments(self, kwargs, message):
        with pytest.raises(ConfigurationError, match=message):
            Trainer(**kwargs)

    def test_data_key_the_model_does_not_accept(self, make_linear):
        svi, data = make_linear(100)
        with pytest.raises(DataError, match=r"does not accept the train_data key\(s\) \[.z.\].*parameters are"):
            trainer(max_epochs=1).fit(svi, {**data, "z": data["x"]}, batch_size=10)

    def test_arrays_of_different_lengths(self, make_linear):
        svi, data = make_linear(100)
        with pytest.raises(DataError, match="same number of rows"):
            trainer(max_epochs=1).fit(svi, {"x": data["x"], "y": data["y"][:50]}, batch_size=10)

    @pytest.mark.parametrize("batch_size", [0, 101])
    def test_batch_size_out_of_range(self, make_linear, batch_size):
        svi, data = make_linear(100)
        with pytest.raises(ConfigurationError, match="batch_size must be between 1 and the number of rows"):
            trainer(max_epochs=1).fit(svi, data, batch_size=batch_size)

    def test_not_an_svi(self, make_linear):
        _, data = make_linear(100)
        with pytest.raises(ConfigurationError, match="svi must be a numpyro.infer.SVI; got function"):
            trainer(max_epochs=1).fit(lambda x: x, data, batch_size=10)

    def test_negative_num_samples(self, make_linear):
        svi, data = make_linear(100)
        with pytest.raises(ConfigurationError, match="num_samples must be an int >= 0; got -1"):
            trainer(max_epochs=1).fit(svi, data, batch_size=10, num_samples=-1)


class TestProgressBar:
    def test_added_only_for_a_terminal_outside_ci(self, monkeypatch):
        monkeypatch.setattr("sys.stdout.isatty", lambda: True)
        monkeypatch.delenv("CI", raising=False)
        assert any(isinstance(c, ProgressBar) for c in Trainer(max_epochs=1).callbacks)
        assert not Trainer(max_epochs=1, enable_progress_bar=False, enable_model_summary=False).callbacks
        monkeypatch.setenv("CI", "true")
        assert not Trainer(max_epochs=1, enable_model_summary=False).callbacks

    def test_draws_one_bar_per_epoch(self, make_linear, capsys):
        svi, data = make_linear(400)
        trainer(max_epochs=2, steps_per_chunk=2, callbacks=[ProgressBar()]).fit(svi, data, batch_size=100)
        err = capsys.readouterr().err
        assert "epoch 0" in err and "epoch 1" in err and "4/4" in err


@pytest.mark.parametrize("placement", ["device", "host"])
def test_global_deterministic_draws_are_computed_on_the_first_rows_also_after_a_resume(placement, tmp_path):
    """A global deterministic site that reads the batch (the batch mean of x) is computed on the
    data's first batch_size rows: the same in an uninterrupted fit and in one resumed from a
    checkpoint, whose first batch is another."""

    def model(x, y=None):
        w = numpyro.sample("w", dist.Normal())
        numpyro.deterministic("w_times_mean_x", w * jnp.mean(x))
        with numpyro.plate("data", 600, subsample_size=len(x)):
            numpyro.sample("y", dist.Normal(w * x, 0.3), obs=y)

    data = linear_data(600)
    svi = SVI(model, AutoNormal(model), adam(0.05), Trace_ELBO())
    fit = dict(batch_size=60, num_samples=8, data_placement=placement)
    whole = trainer(max_epochs=4).fit(svi, data, **fit)
    trainer(max_epochs=2, callbacks=[ModelCheckpoint(tmp_path)]).fit(svi, data, **fit)
    resumed = trainer(max_epochs=4, callbacks=[ModelCheckpoint(tmp_path)]).fit(svi, data, ckpt_path="last", **fit)
    np.testing.assert_array_equal(resumed.posterior["w"], whole.posterior["w"])
    np.testing.assert_array_equal(resumed.posterior["w_times_mean_x"], whole.posterior["w_times_mean_x"])
    np.testing.assert_allclose(
        whole.posterior["w_times_mean_x"], whole.posterior["w"] * data["x"][:60].mean(), rtol=1e-5
    )
