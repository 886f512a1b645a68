"""The hook system seen through a fit: order, chunk boundaries, stops, the exception path,
validation metrics, callback state keys and posterior sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer import Trace_ELBO

from aimz_trainer import Callback, ConfigurationError, DataError, PosteriorSampler, Trainer
from aimz_trainer.plates import model_layout
from aimz_trainer.step import make_validation_step
from aimz_trainer.trainer import FitKeys

from .conftest import Recorder, linear_data, linear_svi


def trainer(**kwargs) -> Trainer:
    kwargs.setdefault("rng_key", jax.random.key(0))
    kwargs.setdefault("enable_progress_bar", False)
    return Trainer(**kwargs)


class Monitor(Recorder):
    monitors_metrics = True

    def _record(self, hook, progress):
        super()._record(f"monitor:{hook}", progress)


class Shared:
    """One list the callbacks of a fit append to, to see their relative order."""

    def __init__(self):
        self.calls = []


class Named(Callback):
    def __init__(self, name, log):
        self.name, self.log = name, log

    def on_train_epoch_end(self, trainer, progress):
        self.log.append((self.name, dict(progress.metrics)))


class NamedMonitor(Named):
    monitors_metrics = True


def test_hook_order_with_validation_and_monitors_last(make_linear):
    svi, data = make_linear(400)
    log = []
    callbacks = [NamedMonitor("monitor", log), Named("first", log), Named("second", log)]
    recorder = Recorder()
    t = trainer(max_epochs=2, steps_per_chunk=2, callbacks=[*callbacks, recorder])
    t.fit(svi, data, batch_size=100, val_data=linear_data(150, seed=1))
    assert [call[0] for call in recorder.calls] == [
        "fit_start",
        "epoch_start", "chunk_end", "chunk_end", "validation_end", "epoch_end",
        "epoch_start", "chunk_end", "chunk_end", "validation_end", "epoch_end",
        "fit_end", "teardown",
    ]  # fmt: skip
    assert [name for name, _ in log] == ["first", "second", "monitor"] * 2
    # At epoch end every metric of the epoch is there, validation included.
    assert set(log[-1][1]) >= {"train_loss", "train_loss_epoch", "epoch_time", "val_loss", "val_lpd", "steps_per_sec"}
    assert [step for hook, step, _ in recorder.calls if hook == "validation_end"] == [4, 8]


def test_epoch_metrics_match_the_losses(make_linear):
    svi, data = make_linear(400)

    class EpochMeans(Callback):
        def __init__(self):
            self.means = []

        def on_train_epoch_end(self, trainer, progress):
            self.means.append(progress.metrics["train_loss_epoch"])

    means = EpochMeans()
    result = trainer(max_epochs=3, steps_per_chunk=3, callbacks=[means]).fit(svi, data, batch_size=100)
    np.testing.assert_allclose(means.means, result.losses.reshape(3, 4).mean(axis=1), rtol=1e-6)


def test_chunks_end_at_every_interval_a_callback_asks_for_without_recompiling(make_linear):
    class EverySeven(Recorder):
        def step_interval(self, trainer):
            return 7

    compiles: list[str] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    svi, data = make_linear(1000)
    recorder = EverySeven()
    counts = []
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for callbacks in ([], [], [recorder]):
            compiles.clear()
            result = trainer(max_epochs=2, callbacks=callbacks).fit(svi, data, batch_size=100)
            counts.append(len(compiles))
    finally:
        jax.monitoring.clear_event_listeners()
    ends = [steps.stop for _, steps in recorder.chunks]
    assert ends == [7, 10, 14, 20]
    assert result.losses.size == 20
    # Chunks of 7, 3, 4 and 6 steps run through one compiled function: no compile per length.
    assert counts[1] == counts[2]  # (the first fit also compiles one-off helpers)


def test_a_stop_requested_at_an_epoch_end_ends_the_fit_there(make_linear):
    class StopAfterSecondEpoch(Callback):
        def on_train_epoch_end(self, trainer, progress):
            if progress.epoch == 1:
                trainer.request_stop("enough")

    svi, data = make_linear(1000)
    recorder = Recorder()
    t = trainer(max_epochs=10, steps_per_chunk=5, callbacks=[StopAfterSecondEpoch(), recorder])
    result = t.fit(svi, data, batch_size=100)
    assert result.losses.size == 20 and t.state.step == 20
    assert t.should_stop and t.stop_reason == "enough"
    assert [call[0] for call in recorder.calls][-3:] == ["epoch_end", "fit_end", "teardown"]


def test_a_stop_flag_set_directly_works_too(make_linear):
    class Flag(Callback):
        def on_train_epoch_end(self, trainer, progress):
            trainer.should_stop = True

    svi, data = make_linear(1000)
    result = trainer(max_epochs=10, callbacks=[Flag()]).fit(svi, data, batch_size=100)
    assert result.losses.size == 10


def test_a_lambda_callback_runs_its_functions_logs_and_stops(make_linear, tmp_path):
    from aimz_trainer import CSVLogger
    from aimz_trainer.callbacks import LambdaCallback

    ends = []

    def at_epoch_end(fit, progress):
        fit.log("epoch_squared", float(progress.epoch**2))
        if progress.epoch == 2:
            fit.request_stop("three epochs")

    callback = LambdaCallback(
        on_train_epoch_end=at_epoch_end, on_fit_end=lambda fit, progress: ends.append(progress.step)
    )
    svi, data = make_linear(1000)
    t = trainer(max_epochs=10, callbacks=[callback, CSVLogger(tmp_path / "metrics.csv")])
    result = t.fit(svi, data, batch_size=100)
    assert result.losses.size == 30 and ends == [30] and t.stop_reason == "three epochs"
    lines = [line for line in (tmp_path / "metrics.csv").read_text().splitlines() if ",epoch_squared," in line]
    assert [float(line.rsplit(",", 1)[1]) for line in lines] == [0.0, 1.0, 4.0]
    with pytest.raises(ConfigurationError, match=r"\['on_epoch_end'\], which are not hooks"):
        LambdaCallback(on_epoch_end=print)
    with pytest.raises(ConfigurationError, match=r"on_fit_end=...\) must be a function; got 3"):
        LambdaCallback(on_fit_end=3)


class TestExceptionPath:
    def test_an_error_in_one_handler_does_not_hide_the_others_or_the_original(self, make_linear):
        class Boom(Callback):
            def on_validation_end(self, trainer, progress):
                raise RuntimeError("boom")

        class BadHandler(Callback):
            def on_exception(self, trainer, progress, exception):
                raise ValueError("handler failed")

        svi, data = make_linear(400)
        recorder = Recorder()
        t = trainer(max_epochs=3, callbacks=[BadHandler(), Boom(), recorder])
        with (
            pytest.warns(RuntimeWarning, match="BadHandler.on_exception raised"),
            pytest.raises(RuntimeError, match="boom"),
        ):
            t.fit(svi, data, batch_size=100, val_data=linear_data(100, seed=1))
        # Boom raised before the recorder's turn at validation end.
        assert [call[0] for call in recorder.calls][-3:] == ["chunk_end", "exception:RuntimeError", "teardown"]

    def test_keyboard_interrupt_reaches_on_exception_and_teardown(self, make_linear):
        class Interrupt(Callback):
            def on_train_epoch_start(self, trainer, progress):
                if progress.epoch == 1:
                    raise KeyboardInterrupt

        svi, data = make_linear(400)
        recorder = Recorder()
        with pytest.raises(KeyboardInterrupt):
            trainer(max_epochs=3, callbacks=[Interrupt(), recorder]).fit(svi, data, batch_size=100)
        assert [call[0] for call in recorder.calls][-2:] == ["exception:KeyboardInterrupt", "teardown"]


class TestValidation:
    def test_metrics_equal_a_numpyro_computation_of_the_same_elbo(self, make_linear):
        svi, data = make_linear(1000)
        val = linear_data(250, seed=1)  # 3 batches of 100: the last one wraps around 50 rows

        class Capture(Callback):
            def on_validation_end(self, trainer, progress):
                self.metrics = dict(progress.metrics)

        capture = Capture()
        t = trainer(max_epochs=1, callbacks=[capture])
        result = t.fit(svi, data, batch_size=100, val_data=val, val_num_samples=8)

        params = result.params  # validation ran after the last step
        reference = linear_svi(1000)  # a fresh SVI set up the way NumPyro users do
        reference.init(jax.random.key(0), **val)
        # The per-batch step is checked against NumPyro's log_likelihood in test_step.py; here,
        # the fit's keys, batches, weights and the way batches are combined.
        layout = model_layout(svi.model, val, batch_rows=100)
        step = jax.jit(make_validation_step(svi, 8, 1000, layout))
        validation_key = FitKeys.split(jax.random.key(0)).validation
        losses, lpds, weights = [], [], []
        for index in range(3):
            rows = np.arange(index * 100, (index + 1) * 100)
            batch = {key: array[rows % 250] for key, array in val.items()}
            key = jax.random.fold_in(validation_key, index)
            loss_key, _, _ = jax.random.split(key, 3)
            elbo = Trace_ELBO().loss(loss_key, params, reference.model, reference.guide, **batch)
            losses.append(float(elbo) / 1000)
            record = {
                "indices": (rows % 250)[None],
                "rows": {},
                "weights": (rows < 250)[None].astype(np.float32),
                "num_steps": np.int32(1),
            }
            outputs = step(result.params, key, {k: jnp.asarray(v) for k, v in val.items()}, record)
            loss, lpd_sum, weight_sum = outputs["loss"], outputs["lpd_sum"], outputs["weight_sum"]
            np.testing.assert_allclose(loss, losses[-1], rtol=1e-5)
            lpds.append(float(lpd_sum))
            weights.append(float(weight_sum))
        assert weights == [100, 100, 50]
        np.testing.assert_allclose(capture.metrics["val_loss"], np.dot(losses, weights) / 250, rtol=1e-5)
        np.testing.assert_allclose(capture.metrics["val_lpd"], sum(lpds) / 250, rtol=1e-5)

    def test_lpd_of_a_fitted_model_is_near_the_noise_entropy(self, make_linear):
        svi, data = make_linear(1000)
        t = trainer(max_epochs=20)
        t.fit(svi, data, batch_size=100, val_data=linear_data(500, seed=1), val_num_samples=50)
        # y ~ Normal(w x + b, 0.3): the best possible mean log density is -(log(0.3 sqrt(2 pi e))) = -0.22.
        assert -0.35 < t.callback_metrics["val_lpd"] < -0.1
        assert t.callback_metrics["val_loss"] == pytest.approx(-t.callback_metrics["val_lpd"], abs=0.1)

    def test_step_interval_and_every_n_epochs(self, make_linear):
        svi, data = make_linear(1000)
        val = linear_data(100, seed=1)
        recorder = Recorder()
        t = trainer(max_epochs=4, check_val_every_n_epoch=2, val_check_interval=4, callbacks=[recorder])
        t.fit(svi, data, batch_size=100, val_data=val)
        steps = [step for hook, step, _ in recorder.calls if hook == "validation_end"]
        assert steps == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40]  # every 4 steps; epochs 2 and 4 end on one
        recorder = Recorder()
        trainer(max_epochs=4, check_val_every_n_epoch=2, val_check_interval=0.5, callbacks=[recorder]).fit(
            svi, data, batch_size=100, val_data=val
        )
        assert [step for hook, step, _ in recorder.calls if hook == "validation_end"] == [5, 10, 15, 20, 25, 30, 35, 40]

    def test_no_validation_without_val_data(self, make_linear):
        svi, data = make_linear(200)
        t = trainer(max_epochs=1)
        t.fit(svi, data, batch_size=100)
        assert not t.has_validation and "val_loss" not in t.callback_metrics

    @pytest.mark.parametrize(
        ("val_data", "extra", "error", "message"),
        [
            ({"x": np.zeros(10, np.float32)}, {}, DataError, r"same keys as train_data: got \['x'\]"),
            (
                {"x": np.zeros((10, 2), np.float32), "y": np.zeros(10, np.float32)},
                {},
                DataError,
                r"val_data\['x'\] rows have shape \(2,\)",
            ),
            ("nope", {}, DataError, "val_data must be a mapping"),
            (None, {"val_batch_size": 0}, ConfigurationError, "val_batch_size must be a positive int"),
            (None, {"val_num_samples": 0}, ConfigurationError, "val_num_samples must be a positive int"),
        ],
    )
    def test_bad_validation_input(self, make_linear, val_data, extra, error, message):
        svi, data = make_linear(100)
        recorder = Recorder()
        with pytest.raises(error, match=message):
            trainer(max_epochs=1, callbacks=[recorder]).fit(
                svi, data, batch_size=10, val_data=val_data if val_data is not None else linear_data(20), **extra
            )
        assert recorder.calls == []  # nothing started

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"val_check_interval": 0}, "val_check_interval must be a positive int"),
            ({"val_check_interval": 1.5}, r"a float in \(0, 1\]"),
            ({"check_val_every_n_epoch": 0}, "check_val_every_n_epoch must be a positive int or None"),
        ],
    )
    def test_bad_validation_settings(self, kwargs, message):
        with pytest.raises(ConfigurationError, match=message):
            Trainer(max_epochs=1, **kwargs)


class TestCallbackState:
    def test_two_callbacks_with_the_same_state_key_are_refused_before_training(self, make_linear):
        class Counter(Recorder):
            def state_dict(self):
                return {"calls": len(self.calls)}

        svi, data = make_linear(100)
        first, second = Counter(), Counter()
        with pytest.raises(
            ConfigurationError, match="Counter and Counter, save their state under the same key 'Counter'"
        ):
            trainer(max_epochs=1, callbacks=[first, second]).fit(svi, data, batch_size=10)
        assert first.calls == [] and second.calls == []

    def test_stateless_callbacks_may_repeat(self, make_linear):
        svi, data = make_linear(100)
        trainer(max_epochs=1, callbacks=[Recorder(), Recorder()]).fit(svi, data, batch_size=10)

    def test_a_bad_step_interval_is_refused(self, make_linear):
        class Bad(Callback):
            def step_interval(self, trainer):
                return 0

        svi, data = make_linear(100)
        with pytest.raises(
            ConfigurationError, match=r"step_interval\(\) must return a positive int or None; check \['Bad'\]"
        ):
            trainer(max_epochs=1, callbacks=[Bad()]).fit(svi, data, batch_size=10)


class TestPosterior:
    def test_sampler_every_n_epochs_and_at_the_end(self, make_linear):
        svi, data = make_linear(400)
        sampler = PosteriorSampler(20, every_n_epochs=2)
        t = trainer(max_epochs=4, callbacks=[sampler])
        result = t.fit(svi, data, batch_size=100)
        assert sorted(sampler.history) == [1, 3]
        assert sampler.history[1]["w"].shape == (20,)
        assert not np.allclose(sampler.history[1]["w"], sampler.history[3]["w"])
        assert result.posterior is sampler.samples
        again = t.sample_posterior(20)
        np.testing.assert_array_equal(again["w"], result.posterior["w"])
        other = t.sample_posterior(20, jax.random.key(7))
        assert not np.allclose(other["w"], result.posterior["w"])

    def test_fit_num_samples_uses_the_sampler_and_the_trainers_params(self, make_linear):
        svi, data = make_linear(400)
        t = trainer(max_epochs=2)
        result = t.fit(svi, data, batch_size=100, num_samples=300)
        params = t.current_params()
        jax.tree.map(np.testing.assert_array_equal, params, result.params)
        draws = np.asarray(result.posterior["w"])
        assert abs(draws.mean() - float(params["w_auto_loc"])) < 4 * float(params["w_auto_scale"]) / np.sqrt(300) + 1e-3
        assert 0.8 < draws.std() / float(params["w_auto_scale"]) < 1.2

    def test_before_a_fit(self):
        t = Trainer(max_epochs=1)
        with pytest.raises(ConfigurationError, match=r"current_params\(\) needs a fit"):
            t.current_params()
        with pytest.raises(ConfigurationError, match="num_samples must be a positive int"):
            t.sample_posterior(0)
        with pytest.raises(ConfigurationError, match="every_n_epochs must be a positive int"):
            PosteriorSampler(10, every_n_epochs=0)
