"""Run control a Lightning user reaches for: validate/test without training, time limits,
minimum lengths, batch limits, overfitting a few batches, sanity validation, fast_dev_run."""

from __future__ import annotations

import csv
import warnings
from datetime import timedelta

import jax
import numpy as np
import pytest

from aimz_trainer import (
    ConfigurationError,
    CSVLogger,
    EarlyStopping,
    FitWarning,
    LambdaCallback,
    ModelCheckpoint,
    Timer,
    Trainer,
)
from aimz_trainer.callbacks.timer import as_duration

from .conftest import linear_data, linear_svi

NUM_ROWS, BATCH, VAL_ROWS = 400, 40, 120  # 10 steps an epoch, 3 validation batches
TRAIN, VAL = linear_data(NUM_ROWS), linear_data(VAL_ROWS, seed=1)


def trainer(**settings) -> Trainer:
    settings.setdefault("max_epochs", 3)
    return Trainer(rng_key=jax.random.key(3), enable_progress_bar=False, log_every_n_steps=5, **settings)


class ValidationHistory(LambdaCallback):
    """``(step, val_loss, val_lpd)`` at every validation end."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float, float]] = []
        super().__init__(
            on_validation_end=lambda fit, progress: self.rows.append(
                (progress.step, progress.metrics["val_loss"], progress.metrics["val_lpd"])
            )
        )


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    """A fit validating and saving a checkpoint at every epoch end."""
    directory = tmp_path_factory.mktemp("run_control")
    history = ValidationHistory()
    t = trainer(callbacks=[history, ModelCheckpoint(directory / "ckpt", save_top_k=-1)])
    result = t.fit(linear_svi(NUM_ROWS), TRAIN, batch_size=BATCH, val_data=VAL)
    return t, result, history, directory


class TestValidateAndTest:
    def test_a_checkpoint_reports_what_its_fit_logged_at_that_step(self, checkpointed):
        _, _, history, directory = checkpointed
        fresh = trainer(callbacks=[ModelCheckpoint(directory / "ckpt")])  # a new process, as it were
        for step, val_loss, val_lpd in history.rows:
            metrics = fresh.validate(linear_svi(NUM_ROWS), VAL, ckpt_path=step)
            np.testing.assert_allclose([metrics["val_loss"], metrics["val_lpd"]], [val_loss, val_lpd], rtol=1e-6)
        assert [row[0] for row in history.rows] == [10, 20, 30]
        by_path = fresh.validate(linear_svi(NUM_ROWS), VAL, ckpt_path=directory / "ckpt" / "20")
        np.testing.assert_allclose(by_path["val_loss"], history.rows[1][1], rtol=1e-6)

    def test_the_last_fit_and_its_params_give_its_final_validation(self, checkpointed):
        t, result, history, _ = checkpointed
        _, val_loss, val_lpd = history.rows[-1]
        for metrics in (t.validate(t.svi, VAL), t.validate(t.svi, VAL, params=result.params)):
            np.testing.assert_allclose([metrics["val_loss"], metrics["val_lpd"]], [val_loss, val_lpd], rtol=1e-6)
        tested = t.test(t.svi, VAL)
        assert set(tested) == {"test_loss", "test_lpd"}
        np.testing.assert_allclose(tested["test_loss"], val_loss, rtol=1e-6)
        assert t.callback_metrics["test_lpd"] == tested["test_lpd"]

    def test_trained_parameters_beat_untrained_ones_on_held_out_data(self, checkpointed):
        t, result, _, _ = checkpointed
        untrained = {name: np.zeros_like(value) for name, value in result.params.items()}
        untrained |= {name: np.full_like(value, 0.1) for name, value in result.params.items() if "scale" in name}
        assert t.validate(t.svi, VAL, params=untrained)["val_lpd"] < t.validate(t.svi, VAL)["val_lpd"] - 1.0

    def test_the_metrics_reach_the_loggers_beside_the_fit_rows(self, tmp_path):
        path = tmp_path / "metrics.csv"
        t = trainer(max_epochs=1, callbacks=[CSVLogger(path)])
        t.fit(linear_svi(NUM_ROWS), TRAIN, batch_size=BATCH, val_data=VAL)
        rows_after_fit = path.read_text().splitlines()
        metrics = t.test(t.svi, VAL)
        with path.open() as file:
            rows = list(csv.DictReader(file))
        assert path.read_text().splitlines()[: len(rows_after_fit)] == rows_after_fit  # kept
        added = {row["metric"]: (int(row["step"]), float(row["value"])) for row in rows[len(rows_after_fit) - 1 :]}
        assert added == {"test_loss": (9, metrics["test_loss"]), "test_lpd": (9, metrics["test_lpd"])}

    def test_limit_val_batches_evaluates_the_first_batches_only(self, checkpointed):
        t, result, _, _ = checkpointed
        limited = trainer(limit_val_batches=1)
        first_batch = {key: value[:BATCH] for key, value in VAL.items()}
        expected = t.validate(t.svi, first_batch, params=result.params, batch_size=BATCH)
        actual = limited.validate(t.svi, VAL, params=result.params, batch_size=BATCH)
        # Same rows, same keys, but the per-row losses divide by the fit's rows or the plate size.
        np.testing.assert_allclose(actual["val_lpd"], expected["val_lpd"], rtol=1e-6)

    def test_bad_requests_are_named(self, checkpointed):
        t, result, _, _ = checkpointed
        with pytest.raises(ConfigurationError, match="nothing to evaluate"):
            trainer().validate(linear_svi(NUM_ROWS), VAL)
        with pytest.raises(ConfigurationError, match="w_auto_loc: missing"):
            t.validate(t.svi, VAL, params={k: v for k, v in result.params.items() if k != "w_auto_loc"})
        with pytest.raises(ConfigurationError, match=r"shape \[3\]"):
            t.validate(t.svi, VAL, params={**result.params, "b_auto_loc": np.zeros(3, np.float32)})
        with pytest.raises(ConfigurationError, match="not both"):
            t.validate(t.svi, VAL, params=result.params, ckpt_path="last")


def early_stop_at_first_chunk() -> LambdaCallback:
    return LambdaCallback(on_train_chunk_end=lambda fit, progress, losses, steps: fit.request_stop("asked"))


class TestLengthLimits:
    def test_min_steps_and_min_epochs_delay_a_requested_stop(self):
        svi = linear_svi(NUM_ROWS)
        assert len(trainer(callbacks=[early_stop_at_first_chunk()]).fit(svi, TRAIN, batch_size=BATCH).losses) == 5
        for settings, steps in [({"min_steps": 12}, 15), ({"min_epochs": 2}, 20)]:
            t = trainer(callbacks=[early_stop_at_first_chunk()], **settings)
            assert len(t.fit(svi, TRAIN, batch_size=BATCH).losses) == steps
            assert t.should_stop and t.stop_reason == "asked"

    def test_early_stopping_cannot_stop_before_min_epochs(self):
        never_better = EarlyStopping("val_loss", patience=0, min_delta=1e9)
        svi = linear_svi(NUM_ROWS)
        short = trainer(max_epochs=6, callbacks=[EarlyStopping("val_loss", patience=0, min_delta=1e9)])
        assert len(short.fit(svi, TRAIN, batch_size=BATCH, val_data=VAL).losses) == 20
        t = trainer(max_epochs=6, min_epochs=4, callbacks=[never_better])
        assert len(t.fit(svi, TRAIN, batch_size=BATCH, val_data=VAL).losses) == 40

    def test_max_time_stops_at_a_boundary_even_before_min_steps(self):
        t = trainer(max_time=timedelta(microseconds=1), min_steps=25)
        losses = t.fit(linear_svi(NUM_ROWS), TRAIN, batch_size=BATCH).losses
        assert len(losses) == 5 and t.stop_reason.startswith("max_time")
        timer = next(c for c in t.callbacks if isinstance(c, Timer))
        assert timer.time_elapsed() > 0 and timer.time_remaining() < 0
        assert timer.state_dict()["time_elapsed"] == timer.time_elapsed()  # ended: the clock stands

    def test_a_resumed_fit_counts_the_time_already_used(self):
        timer = Timer(duration=3600)
        timer.load_state_dict({"time_elapsed": 3600.0})  # what a checkpoint of a run that used it all holds
        t = trainer(callbacks=[timer])
        assert len(t.fit(linear_svi(NUM_ROWS), TRAIN, batch_size=BATCH).losses) == 5
        assert timer.time_elapsed() > 3600

    def test_max_time_alone_is_a_limit(self):
        t = Trainer(max_time="00:00:00:30", enable_progress_bar=False)
        assert t.max_epochs == 1000 and t.max_steps is None

    @pytest.mark.parametrize(
        ("value", "seconds"),
        [(90, 90), (1.5, 1.5), ("01:02:03:04", 93784), ({"minutes": 2}, 120), (timedelta(hours=1), 3600)],
    )
    def test_durations(self, value, seconds):
        assert as_duration(value).total_seconds() == seconds

    @pytest.mark.parametrize("value", [0, -1, "1:00", "soon", {"fortnights": 1}, float("nan"), True])
    def test_bad_durations_are_named(self, value):
        with pytest.raises(ConfigurationError, match="max_time must be a positive length of time"):
            Trainer(max_epochs=1, max_time=value)

    def test_bad_settings_are_named(self):
        with pytest.raises(ConfigurationError, match="min_epochs=5 exceeds max_epochs=3"):
            trainer(min_epochs=5)
        with pytest.raises(ConfigurationError, match="limit_train_batches must be"):
            trainer(limit_train_batches=0)
        with pytest.raises(ConfigurationError, match="overfit_batches must be"):
            trainer(overfit_batches=1.5)
        with pytest.raises(ConfigurationError, match="not both"):
            trainer(max_time=10, callbacks=[Timer(5)])
        with pytest.raises(ConfigurationError, match="fast_dev_run"):
            trainer(fast_dev_run=-1)


class TestDebugRuns:
    def test_limit_train_batches_shortens_every_epoch(self):
        for limit, steps_per_epoch in [(3, 3), (0.5, 5)]:
            t = trainer(limit_train_batches=limit)
            result = t.fit(linear_svi(NUM_ROWS), TRAIN, batch_size=BATCH)
            assert t.steps_per_epoch == steps_per_epoch and len(result.losses) == 3 * steps_per_epoch

    def test_overfit_batches_fits_the_first_batches_in_row_order(self):
        svi = linear_svi(NUM_ROWS)
        overfit = trainer(overfit_batches=2).fit(svi, TRAIN, batch_size=BATCH)
        assert len(overfit.losses) == 6
        # Rows past the first two batches are never seen: changing them changes nothing.
        changed = {"x": TRAIN["x"], "y": np.where(np.arange(NUM_ROWS) < 2 * BATCH, TRAIN["y"], 50.0)}
        np.testing.assert_array_equal(
            trainer(overfit_batches=2).fit(svi, changed, batch_size=BATCH).losses, overfit.losses
        )
        assert not np.array_equal(
            trainer(limit_train_batches=2).fit(svi, changed, batch_size=BATCH).losses, overfit.losses
        )
        in_order = trainer(limit_train_batches=2).fit(svi, TRAIN, batch_size=BATCH, shuffle=False)
        np.testing.assert_array_equal(in_order.losses, overfit.losses)

    def test_fast_dev_run_runs_a_step_and_a_validation_batch_and_writes_nothing(self, tmp_path):
        history = ValidationHistory()
        callbacks = [history, CSVLogger(tmp_path / "m.csv"), ModelCheckpoint(tmp_path / "ckpt")]
        t = trainer(max_epochs=50, fast_dev_run=True, callbacks=callbacks)
        result = t.fit(linear_svi(NUM_ROWS), TRAIN, batch_size=BATCH, val_data=VAL)
        assert len(result.losses) == 1 and [row[0] for row in history.rows] == [1]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no metrics file
        assert list((tmp_path / "ckpt").iterdir()) == []  # and no checkpoint
        one_batch = t.validate(t.svi, {key: value[:BATCH] for key, value in VAL.items()})
        np.testing.assert_allclose(history.rows[0][2], one_batch["val_lpd"], rtol=1e-6)
        assert len(trainer(fast_dev_run=4).fit(linear_svi(NUM_ROWS), TRAIN, batch_size=BATCH).losses) == 4

    def test_sanity_validation_runs_before_training_and_changes_nothing(self):
        far = {"x": VAL["x"], "y": VAL["y"] + 1e20}  # finite rows no guide explains: lpd = -inf
        runs = {}
        for steps in (0, -1):
            history, at_fit_start = ValidationHistory(), []
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                watcher = LambdaCallback(
                    on_fit_start=lambda fit, progress, caught=caught, at=at_fit_start: at.append(
                        sum("sanity" in str(w.message) for w in caught)
                    )
                )
                t = trainer(max_epochs=2, num_sanity_val_steps=steps, callbacks=[watcher, history])
                losses = t.fit(linear_svi(NUM_ROWS), TRAIN, batch_size=BATCH, val_data=far).losses
            sanity = [w for w in caught if issubclass(w.category, FitWarning) and "sanity" in str(w.message)]
            runs[steps] = losses, history.rows, sanity, at_fit_start
        assert not runs[0][2] and runs[0][3] == [0]
        # The check ran before the fit started, and warned of the non-finite lpd.
        assert len(runs[-1][2]) == 1 and "val_lpd" in str(runs[-1][2][0].message) and runs[-1][3] == [1]
        np.testing.assert_array_equal(runs[-1][0], runs[0][0])  # and changed nothing
        assert runs[-1][1] == runs[0][1] and len(runs[0][1]) == 2 and runs[0][1][0][2] == -np.inf
