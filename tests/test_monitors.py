"""The fit's training clock (FitContext.timing, steps_per_sec) and the monitoring callbacks:
ThroughputMonitor, DeviceStatsMonitor, Profiler, ModelSummary."""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import pytest
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from optax import adam
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from aimz_trainer import (
    Callback,
    ConfigurationError,
    DeviceStatsMonitor,
    FitTiming,
    ModelSummary,
    Profiler,
    TensorBoardLogger,
    ThroughputMonitor,
    Trainer,
)
from aimz_trainer.callbacks.device_stats import DEVICE_MEMORY_STATS, device_memory, host_memory
from aimz_trainer.callbacks.model_summary import format_param_table, param_rows
from aimz_trainer.errors import FitWarning

from .conftest import linear_data, linear_svi, local_data, local_model

NUM_ROWS, BATCH, EVERY, EPOCHS = 1000, 100, 5, 3
STEPS_PER_EPOCH = NUM_ROWS // BATCH
NUM_STEPS = EPOCHS * STEPS_PER_EPOCH
SLEEP_S = 0.25  # every validation pass is made this much slower
TRACED = (10, 20)  # chunk ends: multiples of EVERY


class Probe(Callback):
    """Records what a callback sees of the clock: ``(steps.stop, fit.timing, steps_per_sec)``
    at every chunk end, and the timing at fit end."""

    def __init__(self) -> None:
        self.chunks: list[tuple[int, FitTiming, float | None]] = []
        self.final: FitTiming | None = None

    def on_train_chunk_end(self, fit, progress, losses, steps):
        self.chunks.append((steps.stop, fit.timing, progress.metrics.get("steps_per_sec")))

    def on_fit_end(self, fit, progress):
        self.final = fit.timing


class SlowValidation(Callback):
    """Sleeps after every validation pass: time the training clock must leave out."""

    def __init__(self) -> None:
        self.passes = 0

    def on_validation_end(self, fit, progress):
        self.passes += 1
        time.sleep(SLEEP_S)


class MonitoredFit(NamedTuple):
    trainer: Trainer
    result: Any
    probe: Probe
    slow: SlowValidation
    summary: ModelSummary
    profiler: Profiler
    printed: str
    log_dir: Path
    profile_dir: Path


@pytest.fixture(scope="module")
def monitored(tmp_path_factory) -> MonitoredFit:
    """One fit with every monitor, a TensorBoardLogger and a validation pass made slow."""
    log_dir = tmp_path_factory.mktemp("tb")
    profile_dir = tmp_path_factory.mktemp("profile")
    probe, slow, summary = Probe(), SlowValidation(), ModelSummary()
    profiler = Profiler(profile_dir, steps=TRACED)
    trainer = Trainer(
        max_epochs=EPOCHS,
        log_every_n_steps=EVERY,
        callbacks=[
            TensorBoardLogger(log_dir, log_histograms=False),
            ThroughputMonitor(),
            DeviceStatsMonitor(),
            summary,
            profiler,
            slow,
            probe,
        ],
        enable_progress_bar=False,
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = trainer.fit(
            linear_svi(NUM_ROWS),
            linear_data(NUM_ROWS),
            batch_size=BATCH,
            val_data=linear_data(200, seed=1),
            shuffle=False,
        )
    return MonitoredFit(trainer, result, probe, slow, summary, profiler, printed.getvalue(), log_dir, profile_dir)


def scalars(log_dir: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


class TestTrainingClock:
    def test_the_parts_of_the_clock_are_disjoint_and_validation_is_left_out(self, monitored):
        timing, passes = monitored.probe.final, monitored.slow.passes
        assert passes == EPOCHS
        first_chunk_steps = monitored.probe.chunks[0][0]
        assert timing.train_steps == NUM_STEPS - first_chunk_steps
        assert timing.startup_s == monitored.trainer.timings["first_chunk_s"]
        assert timing.validation_s >= passes * SLEEP_S
        # Start-up, training and validation are disjoint stretches of the fit's wall time, so the
        # training clock holds none of the sleeps injected into validation.
        assert timing.startup_s + timing.train_s + timing.validation_s <= monitored.trainer.timings["fit_s"]
        assert timing.train_s <= monitored.trainer.timings["fit_s"] - timing.startup_s - passes * SLEEP_S
        assert timing.steps_per_sec == timing.train_steps / timing.train_s

    def test_the_clock_runs_at_every_chunk_and_stops_during_validation(self, monitored):
        chunks = monitored.probe.chunks
        assert [stop for stop, _, _ in chunks] == list(range(EVERY, NUM_STEPS + 1, EVERY))
        assert chunks[0][1].startup_s is not None and chunks[0][1].train_steps == 0
        for (stop, before, _), (_, after, _) in itertools.pairwise(chunks):
            assert after.train_steps - before.train_steps == EVERY
            assert after.train_s > before.train_s
            # A pass runs after an epoch's last chunk and before the next chunk's results.
            validated = stop % STEPS_PER_EPOCH == 0
            assert (after.validation_s - before.validation_s >= SLEEP_S) == validated

    def test_steps_per_sec_is_the_rate_on_the_training_clock(self, monitored):
        """steps_per_sec averages since the last epoch end, on training seconds: the first chunk
        after a slow validation pass is as fast as any other."""
        chunks = monitored.probe.chunks
        since: tuple[int, float] | None = None
        for stop, timing, steps_per_sec in chunks:
            if since is None:  # the start-up chunk: no rate
                assert steps_per_sec is None
            else:
                expected = (timing.train_steps - since[0]) / (timing.train_s - since[1])
                assert steps_per_sec == pytest.approx(expected, rel=1e-9)
            if since is None or stop % STEPS_PER_EPOCH == 0:
                since = (timing.train_steps, timing.train_s)
        logged = scalars(monitored.log_dir, "steps_per_sec")
        assert logged == pytest.approx({stop - 1: rate for stop, _, rate in chunks[1:]}, rel=1e-6)


class TestThroughputMonitor:
    def test_rates_reach_tensorboard_on_training_time(self, monitored):
        chunks = monitored.probe.chunks
        steps_per_sec = scalars(monitored.log_dir, "throughput/steps_per_sec")
        # Every chunk ends on a logging step; the first is start-up and has no rate.
        assert sorted(steps_per_sec) == [stop - 1 for stop, _, _ in chunks[1:]]
        devices = monitored.trainer.mesh.size
        for (_, before, _), (stop, after, _) in itertools.pairwise(chunks):
            expected = (after.train_steps - before.train_steps) / (after.train_s - before.train_s)
            assert steps_per_sec[stop - 1] == pytest.approx(expected, rel=1e-6)
            assert scalars(monitored.log_dir, "throughput/rows_per_sec")[stop - 1] == pytest.approx(expected * BATCH)
            device_rows = scalars(monitored.log_dir, "throughput/device/rows_per_sec")[stop - 1]
            assert device_rows == pytest.approx(expected * BATCH / devices)

    def test_startup_is_logged_once(self, monitored):
        assert scalars(monitored.log_dir, "throughput/startup_s") == pytest.approx(
            {EVERY - 1: monitored.probe.final.startup_s}
        )

    def test_per_device_rates_divide_by_the_mesh(self):
        logged: dict[str, float] = {}
        fit = SimpleNamespace(
            timing=FitTiming(startup_s=3.0, train_s=2.0, train_steps=100, validation_s=0.0),
            log_every_n_steps=50,
            plan=SimpleNamespace(batch_size=30),
            mesh=SimpleNamespace(size=4),
            log=logged.__setitem__,
            log_dict=logged.update,
        )
        ThroughputMonitor().on_train_chunk_end(fit, None, np.zeros(50), range(100, 150))
        assert logged == {
            "throughput/startup_s": 3.0,
            "throughput/steps_per_sec": 50.0,
            "throughput/rows_per_sec": 1500.0,
            "throughput/device/steps_per_sec": 12.5,
            "throughput/device/rows_per_sec": 375.0,
        }


class FakeDevice:
    def __init__(self, platform: str, id: int, stats: Any) -> None:
        self.platform, self.id, self._stats = platform, id, stats

    def memory_stats(self) -> Any:
        if isinstance(self._stats, Exception):
            raise self._stats
        return self._stats


class TestDeviceStatsMonitor:
    def test_host_memory_reaches_tensorboard_at_fit_start_and_logging_steps(self, monitored):
        rss = scalars(monitored.log_dir, "device_stats/host/rss_bytes")
        peak = scalars(monitored.log_dir, "device_stats/host/peak_rss_bytes")
        assert sorted(rss) == [0, *(stop - 1 for stop, _, _ in monitored.probe.chunks)]
        assert all(value > 1e6 for value in rss.values())  # a Python process with JAX: megabytes
        assert all(peak[step] >= rss[step] for step in rss)

    def test_accelerator_stats_per_local_device(self):
        gpu = {"bytes_in_use": 10, "peak_bytes_in_use": 30, "bytes_limit": 100, "num_allocs": 7}
        logged: dict[str, float] = {}
        fit = SimpleNamespace(
            mesh=SimpleNamespace(local_devices=[FakeDevice("gpu", 0, gpu), FakeDevice("gpu", 1, {"bytes_in_use": 5})]),
            log_every_n_steps=5,
            log_dict=logged.update,
        )
        DeviceStatsMonitor().on_train_chunk_end(fit, None, np.zeros(5), range(0, 5))
        device_logged = {name: value for name, value in logged.items() if not name.startswith("device_stats/host/")}
        assert device_logged == {
            "device_stats/gpu0/bytes_in_use": 10.0,
            "device_stats/gpu0/peak_bytes_in_use": 30.0,
            "device_stats/gpu0/bytes_limit": 100.0,
            "device_stats/gpu1/bytes_in_use": 5.0,
        }
        logged.clear()
        DeviceStatsMonitor().on_train_chunk_end(fit, None, np.zeros(3), range(5, 8))  # not a logging step
        assert logged == {}

    def test_a_resumed_fit_logs_no_second_baseline(self):
        """The baseline is a fresh fit's step-0 point; a resumed fit's logs hold it already."""
        logged: dict[str, float] = {}
        fit = SimpleNamespace(mesh=SimpleNamespace(local_devices=[]), log_dict=logged.update, log=logged.__setitem__)
        DeviceStatsMonitor().on_fit_start(fit, SimpleNamespace(step=20))
        assert logged == {}
        DeviceStatsMonitor().on_fit_start(fit, SimpleNamespace(step=0))
        assert set(logged) >= {"device_stats/host/rss_bytes", "device_stats/host/peak_rss_bytes"}

    def test_devices_without_stats_give_none(self):
        assert device_memory(FakeDevice("cpu", 0, None)) == {}
        assert device_memory(FakeDevice("tpu", 0, RuntimeError("UNIMPLEMENTED"))) == {}
        assert set(device_memory(FakeDevice("gpu", 0, dict.fromkeys(DEVICE_MEMORY_STATS, 1)))) == set(
            DEVICE_MEMORY_STATS
        )
        memory = host_memory()
        assert memory["peak_rss_bytes"] >= memory["rss_bytes"] > 0


class TestProfiler:
    def test_the_trace_is_where_tensorboards_profile_plugin_reads_it(self, monitored):
        """The layout the profile plugin (xprof) documents: <logdir>/plugins/profile/<run>/<host>.xplane.pb."""
        runs = list((monitored.profile_dir / "plugins" / "profile").iterdir())
        assert runs == [monitored.profiler.trace_dir]
        traces = list(runs[0].glob("*.xplane.pb"))
        assert len(traces) == 1 and traces[0].stat().st_size > 0

    def test_it_records_the_steps_it_traced(self, monitored):
        assert monitored.profiler.traced_steps == range(*TRACED)

    def test_by_default_it_traces_the_second_chunk_from_the_fit_start(self, tmp_path):
        """The first two chunks are dispatched before any chunk's hooks: the trace starts at fit
        start and so holds the first chunk as well."""
        profiler = Profiler(tmp_path)
        trainer = Trainer(max_steps=15, log_every_n_steps=EVERY, callbacks=[profiler], enable_progress_bar=False)
        trainer.fit(linear_svi(NUM_ROWS), linear_data(NUM_ROWS), batch_size=BATCH)
        assert profiler.traced_steps == range(0, 2 * EVERY)
        assert profiler.trace_dir is not None and list(profiler.trace_dir.glob("*.xplane.pb"))

    def test_steps_outside_the_fit_warn_and_trace_nothing(self, tmp_path):
        profiler = Profiler(tmp_path, steps=(500, 600))
        trainer = Trainer(max_steps=5, log_every_n_steps=5, callbacks=[profiler], enable_progress_bar=False)
        with pytest.warns(FitWarning, match=r"runs steps 0 to 4; nothing is traced"):
            trainer.fit(linear_svi(NUM_ROWS), linear_data(NUM_ROWS), batch_size=BATCH)
        assert profiler.traced_steps is None and not (tmp_path / "plugins").exists()

    def test_each_process_of_a_several_process_fit_traces_into_a_directory_of_its_own(self, tmp_path, monkeypatch):
        """The trace files are named after the host: two processes of one host sharing a run's
        directory would overwrite each other's. As process 1 of 2 (the Profiler's view only):"""
        import aimz_trainer.callbacks.profiler as profiler_module

        monkeypatch.setattr(profiler_module, "process_count", lambda: 2)
        monkeypatch.setattr(profiler_module, "process_index", lambda: 1)
        (tmp_path / "process_0" / "plugins" / "profile" / "other").mkdir(parents=True)  # process 0's run
        profiler = Profiler(tmp_path, steps=(0, EVERY))
        trainer = Trainer(max_steps=15, log_every_n_steps=EVERY, callbacks=[profiler], enable_progress_bar=False)
        trainer.fit(linear_svi(NUM_ROWS), linear_data(NUM_ROWS), batch_size=BATCH)
        assert (
            profiler.trace_dir is not None
            and profiler.trace_dir.parent == tmp_path / "process_1" / "plugins" / "profile"
        )
        assert sorted(path.name for path in tmp_path.iterdir()) == ["process_0", "process_1"]
        assert len(list(profiler.trace_dir.glob("*.xplane.pb"))) == 1

    def test_a_trace_ending_in_the_second_of_an_earlier_run_gets_a_name_of_its_own(self, tmp_path):
        """JAX names a run after the second its trace ends in: the runs of the next minute exist
        already here (as two traces in one second make them), and stay as they were."""
        profile = tmp_path / "plugins" / "profile"
        now = time.time()
        earlier = [time.strftime("%Y_%m_%d_%H_%M_%S", time.localtime(now + second)) for second in range(-1, 60)]
        for name in earlier:
            (profile / name).mkdir(parents=True)
            (profile / name / "host.xplane.pb").write_bytes(b"an earlier trace")
        profiler = Profiler(tmp_path, steps=(0, EVERY))
        trainer = Trainer(max_steps=15, log_every_n_steps=EVERY, callbacks=[profiler], enable_progress_bar=False)
        trainer.fit(linear_svi(NUM_ROWS), linear_data(NUM_ROWS), batch_size=BATCH)
        assert profiler.trace_dir is not None and profiler.trace_dir.parent == profile
        assert profiler.trace_dir.name.endswith("_2") and profiler.trace_dir.name[:-2] in earlier
        assert sorted(path.name for path in profile.iterdir()) == sorted([*earlier, profiler.trace_dir.name])
        for name in earlier:
            assert [path.read_bytes() for path in (profile / name).iterdir()] == [b"an earlier trace"]
        assert len(list(profiler.trace_dir.glob("*.xplane.pb"))) == 1
        assert sorted(path.name for path in tmp_path.iterdir()) == ["plugins"]  # the staging directory is gone

    @pytest.mark.parametrize("steps", [(5, 5), (-1, 3), (1,), [1.0, 2.0], "1-2", (True, 3)])
    def test_bad_steps_are_refused(self, tmp_path, steps):
        with pytest.raises(ConfigurationError, match=r"steps must be None or \(start, stop\)"):
            Profiler(tmp_path, steps=steps)


class TestModelSummary:
    def test_the_table_counts_the_guides_parameters(self, monitored):
        params = monitored.result.params
        assert [row.name for row in monitored.summary.rows] == list(params)
        for row in monitored.summary.rows:
            assert row.shape == np.shape(params[row.name]) and row.count == np.size(params[row.name])
            assert row.dtype == "float32"
        assert monitored.summary.total == 4  # loc and scale of w and b
        assert monitored.printed.strip().endswith("total: 4 values in 4 parameters")
        assert scalars(monitored.log_dir, "num_params") == {0: 4.0}
        assert monitored.trainer.callback_metrics["num_params"] == 4.0

    def test_per_row_latents_count_every_row(self):
        num_rows = 64
        model = local_model(num_rows)
        summary = ModelSummary(print_table=False)
        trainer = Trainer(max_steps=1, callbacks=[summary], enable_progress_bar=False)
        data, _ = local_data(num_rows)
        trainer.fit(SVI(model, AutoNormal(model), adam(0.01), Trace_ELBO()), data, batch_size=16)
        shapes = {row.name: row.shape for row in summary.rows}
        assert shapes == {"b_auto_loc": (), "b_auto_scale": (), "z_auto_loc": (num_rows,), "z_auto_scale": (num_rows,)}
        assert summary.total == 2 + 2 * num_rows == trainer.callback_metrics["num_params"]

    def test_nested_parameters_and_the_table(self):
        rows = param_rows({"net": {"kernel": np.zeros((3, 4), np.float32)}, "b": np.float64(1.0)})
        assert [(row.name, row.shape, row.count, row.dtype) for row in rows] == [
            ("b", (), 1, "float64"),
            ("net/kernel", (3, 4), 12, "float32"),
        ]
        table = format_param_table(rows)
        assert table.splitlines()[-1] == "total: 13 values in 2 parameters"
        assert math.isclose(sum(row.count for row in rows), 13)

    def test_print_table_must_be_a_bool(self):
        with pytest.raises(ConfigurationError, match="print_table must be True or False; got 'yes'"):
            ModelSummary(print_table="yes")
