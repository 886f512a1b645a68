"""TensorBoardLogger and CSVLogger: what a real fit writes, read back; the per-row training loss;
hyperparameters in TensorBoard's HParams tab; resumes; process 0 only; bad paths; files closed
when a fit raises; the warning when a fit writes no train_loss point."""

from __future__ import annotations

import csv
import shutil
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
import tensorboardX.event_file_writer
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from tensorboard import context as tensorboard_context
from tensorboard.backend.event_processing.data_provider import MultiplexerDataProvider
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.plugins.base_plugin import TBContext
from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups, plugin_data_pb2

from aimz_trainer import (
    Callback,
    ConfigurationError,
    CSVLogger,
    FitProgress,
    ModelCheckpoint,
    TensorBoardLogger,
    Trainer,
)
from aimz_trainer.callbacks.logger import warn_if_no_train_loss_point
from aimz_trainer.errors import LoggingWarning
from aimz_trainer.plan import Every, FitPlan

from .conftest import linear_data, linear_model, linear_svi

NUM_ROWS, BATCH, EVERY, EPOCHS = 1000, 100, 5, 3
STEPS_PER_EPOCH = NUM_ROWS // BATCH
NUM_STEPS = EPOCHS * STEPS_PER_EPOCH
LOGGED_STEPS = [s for s in range(NUM_STEPS) if (s + 1) % EVERY == 0]  # 4, 9, ..., 29
EPOCH_END_STEPS = [STEPS_PER_EPOCH * (e + 1) - 1 for e in range(EPOCHS)]  # 9, 19, 29
LR0, DECAY_STEPS, DECAY_RATE = 0.05, 10, 0.5
PARAMS = ["b_auto_loc", "b_auto_scale", "w_auto_loc", "w_auto_scale"]


def schedule(step: int) -> float:
    return LR0 * DECAY_RATE ** (step / DECAY_STEPS)


class MetricsAtValidation(Callback):
    """Records ``trainer.callback_metrics`` at every validation end."""

    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, float]]] = []

    def on_validation_end(self, trainer, progress):
        self.records.append((progress.step, dict(trainer.callback_metrics)))


@dataclass
class LoggedFit:
    trainer: Trainer
    losses: np.ndarray
    params: dict[str, np.ndarray]
    log_dir: Path
    csv_path: Path
    validations: list[tuple[int, dict[str, float]]] = field(default_factory=list)


@pytest.fixture(scope="module")
def logged_fit(tmp_path_factory) -> LoggedFit:
    """One fit of 3 epochs x 10 steps, with validation and a decaying learning rate, logged to
    TensorBoard and CSV."""
    root = tmp_path_factory.mktemp("logged_fit")
    model = linear_model(NUM_ROWS)
    optimizer = optax.inject_hyperparams(optax.adam)(
        learning_rate=optax.exponential_decay(LR0, DECAY_STEPS, DECAY_RATE)
    )
    svi = SVI(model, AutoNormal(model), optimizer, Trace_ELBO())
    recorder = MetricsAtValidation()
    log_dir, csv_path = root / "tb", root / "metrics.csv"
    trainer = Trainer(
        max_epochs=EPOCHS,
        rng_key=jax.random.key(0),
        enable_progress_bar=False,
        log_every_n_steps=EVERY,
        callbacks=[
            TensorBoardLogger(log_dir, hparams={"learning_rate": LR0, "width": "small"}),
            CSVLogger(csv_path),
            recorder,
        ],
    )
    result = trainer.fit(
        svi, linear_data(NUM_ROWS), batch_size=BATCH, val_data=linear_data(200, seed=1), val_num_samples=4
    )
    assert result.losses.shape == (NUM_STEPS,)
    params = {name: np.asarray(value) for name, value in result.params.items()}
    return LoggedFit(trainer, result.losses, params, log_dir, csv_path, recorder.records)


def read_events(path: Path) -> EventAccumulator:
    events = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    events.Reload()
    return events


def scalars(events: EventAccumulator, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in events.Scalars(tag)}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def csv_scalars(rows: list[dict[str, str]], metric: str) -> dict[int, float]:
    return {int(row["step"]): float(row["value"]) for row in rows if row["metric"] == metric}


def hparams_content(events: EventAccumulator) -> dict[str, plugin_data_pb2.HParamsPluginData]:
    """The HParams plugin's summaries of a run, by tag (``experiment``, ``session_start_info``,
    ``session_end_info``), as TensorBoard reads them (the first of each tag in the run)."""
    try:
        content = events.PluginTagToContent("hparams")
    except KeyError:  # no summary of the plugin
        return {}
    parse = plugin_data_pb2.HParamsPluginData.FromString
    return {tag.removeprefix("_hparams_/"): parse(data) for tag, data in content.items()}


def hparams_tab(logdir: Path) -> api_pb2.ListSessionGroupsResponse:
    """What TensorBoard's HParams tab lists for ``tensorboard --logdir logdir``: its plugin's own
    session-group listing over its own event loading."""
    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = MultiplexerDataProvider(multiplexer, str(logdir))
    context = backend_context.Context(TBContext(logdir=str(logdir), multiplexer=multiplexer, data_provider=provider))
    request = api_pb2.ListSessionGroupsRequest(
        start_index=0,
        slice_size=100,
        allowed_statuses=list(api_pb2.Status.values()),
        aggregation_type=api_pb2.AGGREGATION_AVG,
        include_metrics=True,
    )
    return list_session_groups.Handler(tensorboard_context.RequestContext(), context, "", request).run()


def hparam_values(values) -> dict[str, float | str | bool]:
    return {name: getattr(value, value.WhichOneof("kind")) for name, value in values.items()}


def raw_records(path: Path, data: bytes) -> list[bytes]:
    """The serialized events of an event file holding ``data``, read by TensorBoard's loader."""
    path.write_bytes(data)
    return list(RawEventFileLoader(str(path)).Load())


def is_hparams(record: bytes) -> bool:
    values = Event.FromString(record).summary.value
    return bool(values) and all(value.tag.startswith("_hparams_/") for value in values)


class FakeTrainer:
    """Enough of a fit for a logger's hooks when nothing is logged, and for its ``open``."""

    log_every_n_steps = EVERY
    max_epochs, max_steps, steps_per_epoch, has_validation = EPOCHS, None, STEPS_PER_EPOCH, False
    plan = types.SimpleNamespace(batch_size=BATCH, steps_per_epoch=STEPS_PER_EPOCH)
    mesh = types.SimpleNamespace(size=1)
    settings = types.SimpleNamespace(step_metrics=(), min_epochs=None, min_steps=None)


# -- TensorBoard -------------------------------------------------------------------------------


class TestTensorBoardFit:
    def test_train_loss_every_n_steps_is_the_loss_of_that_step(self, logged_fit):
        logged = scalars(read_events(logged_fit.log_dir), "train_loss")
        assert sorted(logged) == LOGGED_STEPS
        np.testing.assert_allclose([logged[s] for s in LOGGED_STEPS], logged_fit.losses[LOGGED_STEPS], rtol=1e-6)

    def test_train_loss_epoch_is_the_mean_of_the_epoch_at_its_last_step(self, logged_fit):
        events = read_events(logged_fit.log_dir)
        logged = scalars(events, "train_loss_epoch")
        assert sorted(logged) == EPOCH_END_STEPS
        means = logged_fit.losses.reshape(EPOCHS, STEPS_PER_EPOCH).mean(axis=1)
        np.testing.assert_allclose([logged[s] for s in EPOCH_END_STEPS], means, rtol=1e-5)
        epoch_time = scalars(events, "epoch_time")
        assert sorted(epoch_time) == EPOCH_END_STEPS and all(v > 0 for v in epoch_time.values())

    def test_validation_metrics_once_per_epoch_as_the_trainer_reported_them(self, logged_fit):
        assert [step for step, _ in logged_fit.validations] == [s + 1 for s in EPOCH_END_STEPS]
        events = read_events(logged_fit.log_dir)
        for name in ("val_loss", "val_lpd"):
            logged = scalars(events, name)
            assert sorted(logged) == EPOCH_END_STEPS, name
            reported = [metrics[name] for _, metrics in logged_fit.validations]
            np.testing.assert_allclose([logged[s] for s in EPOCH_END_STEPS], reported, rtol=1e-6)
        # Validation ran on different states: the values are not one value repeated.
        assert len(set(scalars(events, "val_loss").values())) == EPOCHS

    def test_train_loss_per_row_is_train_loss_over_the_row_count_at_each_logged_step(self, logged_fit):
        events, rows = read_events(logged_fit.log_dir), read_csv(logged_fit.csv_path)
        per_row, from_csv = scalars(events, "train_loss_per_row"), csv_scalars(rows, "train_loss_per_row")
        assert sorted(per_row) == sorted(from_csv) == LOGGED_STEPS
        for step in LOGGED_STEPS:
            exact = float(logged_fit.losses[step]) / NUM_ROWS
            assert from_csv[step] == exact  # the CSV writes the float64 quotient
            assert per_row[step] == np.float32(exact)  # TensorBoard stores float32
        epoch_loss, epoch_per_row = csv_scalars(rows, "train_loss_epoch"), csv_scalars(rows, "train_loss_per_row_epoch")
        assert sorted(epoch_per_row) == EPOCH_END_STEPS
        assert all(epoch_per_row[s] == epoch_loss[s] / NUM_ROWS for s in EPOCH_END_STEPS)
        metrics = logged_fit.trainer.callback_metrics
        assert metrics["train_loss_per_row"] == pytest.approx(metrics["train_loss"] / NUM_ROWS, rel=1e-6)
        assert metrics["train_loss_per_row_epoch"] == metrics["train_loss_epoch"] / NUM_ROWS

    def test_learning_rate_follows_the_schedule(self, logged_fit):
        logged = scalars(read_events(logged_fit.log_dir), "learning_rate")
        assert sorted(logged) == LOGGED_STEPS
        values = [logged[s] for s in LOGGED_STEPS]
        # The rate in the optimizer state after step s is the one step s used: schedule(s).
        np.testing.assert_allclose(values, [schedule(s) for s in LOGGED_STEPS], rtol=1e-5)
        assert (np.diff(values) < 0).all()

    def test_steps_per_sec_at_chunk_ends_on_the_grid(self, logged_fit):
        logged = scalars(read_events(logged_fit.log_dir), "steps_per_sec")
        assert logged and set(logged) <= set(LOGGED_STEPS)
        assert all(v > 0 for v in logged.values())

    def test_only_the_documented_scalars(self, logged_fit):
        tags = set(read_events(logged_fit.log_dir).Tags()["scalars"])
        assert tags == {
            "train_loss",
            "train_loss_per_row",
            "train_loss_epoch",
            "train_loss_per_row_epoch",
            "epoch_time",
            "steps_per_sec",
            "learning_rate",
            "val_loss",
            "val_lpd",
            "num_params",  # the default ModelSummary's
        }

    def test_parameter_histograms_every_epoch_end(self, logged_fit):
        events = read_events(logged_fit.log_dir)
        assert set(events.Tags()["histograms"]) == {f"params/{name}" for name in PARAMS}
        for name in PARAMS:
            histograms = events.Histograms(f"params/{name}")
            assert [h.step for h in histograms] == EPOCH_END_STEPS, name
            # Scalar parameters: the histogram of the last epoch holds the fit's final value.
            last = histograms[-1].histogram_value
            assert last.num == 1
            np.testing.assert_allclose([last.min, last.max], [logged_fit.params[name]] * 2, rtol=1e-6)
        # The parameters moved between epochs.
        w_locs = [h.histogram_value.min for h in events.Histograms("params/w_auto_loc")]
        assert len(set(w_locs)) == EPOCHS

    def test_hparams_in_the_run_itself_with_its_curves_as_metrics(self, logged_fit):
        assert [p for p in logged_fit.log_dir.iterdir() if p.is_dir()] == []  # no hparams sub-run
        content = hparams_content(read_events(logged_fit.log_dir))
        assert set(content) == {"experiment", "session_start_info", "session_end_info"}
        hparams = hparam_values(content["session_start_info"].session_start_info.hparams)
        assert hparams == {
            "max_epochs": EPOCHS,
            "batch_size": BATCH,
            "steps_per_epoch": STEPS_PER_EPOCH,
            "log_every_n_steps": EVERY,
            "num_devices": logged_fit.trainer.mesh.size,
            "learning_rate": LR0,
            "width": "small",
        }  # max_steps (None) left out
        experiment = content["experiment"].experiment
        assert {info.name for info in experiment.hparam_infos} == set(hparams)
        metrics = [(info.name.group, info.name.tag) for info in experiment.metric_infos]
        losses = ["train_loss", "train_loss_per_row", "train_loss_epoch", "train_loss_per_row_epoch"]
        assert metrics == [("", name) for name in [*losses, "val_loss", "val_lpd"]]
        assert content["session_end_info"].session_end_info.status == api_pb2.STATUS_SUCCESS

    def test_the_hparams_tab_shows_one_row_whose_metrics_are_the_runs_last_values(self, logged_fit):
        tab = hparams_tab(logged_fit.log_dir.parent)  # tensorboard --logdir on the runs' parent
        [group] = tab.session_groups
        [session] = group.sessions
        assert session.name == logged_fit.log_dir.name and session.status == api_pb2.STATUS_SUCCESS
        assert hparam_values(group.hparams)["max_epochs"] == EPOCHS
        events = read_events(logged_fit.log_dir)
        shown = {value.name.tag: (value.training_step, value.value) for value in session.metric_values}
        assert set(shown) == {
            "train_loss",
            "train_loss_per_row",
            "train_loss_epoch",
            "train_loss_per_row_epoch",
            "val_loss",
            "val_lpd",
        }
        for tag, (step, value) in shown.items():
            last = events.Scalars(tag)[-1]
            assert (step, value) == (last.step, pytest.approx(last.value, rel=1e-6)), tag
        assert shown["val_loss"][1] == pytest.approx(logged_fit.trainer.callback_metrics["val_loss"], rel=1e-6)

    def test_the_writer_is_closed_after_the_fit(self, logged_fit):
        logger = next(c for c in logged_fit.trainer.callbacks if isinstance(c, TensorBoardLogger))
        assert logger._writer is None


class TestTensorBoardResume:
    def test_a_resumed_logger_purges_the_events_from_its_resume_step(self, logged_fit, tmp_path):
        log_dir = tmp_path / "tb"
        shutil.copytree(logged_fit.log_dir, log_dir)
        logger = TensorBoardLogger(log_dir)
        logger.open(FakeTrainer(), 20)
        logger.write(24, 2, {"train_loss": -1.0})
        logger.write(29, 2, {"train_loss": -2.0})
        logger.close()

        events = read_events(log_dir)
        logged = scalars(events, "train_loss")
        assert sorted(logged) == LOGGED_STEPS
        np.testing.assert_allclose([logged[s] for s in (4, 9, 14, 19)], logged_fit.losses[[4, 9, 14, 19]], rtol=1e-6)
        assert (logged[24], logged[29]) == (-1.0, -2.0)
        # Everything else of the first run from step 20 on is gone.
        for tag in ("val_loss", "val_lpd", "train_loss_epoch", "epoch_time"):
            assert sorted(scalars(events, tag)) == [9, 19], tag
        assert sorted(scalars(events, "learning_rate")) == [4, 9, 14, 19]
        assert [h.step for h in events.Histograms("params/w_auto_loc")] == [9, 19]
        # The first run's hparams are gone from its file; the reopened logger's are the run's.
        content = hparams_content(events)
        assert hparam_values(content["session_start_info"].session_start_info.hparams) == {
            "max_epochs": EPOCHS,
            "batch_size": BATCH,
            "steps_per_epoch": STEPS_PER_EPOCH,
            "log_every_n_steps": EVERY,
            "num_devices": 1,
        }
        assert "session_end_info" not in content  # closed without a fit's end
        for path in logged_fit.log_dir.glob("events.out.tfevents.*"):
            assert hparams_content(read_events(log_dir / path.name)) == {}

    def test_reopening_removes_only_the_hparams_records_and_keeps_the_rest_byte_for_byte(self, tmp_path):
        first = TensorBoardLogger(tmp_path, hparams={"width": "small"})
        first.open(FakeTrainer(), 0)
        first.write(4, 0, {"train_loss": 1.0})
        first.on_fit_end(FakeTrainer(), FitProgress(5, 0, {}))
        first.close()
        [path] = tmp_path.glob("events.out.tfevents.*")
        with path.open("ab") as file:
            file.write(b"\x40\x00\x00")  # a record cut short, as a killed writer leaves one
        before = path.read_bytes()
        assert set(hparams_content(read_events(tmp_path))) == {"experiment", "session_start_info", "session_end_info"}

        second = TensorBoardLogger(tmp_path, hparams={"width": "large"})
        second.open(FakeTrainer(), 5)
        second.close()
        after = path.read_bytes()
        # The file is the original less its three hparams records (16 bytes of framing each):
        # the other records, read by TensorBoard's loader, in order, and the cut tail unchanged.
        records_before, records_after = raw_records(path, before), raw_records(path, after)
        dropped = [record for record in records_before if is_hparams(record)]
        assert len(dropped) == 3
        assert records_after == [r for r in records_before if r not in dropped]
        assert after.endswith(b"\x40\x00\x00")
        assert len(after) == len(before) - sum(len(r) + 16 for r in dropped)
        assert hparams_content(read_events(path)) == {}
        assert scalars(read_events(path), "train_loss") == {4: 1.0}
        content = hparams_content(read_events(tmp_path))
        assert hparam_values(content["session_start_info"].session_start_info.hparams)["width"] == "large"

    def test_hparams_keep_their_types(self, tmp_path):
        hparams = {"width": "small", "flag": True, "depth": np.int64(3), "lr": 1e-3, "batch_size": 7}
        logger = TensorBoardLogger(tmp_path, hparams=hparams)
        logger.open(FakeTrainer(), 0)
        logger.close()
        content = hparams_content(read_events(tmp_path))
        values = hparam_values(content["session_start_info"].session_start_info.hparams)
        assert {name: values[name] for name in hparams} == {
            "width": "small", "flag": True, "depth": 3.0, "lr": 1e-3, "batch_size": 7.0
        }  # fmt: skip  # the user's batch_size wins over the fit's
        assert type(values["flag"]) is bool
        types_ = {info.name: api_pb2.DataType.Name(info.type) for info in content["experiment"].experiment.hparam_infos}
        assert types_["width"] == "DATA_TYPE_STRING" and types_["flag"] == "DATA_TYPE_BOOL"
        assert types_["depth"] == types_["lr"] == "DATA_TYPE_FLOAT64"

    def test_a_fresh_open_keeps_nothing_to_purge(self, tmp_path):
        logger = TensorBoardLogger(tmp_path)
        logger.open(FakeTrainer(), 0)
        logger.write(4, 0, {"train_loss": 1.0})
        logger.close()
        assert scalars(read_events(tmp_path), "train_loss") == {4: 1.0}

    def test_a_resume_in_the_same_second_keeps_the_earlier_events(self, tmp_path, monkeypatch):
        monkeypatch.setattr(tensorboardX.event_file_writer, "time", types.SimpleNamespace(time=lambda: 1.7e9))
        first = TensorBoardLogger(tmp_path)
        first.open(FakeTrainer(), 0)
        first.write(4, 0, {"train_loss": 1.0})
        first.close()
        resumed = TensorBoardLogger(tmp_path)
        resumed.open(FakeTrainer(), 5)
        resumed.write(9, 0, {"train_loss": 2.0})
        resumed.close()
        assert scalars(read_events(tmp_path), "train_loss") == {4: 1.0, 9: 2.0}


# -- CSV ---------------------------------------------------------------------------------------


class TestCSVFit:
    def test_header_and_whole_lines(self, logged_fit):
        text = logged_fit.csv_path.read_text()
        assert text.splitlines()[0] == "step,epoch,metric,value"
        assert text.endswith("\n")
        rows = read_csv(logged_fit.csv_path)
        assert rows and all(len(row) == 4 and None not in row for row in rows)
        # The epoch column is the epoch of the step.
        assert all(int(row["epoch"]) == int(row["step"]) // STEPS_PER_EPOCH for row in rows)

    def test_train_loss_rows_are_the_losses_at_those_steps(self, logged_fit):
        logged = csv_scalars(read_csv(logged_fit.csv_path), "train_loss")
        assert sorted(logged) == LOGGED_STEPS
        # Written with repr(float): exactly the float32 losses.
        assert [logged[s] for s in LOGGED_STEPS] == [float(logged_fit.losses[s]) for s in LOGGED_STEPS]

    def test_epoch_and_validation_rows(self, logged_fit):
        rows = read_csv(logged_fit.csv_path)
        epoch_rows = [(int(r["step"]), int(r["epoch"])) for r in rows if r["metric"] == "train_loss_epoch"]
        assert epoch_rows == [(s, e) for e, s in enumerate(EPOCH_END_STEPS)]
        means = logged_fit.losses.reshape(EPOCHS, STEPS_PER_EPOCH).mean(axis=1)
        logged = csv_scalars(rows, "train_loss_epoch")
        np.testing.assert_allclose([logged[s] for s in EPOCH_END_STEPS], means, rtol=1e-6)
        assert sorted(csv_scalars(rows, "epoch_time")) == EPOCH_END_STEPS
        for name in ("val_loss", "val_lpd"):
            logged = csv_scalars(rows, name)
            assert sorted(logged) == EPOCH_END_STEPS
            assert [logged[s] for s in EPOCH_END_STEPS] == [m[name] for _, m in logged_fit.validations]
        rates = csv_scalars(rows, "learning_rate")
        np.testing.assert_allclose([rates[s] for s in LOGGED_STEPS], [schedule(s) for s in LOGGED_STEPS], rtol=1e-5)

    def test_csv_and_tensorboard_hold_the_same_scalars(self, logged_fit):
        rows = read_csv(logged_fit.csv_path)
        events = read_events(logged_fit.log_dir)
        assert {r["metric"] for r in rows} == set(events.Tags()["scalars"])
        for tag in events.Tags()["scalars"]:
            from_csv, from_tb = csv_scalars(rows, tag), scalars(events, tag)
            assert sorted(from_csv) == sorted(from_tb), tag
            np.testing.assert_allclose([from_tb[s] for s in from_csv], list(from_csv.values()), rtol=1e-6)
        # One row per (step, metric).
        assert len({(r["step"], r["metric"]) for r in rows}) == len(rows)


class TestCSVResume:
    def test_a_resumed_logger_keeps_the_rows_before_its_resume_step(self, logged_fit, tmp_path):
        path = tmp_path / "metrics.csv"
        shutil.copyfile(logged_fit.csv_path, path)
        before = read_csv(path)
        logger = CSVLogger(path)
        logger.open(FakeTrainer(), 20)
        logger.write(24, 2, {"train_loss": 1.5})
        logger.close()

        rows = read_csv(path)
        kept = [row for row in before if int(row["step"]) < 20]
        assert kept and len(kept) < len(before)
        assert rows == [*kept, {"step": "24", "epoch": "2", "metric": "train_loss", "value": "1.5"}]
        assert path.read_text().splitlines()[0] == "step,epoch,metric,value"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.csv"]  # no staging file left

    def test_a_fresh_open_replaces_the_file(self, logged_fit, tmp_path):
        path = tmp_path / "metrics.csv"
        shutil.copyfile(logged_fit.csv_path, path)
        logger = CSVLogger(path)
        logger.open(FakeTrainer(), 0)
        logger.write(4, 0, {"train_loss": 2.0})
        logger.close()
        assert read_csv(path) == [{"step": "4", "epoch": "0", "metric": "train_loss", "value": "2.0"}]

    def test_a_resume_without_a_previous_file_starts_one(self, tmp_path):
        path = tmp_path / "metrics.csv"
        logger = CSVLogger(path)
        logger.open(FakeTrainer(), 20)
        logger.write(24, 2, {"train_loss": 1.0})
        logger.close()
        assert path.read_text().splitlines() == ["step,epoch,metric,value", "24,2,train_loss,1.0"]


# -- process 0 only, bad paths -----------------------------------------------------------------


def test_only_process_0_creates_or_writes_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda *args, **kwargs: 1)
    tb = TensorBoardLogger(tmp_path / "tb")
    csv_logger = CSVLogger(tmp_path / "csv" / "metrics.csv")
    trainer = FakeTrainer()
    progress = FitProgress(step=10, epoch=0, metrics={"train_loss": 1.0, "train_loss_epoch": 1.0, "val_loss": 2.0})
    for logger in (tb, csv_logger):
        assert not logger.is_writer
        logger.on_fit_start(trainer, FitProgress(0, 0, {}))
        logger.on_train_epoch_start(trainer, FitProgress(0, 0, {}))
        logger.on_train_chunk_end(trainer, progress, np.ones(10, np.float32), range(0, 10))
        logger.on_validation_end(trainer, progress)
        logger.on_train_epoch_end(trainer, progress)
        logger.on_fit_end(trainer, progress)
        logger.teardown(trainer)
    assert tb.log_dir is None
    assert list(tmp_path.iterdir()) == []


class TestBadPaths:
    def test_a_log_dir_under_a_regular_file(self, tmp_path):
        blocker = tmp_path / "file"
        blocker.write_text("not a directory")
        with pytest.raises(ConfigurationError, match="log_dir") as caught:
            TensorBoardLogger(blocker / "runs")
        assert isinstance(caught.value, ValueError)
        assert "cannot be written" in str(caught.value) and str(blocker / "runs") in str(caught.value)

    def test_a_log_dir_that_is_a_regular_file(self, tmp_path):
        blocker = tmp_path / "file"
        blocker.write_text("not a directory")
        with pytest.raises(ConfigurationError, match="log_dir"):
            TensorBoardLogger(blocker)

    def test_a_log_dir_is_created_with_its_parents(self, tmp_path):
        logger = TensorBoardLogger(tmp_path / "a" / "b")
        assert logger.log_dir == tmp_path / "a" / "b" and logger.log_dir.is_dir()
        assert list(logger.log_dir.iterdir()) == []  # nothing written before the fit

    def test_a_csv_path_under_a_regular_file(self, tmp_path):
        blocker = tmp_path / "file"
        blocker.write_text("not a directory")
        with pytest.raises(ConfigurationError, match="path's directory") as caught:
            CSVLogger(blocker / "metrics.csv")
        assert isinstance(caught.value, ValueError)

    def test_a_csv_path_that_is_a_directory(self, tmp_path):
        with pytest.raises(ConfigurationError, match="is a directory"):
            CSVLogger(tmp_path)

    def test_a_csv_directory_is_created(self, tmp_path):
        CSVLogger(tmp_path / "a" / "metrics.csv")
        assert (tmp_path / "a").is_dir() and not (tmp_path / "a" / "metrics.csv").exists()


# -- a fit that raises -------------------------------------------------------------------------


class Boom(Callback):
    def on_train_chunk_end(self, trainer, progress, losses, steps):
        if steps.stop >= STEPS_PER_EPOCH:
            raise RuntimeError("boom")


def test_files_are_closed_and_readable_when_the_fit_raises(tmp_path):
    log_dir, csv_path = tmp_path / "tb", tmp_path / "metrics.csv"
    tb, csv_logger = TensorBoardLogger(log_dir), CSVLogger(csv_path)
    trainer = Trainer(
        max_epochs=EPOCHS,
        rng_key=jax.random.key(0),
        enable_progress_bar=False,
        log_every_n_steps=EVERY,
        callbacks=[tb, csv_logger, Boom()],
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(linear_svi(NUM_ROWS), linear_data(NUM_ROWS), batch_size=BATCH)

    assert tb._writer is None
    assert csv_logger._file is None
    text = csv_path.read_text()
    assert text.endswith("\n")
    rows = read_csv(csv_path)
    assert all(len(row) == 4 and None not in row and row["value"] for row in rows)
    # The loggers ran before Boom in the failing chunk's hook: its rows are there.
    assert sorted(csv_scalars(rows, "train_loss")) == [4, 9]
    assert "train_loss_epoch" not in {row["metric"] for row in rows}
    events = read_events(log_dir)
    assert scalars(events, "train_loss") == pytest.approx(csv_scalars(rows, "train_loss"), rel=1e-6)
    # The hparams were written at fit start, and the session ended as a failure.
    content = hparams_content(events)
    assert hparam_values(content["session_start_info"].session_start_info.hparams)["max_epochs"] == EPOCHS
    assert content["session_end_info"].session_end_info.status == api_pb2.STATUS_FAILURE
    [group] = hparams_tab(tmp_path).session_groups
    assert [(session.name, session.status) for session in group.sessions] == [("tb", api_pb2.STATUS_FAILURE)]


# -- hparams across a resume -------------------------------------------------------------------


def test_a_resumed_fit_shows_its_own_hparams_in_one_row(tmp_path):
    log_dir, checkpoints = tmp_path / "runs" / "tb", tmp_path / "checkpoints"

    def trainer(max_epochs: int) -> Trainer:
        callbacks = [TensorBoardLogger(log_dir, log_histograms=False), ModelCheckpoint(checkpoints)]
        return Trainer(
            max_epochs=max_epochs,
            rng_key=jax.random.key(0),
            enable_progress_bar=False,
            log_every_n_steps=EVERY,
            callbacks=callbacks,
        )

    trainer(EPOCHS - 1).fit(linear_svi(NUM_ROWS), linear_data(NUM_ROWS), batch_size=BATCH)
    first = hparams_content(read_events(log_dir))
    assert hparam_values(first["session_start_info"].session_start_info.hparams)["max_epochs"] == EPOCHS - 1
    result = trainer(EPOCHS).fit(linear_svi(NUM_ROWS), linear_data(NUM_ROWS), batch_size=BATCH, ckpt_path="last")
    assert result.losses.shape == (NUM_STEPS,)

    events = read_events(log_dir)
    content = hparams_content(events)
    assert hparam_values(content["session_start_info"].session_start_info.hparams)["max_epochs"] == EPOCHS
    assert content["session_end_info"].session_end_info.status == api_pb2.STATUS_SUCCESS
    [group] = hparams_tab(log_dir.parent).session_groups
    assert hparam_values(group.hparams)["max_epochs"] == EPOCHS
    [session] = group.sessions
    shown = {value.name.tag: value.training_step for value in session.metric_values}
    assert shown["train_loss"] == LOGGED_STEPS[-1] and shown["train_loss_epoch"] == EPOCH_END_STEPS[-1]
    # Both fits' curves are intact: removing the first fit's hparams kept its other records.
    logged = scalars(events, "train_loss")
    assert sorted(logged) == LOGGED_STEPS
    np.testing.assert_allclose([logged[s] for s in LOGGED_STEPS], result.losses[LOGGED_STEPS], rtol=1e-6)
    assert sorted(scalars(events, "train_loss_epoch")) == EPOCH_END_STEPS


def test_validate_and_test_add_their_scalars_and_keep_the_runs_hparams(tmp_path):
    log_dir = tmp_path / "runs" / "tb"
    trainer = Trainer(
        max_epochs=1,
        rng_key=jax.random.key(0),
        enable_progress_bar=False,
        log_every_n_steps=EVERY,
        callbacks=[TensorBoardLogger(log_dir, log_histograms=False)],
    )
    trainer.fit(linear_svi(NUM_ROWS), linear_data(NUM_ROWS), batch_size=BATCH)
    before = hparams_content(read_events(log_dir))
    tested = trainer.test(trainer.svi, linear_data(200, seed=1))
    events = read_events(log_dir)
    assert scalars(events, "test_loss") == {STEPS_PER_EPOCH - 1: pytest.approx(tested["test_loss"])}
    assert hparams_content(events) == before  # the fit's row, status included, as it was
    [group] = hparams_tab(log_dir.parent).session_groups
    assert hparam_values(group.hparams)["max_epochs"] == 1


# -- train_loss_per_row and val_loss: one scale --------------------------------------------------


def test_per_row_train_loss_and_val_loss_agree_on_data_of_one_distribution(tmp_path):
    """Train and validation rows drawn alike: at the end of a converged fit the per-row training
    loss and val_loss are close, while train_loss is num_rows times larger."""
    trainer = Trainer(
        max_epochs=20, rng_key=jax.random.key(0), enable_progress_bar=False, callbacks=[CSVLogger(tmp_path / "m.csv")]
    )
    trainer.fit(linear_svi(NUM_ROWS), linear_data(NUM_ROWS), batch_size=BATCH, val_data=linear_data(1000, seed=10))
    rows = read_csv(tmp_path / "m.csv")
    last = max(csv_scalars(rows, "val_loss"))
    val_loss = csv_scalars(rows, "val_loss")[last]
    per_row = csv_scalars(rows, "train_loss_per_row_epoch")[last]
    # The negative log-likelihood per row at the truth is 0.5 log(2 pi 0.3^2) + 0.5 = 0.215;
    # both sit near it. Seeds 0-2 differ by at most 0.08 (the val rows' own noise); dividing by
    # the batch size instead of the rows would be 10 times off.
    assert 0.1 < val_loss < 0.5 and abs(per_row - val_loss) < 0.15
    assert csv_scalars(rows, "train_loss_epoch")[last] == pytest.approx(per_row * NUM_ROWS, rel=1e-12)


# -- a fit that writes no train_loss point -----------------------------------------------------


def logged_steps_fit(tmp_path: Path, max_steps: int, *, loggers: bool = True) -> list[dict[str, str]]:
    path = tmp_path / "metrics.csv"
    trainer = Trainer(
        max_steps=max_steps,
        rng_key=jax.random.key(0),
        enable_progress_bar=False,
        log_every_n_steps=EVERY,
        callbacks=[CSVLogger(path)] if loggers else [],
    )
    trainer.fit(linear_svi(NUM_ROWS), linear_data(NUM_ROWS), batch_size=BATCH)
    return read_csv(path) if loggers else []


class TestNoTrainLossPoint:
    def test_a_fit_shorter_than_log_every_n_steps_warns_and_writes_no_train_loss(self, tmp_path):
        with pytest.warns(LoggingWarning, match=r"runs 4 steps \(steps 0 to 3\) and log_every_n_steps=5") as caught:
            rows = logged_steps_fit(tmp_path, EVERY - 1)
        assert "log_every_n_steps=...) of at most 4" in str(caught[0].message)
        assert issubclass(LoggingWarning, UserWarning) and caught[0].filename == __file__  # the fit call's line
        assert "train_loss" not in {row["metric"] for row in rows}
        assert sorted(csv_scalars(rows, "train_loss_epoch")) == [EVERY - 2]  # the rest is written

    def test_a_fit_reaching_a_logging_step_does_not_warn(self, tmp_path):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows = logged_steps_fit(tmp_path, EVERY)
        assert [w.message for w in caught if issubclass(w.category, LoggingWarning)] == []
        assert sorted(csv_scalars(rows, "train_loss")) == [EVERY - 1]

    def test_a_fit_without_loggers_does_not_warn(self, tmp_path):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logged_steps_fit(tmp_path, EVERY - 1, loggers=False)
        assert [w.message for w in caught if issubclass(w.category, LoggingWarning)] == []

    @pytest.mark.parametrize(("start_index", "warns"), [(0, False), (1, True), (2, False)])
    def test_the_steps_counted_are_those_from_the_resume_step(self, tmp_path, start_index, warns):
        # 14 steps in chunks [0, 10) and [10, 14): step 9 is logged, none of steps 10-13 is;
        # resumed at the end, no step is left to run.
        plan = FitPlan.create(
            NUM_ROWS, BATCH, drop_last=False, max_epochs=None, max_steps=14, steps_per_chunk=None,
            boundaries=[Every(steps=10)],
        )  # fmt: skip
        assert [(c.first_step, c.num_steps) for c in plan.chunks] == [(0, 10), (10, 4)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warn_if_no_train_loss_point(plan, start_index, 10, [CSVLogger(tmp_path / "m.csv")])
        messages = [str(w.message) for w in caught]
        assert messages == ([messages[0]] if warns else [])
        assert not warns or messages[0].startswith("this fit runs 4 steps (steps 10 to 13) and log_every_n_steps=10")
