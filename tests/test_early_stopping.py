"""EarlyStopping: Lightning's stopping rules on scripted metric sequences, its hooks, its state,
bad arguments, and two fits with a real Trainer."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from aimz_trainer import (
    Callback,
    ConfigurationError,
    EarlyStopping,
    FitProgress,
    MetricNotFoundError,
    Trainer,
)

from .conftest import linear_data

NAN, INF = float("nan"), float("inf")


def run(stopper: EarlyStopping, values: list[float]) -> list[str | None]:
    """``stopper.evaluate`` of each value in turn."""
    return [stopper.evaluate(value) for value in values]


def first_stop(reasons: list[str | None]) -> int | None:
    """Index of the first check that asked to stop."""
    return next((i for i, reason in enumerate(reasons) if reason is not None), None)


class FakeTrainer:
    """What EarlyStopping's hooks use of a trainer: ``has_validation`` and ``request_stop``."""

    def __init__(self, has_validation: bool = False) -> None:
        self.has_validation = has_validation
        self.stops: list[str | None] = []

    def request_stop(self, reason: str | None = None) -> None:
        self.stops.append(reason)


def progress(epoch: int, **metrics: float) -> FitProgress:
    return FitProgress(step=10 * (epoch + 1), epoch=epoch, metrics=metrics)


class TestPatience:
    def test_patience_counts_checks_without_improvement(self):
        stopper = EarlyStopping("val_loss", patience=2)
        reasons = run(stopper, [5.0, 4.0, 4.5, 4.0])
        # 4.5: 1, 4.0 (equal to the best is no improvement): 2 -> stop at index 3.
        assert reasons[:3] == [None, None, None]
        assert reasons[3] is not None and "did not improve" in reasons[3] and "2 checks" in reasons[3]
        assert stopper.best_score == 4.0 and stopper.wait_count == 2

    def test_an_improvement_resets_the_count(self):
        stopper = EarlyStopping("val_loss", patience=2)
        reasons = run(stopper, [5.0, 6.0, 4.0, 6.0, 3.0, 6.0, 6.0])
        assert first_stop(reasons) == 6
        assert stopper.best_score == 3.0

    def test_patience_zero_stops_at_the_first_check_without_improvement(self):
        stopper = EarlyStopping("val_loss", patience=0)
        reasons = run(stopper, [5.0, 4.0, 3.0, 3.0])
        assert first_stop(reasons) == 3
        assert stopper.wait_count == 1

    def test_the_first_finite_value_is_always_an_improvement(self):
        for mode, value in [("min", 1e30), ("max", -1e30)]:
            stopper = EarlyStopping("m", mode=mode, patience=0, min_delta=1.0)
            assert stopper.evaluate(value) is None
            assert stopper.best_score == value


class TestMinDelta:
    def test_min_mode_needs_a_decrease_larger_than_min_delta(self):
        stopper = EarlyStopping("val_loss", patience=1, min_delta=0.5)
        assert stopper.evaluate(10.0) is None
        assert stopper.evaluate(9.4) is None  # 0.6 > 0.5: improvement
        assert stopper.best_score == 9.4 and stopper.wait_count == 0
        reason = stopper.evaluate(8.9)  # exactly 0.5 better: not an improvement
        assert reason is not None and "more than 0.5" in reason
        assert stopper.best_score == 9.4

    def test_max_mode_needs_an_increase_larger_than_min_delta(self):
        stopper = EarlyStopping("val_lpd", mode="max", patience=2, min_delta=0.25)
        reasons = run(stopper, [1.0, 1.5, 1.7, 1.75])
        # 1.5 improves (by 0.5), 1.7 and 1.75 do not (by 0.2 and 0.25) -> stop at 1.75.
        assert first_stop(reasons) == 3 and "more than 0.25" in reasons[3]
        assert stopper.best_score == 1.5

    def test_small_improvements_do_not_move_the_best_score(self):
        stopper = EarlyStopping("val_loss", patience=3, min_delta=1.0)
        reasons = run(stopper, [10.0, 9.5, 9.1, 9.05])
        # Each is less than 1.0 below the best (10.0), so none counts even though they add up.
        assert first_stop(reasons) == 3
        assert stopper.best_score == 10.0


class TestModeMax:
    def test_higher_is_better(self):
        stopper = EarlyStopping("val_lpd", mode="max", patience=1)
        reasons = run(stopper, [-5.0, -4.0, -3.0, -3.5])
        assert first_stop(reasons) == 3
        assert stopper.best_score == -3.0

    def test_a_decrease_is_no_improvement_in_max_mode_but_is_in_min_mode(self):
        assert first_stop(run(EarlyStopping("m", mode="max", patience=0), [2.0, 1.0])) == 1
        assert first_stop(run(EarlyStopping("m", mode="min", patience=0), [2.0, 1.0])) is None

    def test_initial_best_scores(self):
        assert EarlyStopping("m").best_score == math.inf
        assert EarlyStopping("m", mode="max").best_score == -math.inf


class TestCheckFinite:
    @pytest.mark.parametrize("bad", [NAN, INF, -INF])
    def test_a_non_finite_value_stops_at_once(self, bad):
        stopper = EarlyStopping("val_loss", patience=100)
        assert stopper.evaluate(3.0) is None
        reason = stopper.evaluate(bad)
        assert reason is not None and "not finite" in reason and "val_loss" in reason
        assert "previous best 3" in reason
        assert stopper.best_score == 3.0

    def test_without_check_finite_nan_counts_as_no_improvement(self):
        stopper = EarlyStopping("val_loss", patience=2, check_finite=False)
        reasons = run(stopper, [3.0, NAN, 2.0, NAN, NAN])
        assert reasons[:4] == [None] * 4
        assert stopper.best_score == 2.0
        assert reasons[4] is not None and "did not improve" in reasons[4]

    def test_without_check_finite_inf_is_no_improvement_in_min_mode(self):
        stopper = EarlyStopping("val_loss", patience=1, check_finite=False)
        reasons = run(stopper, [3.0, INF])
        assert first_stop(reasons) == 1 and "did not improve" in reasons[1]
        assert stopper.best_score == 3.0


class TestThresholds:
    def test_stopping_threshold_min_mode(self):
        stopper = EarlyStopping("val_loss", patience=100, stopping_threshold=1.0)
        reasons = run(stopper, [3.0, 2.0, 1.0, 0.99])
        # "Better than" the threshold: 1.0 itself does not reach it.
        assert first_stop(reasons) == 3
        assert "stopping threshold 1.0" in reasons[3] and "val_loss" in reasons[3]

    def test_stopping_threshold_max_mode(self):
        stopper = EarlyStopping("val_lpd", mode="max", patience=100, stopping_threshold=-1.0)
        reasons = run(stopper, [-3.0, -1.0, -0.5])
        assert first_stop(reasons) == 2 and "stopping threshold" in reasons[2]

    def test_divergence_threshold_min_mode(self):
        stopper = EarlyStopping("val_loss", patience=100, divergence_threshold=10.0)
        reasons = run(stopper, [3.0, 10.0, 10.5])
        assert first_stop(reasons) == 2
        assert "divergence threshold 10.0" in reasons[2]

    def test_divergence_threshold_max_mode(self):
        stopper = EarlyStopping("val_lpd", mode="max", patience=100, divergence_threshold=-10.0)
        reasons = run(stopper, [-3.0, -10.0, -10.5])
        assert first_stop(reasons) == 2 and "divergence threshold" in reasons[2]

    def test_a_stop_at_a_threshold_does_not_update_the_best_score_or_the_count(self):
        stopper = EarlyStopping("val_loss", patience=100, stopping_threshold=1.0)
        run(stopper, [3.0, 4.0, 0.5])
        assert stopper.best_score == 3.0 and stopper.wait_count == 1


class TestCriteriaOrder:
    def test_non_finite_comes_before_the_thresholds(self):
        # -inf is "better" than any stopping threshold in min mode; check_finite wins.
        stopper = EarlyStopping("m", stopping_threshold=0.0, divergence_threshold=100.0)
        assert "not finite" in stopper.evaluate(-INF)
        stopper = EarlyStopping("m", stopping_threshold=0.0, divergence_threshold=100.0)
        assert "not finite" in stopper.evaluate(INF)

    def test_stopping_threshold_comes_before_divergence(self):
        # Inconsistent thresholds, so that one value meets both.
        stopper = EarlyStopping("m", stopping_threshold=5.0, divergence_threshold=1.0)
        assert "stopping threshold" in stopper.evaluate(3.0)

    def test_divergence_comes_before_patience(self):
        stopper = EarlyStopping("m", patience=1, divergence_threshold=10.0)
        assert stopper.evaluate(5.0) is None
        assert "divergence threshold" in stopper.evaluate(20.0)  # would also exhaust patience

    def test_a_threshold_stops_even_while_improving(self):
        stopper = EarlyStopping("m", patience=5, stopping_threshold=2.0)
        assert first_stop(run(stopper, [5.0, 4.0, 3.0, 1.5])) == 3

    def test_without_check_finite_the_thresholds_ignore_nan(self):
        stopper = EarlyStopping("m", patience=5, check_finite=False, stopping_threshold=0.0, divergence_threshold=9.0)
        assert stopper.evaluate(NAN) is None
        assert stopper.wait_count == 1


class TestState:
    def test_state_dict_round_trip_continues_a_sequence_identically(self):
        # Improvements, non-improvements, one too small for min_delta (1.96), then the stop.
        values = [5.0, 4.0, 4.2, 3.0, 3.1, 3.05, 2.0, 2.5, 2.6, 1.96]
        reference = EarlyStopping("val_loss", patience=3, min_delta=0.05)
        expected = run(reference, values)
        assert first_stop(expected) == 9

        for cut in range(1, len(values)):
            first = EarlyStopping("val_loss", patience=3, min_delta=0.05)
            before = run(first, values[:cut])
            resumed = EarlyStopping("val_loss", patience=3, min_delta=0.05)
            resumed.load_state_dict(first.state_dict())
            assert before + run(resumed, values[cut:]) == expected, cut
            assert (resumed.best_score, resumed.wait_count) == (reference.best_score, reference.wait_count)

    def test_state_dict_contents_and_stopped_epoch(self):
        stopper = EarlyStopping("val_loss", patience=0)
        trainer = FakeTrainer()
        stopper.on_train_epoch_end(trainer, progress(0, val_loss=2.0))
        stopper.on_train_epoch_end(trainer, progress(1, val_loss=3.0))
        state = stopper.state_dict()
        assert state == {
            "best_score": 2.0,
            "wait_count": 1,
            "stopped_epoch": 1,
            "stopping_reason": "val_loss did not improve by more than 0.0 for 1 checks; best 2",
            "patience": 0,
        }
        fresh = EarlyStopping("val_loss", patience=0)
        fresh.load_state_dict(state)
        assert (fresh.best_score, fresh.wait_count, fresh.stopped_epoch) == (2.0, 1, 1)

    def test_the_initial_infinite_best_score_survives_a_round_trip(self):
        fresh = EarlyStopping("val_loss", mode="max")
        fresh.load_state_dict(EarlyStopping("val_loss", mode="max").state_dict())
        assert fresh.best_score == -math.inf and fresh.wait_count == 0 and fresh.stopped_epoch is None

    def test_state_key_names_monitor_and_mode(self):
        assert EarlyStopping("val_loss").state_key == "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}"
        keys = {
            EarlyStopping("val_loss").state_key,
            EarlyStopping("val_loss", mode="max").state_key,
            EarlyStopping("train_loss_epoch").state_key,
        }
        assert len(keys) == 3
        assert EarlyStopping("val_loss", patience=7).state_key == EarlyStopping("val_loss").state_key


class TestHooks:
    def test_a_stop_is_requested_with_the_reason_and_the_epoch(self):
        stopper = EarlyStopping("train_loss_epoch", patience=1)
        trainer = FakeTrainer(has_validation=False)
        for epoch, value in enumerate([3.0, 2.0, 2.5]):
            stopper.on_train_epoch_end(trainer, progress(epoch, train_loss_epoch=value))
        assert len(trainer.stops) == 1 and "did not improve" in trainer.stops[0]
        assert stopper.stopped_epoch == 2 and stopper.stopping_reason == trainer.stops[0]

    def test_no_stop_while_improving(self):
        stopper = EarlyStopping("train_loss_epoch", patience=0)
        trainer = FakeTrainer()
        for epoch, value in enumerate([3.0, 2.0, 1.0]):
            stopper.on_train_epoch_end(trainer, progress(epoch, train_loss_epoch=value))
        assert trainer.stops == [] and stopper.stopped_epoch is None and stopper.stopping_reason is None

    @pytest.mark.parametrize(
        ("has_validation", "check_on_train_epoch_end", "checks_at"),
        [
            (False, None, "epoch_end"),
            (True, None, "validation_end"),
            (True, True, "epoch_end"),
            (False, False, "validation_end"),
            (True, False, "validation_end"),
            (False, True, "epoch_end"),
        ],
    )
    def test_where_the_check_happens(self, has_validation, check_on_train_epoch_end, checks_at):
        stopper = EarlyStopping("val_loss", patience=0, check_on_train_epoch_end=check_on_train_epoch_end)
        trainer = FakeTrainer(has_validation=has_validation)
        stopper.on_validation_end(trainer, progress(0, val_loss=1.0))
        stopper.on_train_epoch_end(trainer, progress(0, val_loss=1.0))
        # Exactly one of the two hooks checked: the second check of the same value would stop.
        assert trainer.stops == []
        assert stopper.best_score == 1.0 and stopper.wait_count == 0
        hook = stopper.on_train_epoch_end if checks_at == "epoch_end" else stopper.on_validation_end
        other = stopper.on_validation_end if checks_at == "epoch_end" else stopper.on_train_epoch_end
        other(trainer, progress(1, val_loss=5.0))
        assert trainer.stops == []
        hook(trainer, progress(1, val_loss=5.0))
        assert len(trainer.stops) == 1 and stopper.stopped_epoch == 1

    def test_an_unknown_monitor_raises_listing_the_available_metrics(self):
        stopper = EarlyStopping("val_los")
        with pytest.raises(MetricNotFoundError) as caught:
            stopper.on_validation_end(FakeTrainer(True), progress(0, val_loss=1.0, train_loss=2.0))
        error = caught.value
        assert isinstance(error, KeyError)
        assert error.monitor == "val_los" and error.available == ["train_loss", "val_loss"]
        message = str(error)
        assert "'val_los'" in message and "EarlyStopping" in message
        assert "['train_loss', 'val_loss']" in message
        assert "val_data" in message  # the hint for val_* metrics

    def test_the_val_data_hint_only_for_val_metrics(self):
        with pytest.raises(MetricNotFoundError, match="train_loss_epoch") as caught:
            EarlyStopping("train_loss_epok").on_train_epoch_end(FakeTrainer(), progress(0, train_loss_epoch=1.0))
        assert "val_data" not in str(caught.value)

    def test_not_strict_skips_the_check(self):
        stopper = EarlyStopping("val_los", patience=0, strict=False)
        trainer = FakeTrainer(True)
        for epoch in range(3):
            stopper.on_validation_end(trainer, progress(epoch, val_loss=1.0))
        assert trainer.stops == [] and stopper.wait_count == 0 and stopper.best_score == math.inf

    def test_monitors_metrics(self):
        assert EarlyStopping.monitors_metrics is True


class TestBadArguments:
    @pytest.mark.parametrize(
        ("kwargs", "argument"),
        [
            ({"monitor": "val_loss", "patience": -1}, "patience"),
            ({"monitor": "val_loss", "patience": 1.5}, "patience"),
            ({"monitor": "val_loss", "patience": True}, "patience"),
            ({"monitor": "val_loss", "mode": "minimum"}, "mode"),
            ({"monitor": "val_loss", "mode": None}, "mode"),
            ({"monitor": 3}, "monitor"),
            ({"monitor": ""}, "monitor"),
            ({"monitor": None}, "monitor"),
            ({"monitor": "val_loss", "min_delta": -0.1}, "min_delta"),
            ({"monitor": "val_loss", "min_delta": float("nan")}, "min_delta"),
            ({"monitor": "val_loss", "min_delta": "0.1"}, "min_delta"),
        ],
    )
    def test_raises_a_configuration_error_naming_the_argument(self, kwargs, argument):
        with pytest.raises(ConfigurationError, match=argument) as caught:
            EarlyStopping(**kwargs)
        assert isinstance(caught.value, ValueError)
        assert "EarlyStopping" in str(caught.value)

    def test_valid_edge_values_are_accepted(self):
        stopper = EarlyStopping("val_loss", mode="max", patience=0, min_delta=0)
        assert stopper.patience == 0 and stopper.min_delta == 0.0 and isinstance(stopper.min_delta, float)


# -- with a real Trainer -----------------------------------------------------------------------

NUM_ROWS, BATCH = 1000, 100
STEPS_PER_EPOCH = NUM_ROWS // BATCH


class Recorder(Callback):
    """Records hook calls as (hook, step, epoch)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def on_train_epoch_end(self, trainer, progress):
        self.calls.append(("epoch_end", progress.step, progress.epoch))

    def on_validation_end(self, trainer, progress):
        self.calls.append(("validation_end", progress.step, progress.epoch))

    def on_fit_end(self, trainer, progress):
        self.calls.append(("fit_end", progress.step, progress.epoch))

    def on_exception(self, trainer, progress, exception):
        self.calls.append((f"exception:{type(exception).__name__}", progress.step, progress.epoch))

    def teardown(self, trainer):
        self.calls.append(("teardown", -1, -1))


def make_trainer(callbacks, max_epochs=10) -> Trainer:
    return Trainer(max_epochs=max_epochs, rng_key=jax.random.key(0), enable_progress_bar=False, callbacks=callbacks)


def test_stopping_threshold_stops_a_fit_after_a_whole_epoch(make_linear):
    svi, data = make_linear(NUM_ROWS)
    threshold = 25_000.0  # the epoch-mean ELBO loss starts near 30k and falls below 10k
    max_epochs = 10
    stopper = EarlyStopping("train_loss_epoch", patience=100, stopping_threshold=threshold)
    recorder = Recorder()
    trainer = make_trainer([stopper, recorder], max_epochs=max_epochs)
    result = trainer.fit(svi, data, batch_size=BATCH)

    num_steps = result.losses.size
    assert 0 < num_steps < max_epochs * STEPS_PER_EPOCH
    assert num_steps % STEPS_PER_EPOCH == 0
    epoch_means = result.losses.reshape(-1, STEPS_PER_EPOCH).mean(axis=1)
    # It stopped at the first epoch whose mean loss is below the threshold.
    assert epoch_means[-1] < threshold and (epoch_means[:-1] >= threshold).all()
    last_epoch = num_steps // STEPS_PER_EPOCH - 1
    assert trainer.state.step == num_steps and trainer.state.epoch == last_epoch
    assert stopper.stopped_epoch == last_epoch
    assert trainer.should_stop
    assert trainer.stop_reason is not None and "stopping threshold" in trainer.stop_reason
    assert "train_loss_epoch" in trainer.stop_reason and stopper.stopping_reason == trainer.stop_reason
    # The stopper saw every epoch end the recorder saw, and on_fit_end still ran, then teardown.
    epoch_ends = [call for call in recorder.calls if call[0] == "epoch_end"]
    assert [epoch for _, _, epoch in epoch_ends] == list(range(last_epoch + 1))
    assert recorder.calls[-2:] == [("fit_end", num_steps, last_epoch), ("teardown", -1, -1)]
    assert np.isclose(trainer.callback_metrics["train_loss_epoch"], epoch_means[-1], rtol=1e-5)


def test_a_misspelt_monitor_raises_at_the_first_validation(make_linear):
    svi, data = make_linear(NUM_ROWS)
    recorder = Recorder()
    trainer = make_trainer([EarlyStopping("val_los", patience=2), recorder], max_epochs=5)
    with pytest.raises(MetricNotFoundError) as caught:
        trainer.fit(svi, data, batch_size=BATCH, val_data=linear_data(200, seed=1), val_num_samples=4)

    error = caught.value
    assert error.monitor == "val_los" and "val_loss" in error.available and "val_lpd" in error.available
    assert "'val_loss'" in str(error) and "'val_los'" in str(error)
    # The first check is the first validation, at the end of epoch 0 (the monitor runs last).
    assert recorder.calls == [
        ("validation_end", STEPS_PER_EPOCH, 0),
        ("exception:MetricNotFoundError", STEPS_PER_EPOCH, 0),
        ("teardown", -1, -1),
    ]
