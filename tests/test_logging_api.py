"""The callback contract's logging API and per-step metrics, read back from the loggers' files."""

from __future__ import annotations

import csv
from pathlib import Path

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoDelta
from numpyro.optim import SGD
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from aimz_trainer import (
    Callback,
    ConfigurationError,
    CSVLogger,
    EarlyStopping,
    FitContext,
    ModelCheckpoint,
    TensorBoardLogger,
    Trainer,
)
from aimz_trainer.callbacks import state_key_of
from aimz_trainer.plan import Every
from aimz_trainer.step import grad_norm, param_norm

from .conftest import linear_data, linear_svi

NUM_ROWS, BATCH, EPOCHS = 400, 100, 5  # 4 steps per epoch


def tensorboard_scalars(log_dir: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def csv_scalars(path: Path, metric: str) -> dict[int, float]:
    with path.open(newline="") as file:
        rows = [row for row in csv.DictReader(file) if row["metric"] == metric]
    steps = [int(row["step"]) for row in rows]
    assert len(steps) == len(set(steps)), f"{metric} written twice at one step: {steps}"
    return {int(row["step"]): float(row["value"]) for row in rows}


class EpochSquare(Callback):
    """Logs (epoch + 1) ** 2 at every epoch end, and the validation gap after each validation."""

    def on_train_epoch_end(self, fit: FitContext, progress):
        fit.log("epoch_square", (progress.epoch + 1) ** 2)

    def on_validation_end(self, fit: FitContext, progress):
        fit.log_dict({"val_gap": progress.metrics["val_loss"] - progress.metrics["train_loss_epoch"]})


def fit_with(callbacks, tmp_path: Path, *, max_epochs: int = EPOCHS, val: bool = False, **trainer_kwargs):
    trainer = Trainer(
        max_epochs=max_epochs,
        rng_key=jax.random.key(0),
        enable_progress_bar=False,
        callbacks=callbacks,
        **trainer_kwargs,
    )
    data = linear_data(NUM_ROWS)
    val_data = linear_data(200, seed=1) if val else None
    result = trainer.fit(linear_svi(NUM_ROWS), data, batch_size=BATCH, val_data=val_data)
    return trainer, result


def test_a_metric_logged_by_a_callback_reaches_tensorboard_and_the_csv_at_the_current_step(tmp_path):
    trainer, _ = fit_with(
        [EpochSquare(), TensorBoardLogger(tmp_path / "tb"), CSVLogger(tmp_path / "metrics.csv")], tmp_path, val=True
    )
    epoch_ends = [4 * (epoch + 1) - 1 for epoch in range(EPOCHS)]  # the last step index of each epoch
    expected = {step: float((epoch + 1) ** 2) for epoch, step in enumerate(epoch_ends)}
    assert tensorboard_scalars(tmp_path / "tb", "epoch_square") == expected
    assert csv_scalars(tmp_path / "metrics.csv", "epoch_square") == expected
    # Logged in on_validation_end from the values the fit had just computed.
    val_loss = csv_scalars(tmp_path / "metrics.csv", "val_loss")
    epoch_loss = csv_scalars(tmp_path / "metrics.csv", "train_loss_epoch")
    gaps = tensorboard_scalars(tmp_path / "tb", "val_gap")
    assert sorted(gaps) == epoch_ends
    for step in epoch_ends:
        assert gaps[step] == pytest.approx(val_loss[step] - epoch_loss[step], rel=1e-5)
    assert trainer.callback_metrics["epoch_square"] == EPOCHS**2


class LogsMyMetric(Callback):
    """Logs a metric that stops improving after the second validation (it rises from then on)."""

    def __init__(self) -> None:
        self.values = [5.0, 3.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0]
        self.logged = 0

    def on_validation_end(self, fit: FitContext, progress):
        fit.log("my_metric", self.values[self.logged])
        self.logged += 1


def test_early_stopping_monitors_a_metric_another_callback_logged_in_the_same_hook(tmp_path):
    stopper = EarlyStopping("my_metric", patience=2)  # given first: monitors run last anyway
    trainer, result = fit_with([stopper, LogsMyMetric()], tmp_path, max_epochs=8, val=True)
    # Checks at validations: 5 (best), 3 (best), 4, 6 -> two without improvement: stop after epoch 3.
    assert stopper.best_score == 3.0 and stopper.stopped_epoch == 3
    assert trainer.stop_reason is not None and "my_metric did not improve" in trainer.stop_reason
    assert len(result.losses) == 4 * 4


def test_early_stopping_at_epoch_ends_sees_a_metric_logged_there(tmp_path):
    class Countdown(Callback):
        def on_train_epoch_end(self, fit, progress):
            fit.log("remaining", 2 - progress.epoch)

    stopper = EarlyStopping("remaining", mode="min", stopping_threshold=0.5)
    _, result = fit_with([stopper, Countdown()], tmp_path, max_epochs=10)
    assert stopper.stopped_epoch == 2 and len(result.losses) == 3 * 4


def test_logged_values_are_written_once_per_step_across_a_resume(tmp_path):
    path, checkpoints = tmp_path / "metrics.csv", tmp_path / "checkpoints"
    fit_with([EpochSquare(), CSVLogger(path), ModelCheckpoint(checkpoints, save_top_k=-1)], tmp_path, max_epochs=5)
    uninterrupted = csv_scalars(path, "epoch_square")

    fit_with([EpochSquare(), CSVLogger(path), ModelCheckpoint(checkpoints, save_top_k=-1)], tmp_path, max_epochs=3)
    trainer = Trainer(
        max_epochs=5,
        rng_key=jax.random.key(0),
        enable_progress_bar=False,
        callbacks=[EpochSquare(), CSVLogger(path), ModelCheckpoint(checkpoints, save_top_k=-1)],
    )
    trainer.fit(linear_svi(NUM_ROWS), linear_data(NUM_ROWS), batch_size=BATCH, ckpt_path=checkpoints / "8")
    assert csv_scalars(path, "epoch_square") == uninterrupted  # csv_scalars also asserts no step twice


def test_log_refuses_what_is_not_one_number(tmp_path):
    class Bad(Callback):
        def __init__(self, name, value):
            self.name, self.value = name, value

        def on_fit_start(self, fit, progress):
            fit.log(self.name, self.value)

    for name, value, message in [
        ("x", np.ones(3), r"log\('x', \.\.\.\): the value must be a real number or a 0-d numeric array"),
        ("x", "1.0", "the value must be a real number"),
        ("", 1.0, "name must be a non-empty str"),
        (3, 1.0, "name must be a non-empty str"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            fit_with([Bad(name, value)], tmp_path, max_epochs=1)


def test_a_device_scalar_and_a_numpy_scalar_are_logged_as_floats(tmp_path):
    class Scalars(Callback):
        def on_train_epoch_end(self, fit, progress):
            fit.log_dict({"device": jax.numpy.float32(0.5) * 2, "numpy": np.int64(3)})

    trainer, _ = fit_with([Scalars()], tmp_path, max_epochs=1)
    assert trainer.callback_metrics["device"] == 1.0 and trainer.callback_metrics["numpy"] == 3.0


# -- per-step metrics ------------------------------------------------------------------------------

LEARNING_RATE = 1e-4


def delta_model(x, y=None):
    """Real-valued latents under AutoDelta: the optimizer's parameters are the constrained ones."""
    w = numpyro.sample("w", dist.Normal(0.0, 1.0))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", NUM_ROWS, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(w * x + b, 0.3), obs=y)


class ParamsEveryStep(Callback):
    def __init__(self) -> None:
        self.params: list[np.ndarray] = []

    def _record(self, fit):
        params = fit.current_params()
        self.params.append(np.array([params["w_auto_loc"], params["b_auto_loc"]], np.float64))

    def on_fit_start(self, fit, progress):
        self._record(fit)

    def on_train_chunk_end(self, fit, progress, losses, steps):
        assert set(fit.step_metrics) == {"grad_norm", "param_norm", "loss_again"}
        assert all(len(values) == len(steps) for values in fit.step_metrics.values())
        self._record(fit)


def test_gradient_and_parameter_norms_match_what_sgd_did_with_them(tmp_path):
    """Under SGD, p[t+1] = p[t] - lr g[t]: the gradient norm of step t is |p[t+1] - p[t]| / lr,
    and the parameter norm is |p[t]|; a custom metric of the loss equals the loss."""
    recorder = ParamsEveryStep()
    trainer = Trainer(
        max_epochs=2,
        rng_key=jax.random.key(0),
        enable_progress_bar=False,
        log_every_n_steps=1,
        callbacks=[recorder, CSVLogger(tmp_path / "metrics.csv")],
        step_metrics={"grad_norm": grad_norm, "param_norm": param_norm, "loss_again": lambda view: view.loss},
    )
    svi = SVI(delta_model, AutoDelta(delta_model), SGD(LEARNING_RATE), Trace_ELBO())
    result = trainer.fit(svi, linear_data(NUM_ROWS), batch_size=BATCH)
    params = np.stack(recorder.params)  # p[0] .. p[8]
    path = tmp_path / "metrics.csv"
    grad_norms = csv_scalars(path, "grad_norm")
    param_norms = csv_scalars(path, "param_norm")
    assert sorted(grad_norms) == list(range(8))
    for step in range(8):
        moved = np.linalg.norm(params[step + 1] - params[step]) / LEARNING_RATE
        assert grad_norms[step] == pytest.approx(moved, rel=1e-3)
        assert param_norms[step] == pytest.approx(np.linalg.norm(params[step]), rel=1e-5)
    np.testing.assert_array_equal(list(csv_scalars(path, "loss_again").values()), result.losses)
    assert trainer.callback_metrics["grad_norm"] == grad_norms[7]  # the last chunk's mean: one step here


def test_built_in_step_metrics_by_name_are_logged_every_n_steps_and_off_by_default(tmp_path):
    on = tmp_path / "on.csv"
    fit_with([CSVLogger(on)], tmp_path, max_epochs=2, log_every_n_steps=2, step_metrics=["grad_norm", "param_norm"])
    assert sorted(csv_scalars(on, "grad_norm")) == [1, 3, 5, 7]
    assert all(np.isfinite(value) and value > 0 for value in csv_scalars(on, "param_norm").values())
    off = tmp_path / "off.csv"
    trainer, _ = fit_with([CSVLogger(off)], tmp_path, max_epochs=2, log_every_n_steps=2)
    with off.open() as file:
        assert {row["metric"] for row in csv.DictReader(file)}.isdisjoint({"grad_norm", "param_norm"})
    assert "grad_norm" not in trainer.callback_metrics


def test_bad_step_metrics_are_refused_naming_the_built_in_ones():
    with pytest.raises(ConfigurationError, match=r"step_metrics \['gradnorm'\] are not built in.*'grad_norm'"):
        Trainer(max_epochs=1, step_metrics=["gradnorm"])
    with pytest.raises(ConfigurationError, match="step_metrics must be a list of names"):
        Trainer(max_epochs=1, step_metrics="grad_norm")
    with pytest.raises(ConfigurationError, match="step_metrics must map metric names to functions"):
        Trainer(max_epochs=1, step_metrics={"g": 3})


# -- one rule for "every N", one for state keys --------------------------------------------------------


@pytest.mark.parametrize("interval", [1, 2, 3, 7])
def test_every_picks_the_steps_whose_completion_is_due(interval):
    every = Every(steps=interval)
    for start in range(0, 15):
        for stop in range(start, 20):
            expected = [s for s in range(start, stop) if (s + 1) % interval == 0]
            assert list(every.step_indices(range(start, stop))) == expected
            assert every.at_step(stop) == (stop % interval == 0)
    assert not Every(epochs=2).at_step(4) and list(Every(epochs=2).step_indices(range(0, 9))) == []
    assert Every(epochs=2).due(3, epochs_done=2) and not Every(epochs=2).due(3, epochs_done=1)


def test_the_built_in_callbacks_state_keys_come_from_one_rule():
    stopper = EarlyStopping("val_loss", mode="max")
    assert stopper.state_key == "EarlyStopping{'monitor': 'val_loss', 'mode': 'max'}"
    assert stopper.state_key == state_key_of(stopper, monitor="val_loss", mode="max")
