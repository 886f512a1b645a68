"""Checkpoints: what ModelCheckpoint writes (named arrays that NumPy alone reads, as the README
shows), exact resumes (in-process and after a real SIGKILL), resumes on another device count,
load_checkpoint without a Trainer, bad checkpoints and bad requests (damaged ones, other data,
another optimizer), callback state across a resume (save_top_k too), and TensorBoard after a
resume.

Most fits share one configuration (that of ``tests/checkpoint_worker.py``): 1000 rows, batches of
100 (10 steps an epoch), 4 epochs, a checkpoint at every epoch end and every 7 steps, so the
checkpoints are at steps 7, 10, 14, 20, 21, 28, 30, 35 and 40 and those at 7, 14, 21, ... fall in
the middle of an epoch. Its compiled chunks are [0, 7), [7, 10), [10, 14), [14, 20), [20, 21), ...
so a ``Recorder(stop_after_chunks=3)`` stops a fit at step 14 (mid-epoch), ``4`` at step 20.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from numpyro.optim import SGD, Adam, optax_to_numpyro
from optax import adam, multi_transform, sgd
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from aimz_trainer import (
    Callback,
    CheckpointError,
    ConfigurationError,
    EarlyStopping,
    LoadedCheckpoint,
    ModelCheckpoint,
    TensorBoardLogger,
    Trainer,
    load_checkpoint,
)
from aimz_trainer.checkpoint import (
    CHECKPOINT_FORMAT,
    NamedArraysHandler,
    checkpoint_steps,
    resolve_checkpoint,
)
from aimz_trainer.errors import CheckpointWarning
from aimz_trainer.resume import data_digest, fingerprint_differences, fit_fingerprint, optimizer_probe

from .checkpoint_worker import BATCH_SIZE, EVERY_N_TRAIN_STEPS, MAX_EPOCHS, NUM_ROWS
from .conftest import NOISE, Recorder, linear_data, linear_svi

ROOT = Path(__file__).resolve().parent.parent
STEPS_PER_EPOCH = NUM_ROWS // BATCH_SIZE  # 10
TOTAL_STEPS = MAX_EPOCHS * STEPS_PER_EPOCH  # 40
SAVED_STEPS = [7, 10, 14, 20, 21, 28, 30, 35, 40]
PARAM_NAMES = ["b_auto_loc", "b_auto_scale", "w_auto_loc", "w_auto_scale"]
DATA = linear_data(NUM_ROWS)


class ChunkCounter(Callback):
    """A callback with state: counts chunks; remembers what on_load_checkpoint was given."""

    def __init__(self) -> None:
        self.chunks = 0
        self.loaded: tuple[int, int] | None = None

    def on_train_chunk_end(self, trainer, progress, losses, steps):
        self.chunks += 1

    def state_dict(self):
        return {"chunks": self.chunks}

    def load_state_dict(self, state):
        self.chunks = state["chunks"]

    def on_load_checkpoint(self, trainer, progress, checkpoint):
        self.loaded = (progress.step, checkpoint["step"])


def make_trainer(callbacks=(), *, max_epochs: int = MAX_EPOCHS, seed: int = 0, **kwargs) -> Trainer:
    return Trainer(
        max_epochs=max_epochs,
        rng_key=jax.random.key(seed),
        enable_progress_bar=False,
        callbacks=list(callbacks),
        **kwargs,
    )


def store(dirpath: Path, **kwargs) -> ModelCheckpoint:
    """The worker's ModelCheckpoint: every epoch and every 7 steps, all kept."""
    settings = {"every_n_epochs": 1, "every_n_train_steps": EVERY_N_TRAIN_STEPS, "save_top_k": -1} | kwargs
    return ModelCheckpoint(dirpath, **settings)


def fit(trainer: Trainer, *, svi: SVI | None = None, batch_size: int = BATCH_SIZE, ckpt_path=None):
    return trainer.fit(svi or linear_svi(NUM_ROWS), DATA, batch_size=batch_size, ckpt_path=ckpt_path)


def host(params) -> dict[str, np.ndarray]:
    return {name: np.asarray(value) for name, value in params.items()}


def assert_bitwise_equal(result, reference) -> None:
    np.testing.assert_array_equal(result.losses, reference.losses, strict=True)
    got, want = host(result.params), host(reference.params)
    assert sorted(got) == sorted(want) == PARAM_NAMES
    for name in PARAM_NAMES:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name, strict=True)


def snapshot(directory: Path) -> dict[str, tuple]:
    """Every entry under ``directory``: files by mtime and content hash."""
    entries: dict[str, tuple] = {}
    for path in sorted(directory.rglob("*")):
        relative = str(path.relative_to(directory))
        if path.is_file():
            entries[relative] = (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            entries[relative] = ("dir",)
    return entries


def copy_checkpoints(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def hooks(recorder: Recorder) -> list[str]:
    return [call[0] for call in recorder.calls]


@contextlib.contextmanager
def no_checkpoint_warning():
    """A CheckpointWarning inside fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        yield


# -- shared fits -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted fit, with the worker's checkpoints and a stateful callback."""
    dirpath = tmp_path_factory.mktemp("reference") / "checkpoints"
    counter, checkpoint = ChunkCounter(), store(dirpath)
    trainer = make_trainer([counter, checkpoint])
    result = fit(trainer)
    assert result.losses.shape == (TOTAL_STEPS,) and np.isfinite(result.losses).all()
    return SimpleNamespace(dirpath=dirpath, result=result, counter=counter, checkpoint=checkpoint, trainer=trainer)


@pytest.fixture(scope="module")
def stopped_at_20(tmp_path_factory):
    """Checkpoints 7, 10, 14 and 20 of a fit stopped after its second epoch (read-only: copy it)."""
    dirpath = tmp_path_factory.mktemp("stopped") / "checkpoints"
    result = fit(make_trainer([Recorder(stop_after_chunks=4), store(dirpath)]))
    assert result.losses.shape == (20,)
    assert checkpoint_steps(dirpath) == [7, 10, 14, 20]
    return dirpath


# -- what a checkpoint holds -------------------------------------------------------------------


class TestWhatIsSaved:
    def test_checkpoints_at_epoch_ends_and_every_n_train_steps_all_complete_when_fit_returns(self, reference):
        # save_top_k=-1 keeps all; fit waited for the asynchronous saves: no temporary directory.
        assert checkpoint_steps(reference.dirpath) == SAVED_STEPS
        assert sorted(os.listdir(reference.dirpath), key=int) == [str(step) for step in SAVED_STEPS]
        for step in SAVED_STEPS:
            assert {"meta", "state"} <= set(os.listdir(reference.dirpath / str(step)))

    def test_a_mid_epoch_checkpoint_holds_everything_to_continue(self, reference):
        saved = load_checkpoint(reference.dirpath / "14")
        assert isinstance(saved, LoadedCheckpoint)
        assert (saved.path, saved.step, saved.epoch) == (reference.dirpath / "14", 14, 1)
        np.testing.assert_array_equal(saved.losses, reference.result.losses[:14], strict=True)
        meta = saved.meta
        assert meta["format"] == CHECKPOINT_FORMAT == 4 and (meta["step"], meta["epoch"]) == (14, 1)
        assert meta["rng_key"]["data"] == np.asarray(jax.random.key_data(jax.random.key(0))).tolist()
        assert meta["rng_key"]["impl"] == str(jax.random.key_impl(jax.random.key(0)))
        assert meta["loader_state"]["next_index"] == 3  # chunks [0, 7), [7, 10), [10, 14) done
        assert meta["callbacks"]["ChunkCounter"] == {"chunks": 3}
        assert meta["params_tree"] == {name: [[], "float32"] for name in PARAM_NAMES}
        fit_shape = dict(meta["fit"])
        assert fit_shape.pop("steps_per_chunk") >= EVERY_N_TRAIN_STEPS
        assert fit_shape.pop("sampled_rows_digest") == data_digest(DATA)
        assert fit_shape.pop("optimizer_probe") == optimizer_probe(linear_svi(NUM_ROWS).optim)
        assert fit_shape == {
            "num_rows": NUM_ROWS,
            "batch_size": BATCH_SIZE,
            "steps_per_epoch": STEPS_PER_EPOCH,
            "total_steps": TOTAL_STEPS,
            "shuffle": True,
            "drop_last": False,
        }
        assert meta["trainer"]["max_epochs"] == MAX_EPOCHS and meta["trainer"]["max_steps"] is None
        assert meta["mesh_shape"] == {"data": 1}
        assert meta["versions"]["jax"] == jax.__version__
        assert meta["versions"]["numpyro"] == numpyro.__version__
        assert "aimz_trainer" in meta["versions"]

    def test_the_last_checkpoint_holds_the_final_parameters_and_losses(self, reference):
        saved = load_checkpoint(reference.dirpath)  # a directory of checkpoints: its newest
        assert (saved.path, saved.step, saved.epoch) == (reference.dirpath / "40", 40, 3)
        assert_bitwise_equal(saved, reference.result)

    def test_the_state_is_named_arrays_that_numpy_reads(self, reference):
        with np.load(reference.dirpath / "40" / "state" / "arrays.npz") as archive:
            arrays = {name: archive[name] for name in archive.files}
        for name in PARAM_NAMES:
            np.testing.assert_array_equal(arrays.pop(f"params/{name}"), reference.result.params[name], strict=True)
        np.testing.assert_array_equal(arrays.pop("losses"), reference.result.losses, strict=True)
        # The SVI state by tree path: the step count, optax's (unconstrained parameters, Adam's
        # state), and the rng key as its raw data.
        state = reference.result.state
        expected_key = np.asarray(jax.random.key_data(state.rng_key))
        np.testing.assert_array_equal(arrays.pop("svi_state/rng_key"), expected_key, strict=True)
        assert arrays.pop("svi_state/optim_state/0") == TOTAL_STEPS
        assert arrays.pop("svi_state/optim_state/1/1/0/count") == TOTAL_STEPS
        unconstrained, (moments, _) = state.optim_state[1]
        for name in PARAM_NAMES:
            for path, value in [("0", unconstrained), ("1/0/mu", moments.mu), ("1/0/nu", moments.nu)]:
                stored = arrays.pop(f"svi_state/optim_state/1/{path}/{name}")
                np.testing.assert_array_equal(stored, value[name], err_msg=f"{path}/{name}", strict=True)
        assert arrays == {}

    def test_the_readme_reader_gives_the_parameters_without_aimz_trainer(self, reference, monkeypatch):
        readme = (ROOT / "README.md").read_text()
        code = re.search(r"```python\n(.*?)```", readme.split("### Checkpoint format\n", 1)[1], re.S).group(1)
        statements = list(ast.walk(ast.parse(code)))
        assert not any(isinstance(node, ast.ImportFrom) for node in statements)
        assert {alias.name for node in statements if isinstance(node, ast.Import) for alias in node.names} == {
            "json",
            "numpy",
        }
        monkeypatch.chdir(reference.dirpath.parent)  # it reads checkpoints/40
        namespace: dict = {}
        exec(code, namespace)
        saved = load_checkpoint(reference.dirpath / "40")
        assert sorted(namespace["params"]) == sorted(saved.params) == PARAM_NAMES
        for name in PARAM_NAMES:
            np.testing.assert_array_equal(namespace["params"][name], saved.params[name], strict=True)
        np.testing.assert_array_equal(namespace["losses"], saved.losses, strict=True)
        assert namespace["meta"] == saved.meta

    def test_best_and_last_model_paths_without_a_monitor(self, reference):
        newest = str(reference.dirpath.resolve() / "40")
        assert reference.checkpoint.last_model_path == newest
        assert reference.checkpoint.best_model_path == newest  # nothing monitored: the newest
        assert reference.checkpoint.best_model_score is None

    def test_every_n_train_steps_alone_and_the_default_keeps_only_the_newest(self, tmp_path):
        by_steps = store(tmp_path / "steps", every_n_epochs=None)
        default = ModelCheckpoint(tmp_path / "default", async_save=False)  # every epoch, save_top_k=1
        fit(make_trainer([by_steps, default]))
        assert checkpoint_steps(tmp_path / "steps") == [7, 14, 21, 28, 35]
        assert [load_checkpoint(tmp_path / "steps" / str(s)).epoch for s in (7, 14, 21, 28, 35)] == [0, 1, 2, 2, 3]
        assert os.listdir(tmp_path / "default") == ["40"]
        assert default.last_model_path == default.best_model_path == str((tmp_path / "default" / "40").resolve())

    @pytest.mark.parametrize("mode", ["max", "min"])
    def test_save_top_k_keeps_the_k_best_by_the_monitor_plus_the_last(self, tmp_path, mode):
        checkpoint = ModelCheckpoint(tmp_path, monitor="train_loss_epoch", mode=mode, save_top_k=2)
        result = fit(make_trainer([checkpoint], max_epochs=5))
        epoch_means = {
            STEPS_PER_EPOCH * (epoch + 1): float(result.losses[epoch * 10 : (epoch + 1) * 10].mean())
            for epoch in range(5)
        }
        ranked = sorted(epoch_means, key=epoch_means.get, reverse=mode == "max")
        expected = sorted({*ranked[:2], 50})
        if mode == "max":  # the loss falls: the two worst epochs come first, the last is kept too
            assert expected == [10, 20, 50]
        assert checkpoint_steps(tmp_path) == expected
        assert sorted(os.listdir(tmp_path), key=int) == [str(step) for step in expected]
        assert checkpoint.best_model_path == str(tmp_path.resolve() / str(ranked[0]))
        assert checkpoint.best_model_score == pytest.approx(epoch_means[ranked[0]], rel=1e-6)
        assert checkpoint.last_model_path == str(tmp_path.resolve() / "50")


# -- load_checkpoint without a Trainer ---------------------------------------------------------


class TestLoadCheckpoint:
    def test_sample_posterior_at_the_saved_parameters(self, reference):
        saved = load_checkpoint(reference.dirpath / "40")
        guide = linear_svi(NUM_ROWS).guide  # a fresh guide, never run: it sets itself up
        batch = {"x": DATA["x"][:100], "y": DATA["y"][:100]}
        draws = saved.sample_posterior(guide, 1000, jax.random.key(7), **batch)
        assert {name: np.shape(value) for name, value in draws.items()} == {
            "w": (1000,),
            "b": (1000,),
            "mu": (1000, 100),
        }
        for site in ("w", "b"):
            loc, scale = saved.params[f"{site}_auto_loc"], saved.params[f"{site}_auto_scale"]
            values = np.asarray(draws[site])
            assert np.all(np.isfinite(values))
            assert abs(values.mean() - loc) < 5 * scale / np.sqrt(1000), site
            assert values.std() == pytest.approx(scale, rel=0.1), site
        np.testing.assert_allclose(
            np.asarray(draws["mu"]),
            np.asarray(draws["w"])[:, None] * batch["x"] + np.asarray(draws["b"])[:, None],
            rtol=1e-5,
            atol=1e-5,
        )

    def test_a_missing_or_empty_path(self, tmp_path):
        with pytest.raises(CheckpointError, match="does not exist"):
            load_checkpoint(tmp_path / "nowhere")
        with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
            load_checkpoint(tmp_path)


# -- a disk error during an asynchronous save --------------------------------------------------


class BreakTheDirectory(Callback):
    """Once the first checkpoint (end of epoch 0) is complete, replaces the checkpoint directory
    by a regular file, so every later save fails (in orbax's background threads). It acts when
    epoch 1 starts, after every epoch-end hook, whatever the order of the callbacks."""

    def __init__(self, dirpath: Path) -> None:
        self.dirpath = dirpath

    def on_train_epoch_start(self, trainer, progress):
        if progress.epoch != 1:
            return
        first = self.dirpath / str(STEPS_PER_EPOCH)
        deadline = time.monotonic() + 60
        while not ((first / "meta").exists() and (first / "state").exists()):
            assert time.monotonic() < deadline, "the first checkpoint never appeared"
            time.sleep(0.005)
        shutil.rmtree(self.dirpath)
        self.dirpath.write_text("not a directory")


@pytest.fixture(scope="module")
def failed_save(tmp_path_factory):
    dirpath = tmp_path_factory.mktemp("disk_error") / "checkpoints"
    recorder = Recorder()
    with pytest.raises(OSError) as raised:
        fit(make_trainer([ModelCheckpoint(dirpath), BreakTheDirectory(dirpath), recorder]))
    # No orbax thread is left waiting for the failed save's directory (it would keep the
    # process from exiting until orbax's 300 s timeout).
    blocked = [t.name for t in threading.enumerate() if type(t).__name__ == "_SignalingThread" and t.is_alive()]
    return SimpleNamespace(dirpath=dirpath, error=raised.value, recorder=recorder, blocked=blocked)


class TestDiskError:
    def test_a_failed_background_save_raises_from_fit(self, failed_save):
        assert not isinstance(failed_save.error, CheckpointError)
        assert str(failed_save.dirpath) in str(failed_save.error)
        names = hooks(failed_save.recorder)
        assert names[-2:] == [f"exception:{type(failed_save.error).__name__}", "teardown"]
        assert "fit_end" not in names
        assert failed_save.dirpath.read_text() == "not a directory"

    def test_no_save_thread_is_left_waiting_after_fit_raised(self, failed_save):
        assert failed_save.blocked == []

    def test_a_full_disk_raises_once_naming_the_directory_without_orbax_logging_it(self, tmp_path, monkeypatch, capfd):
        def full_disk(self, directory, args):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(NamedArraysHandler, "save", full_disk)  # runs in orbax's own thread
        with pytest.raises(OSError, match=r"saving the checkpoint of step 10 into .* failed: No space left") as raised:
            fit(make_trainer([ModelCheckpoint(tmp_path / "checkpoints")]))
        assert raised.value.errno == errno.ENOSPC
        assert str(tmp_path / "checkpoints") in str(raised.value)
        assert "Traceback" not in capfd.readouterr().err  # orbax's own log of it is dropped


# -- exact resumes, in-process -----------------------------------------------------------------


class TestExactResume:
    @pytest.mark.parametrize(("stop_after_chunks", "step", "epoch"), [(4, 20, 1), (3, 14, 1)], ids=["epoch", "mid"])
    def test_a_stopped_fit_resumed_from_last_equals_the_uninterrupted_fit(
        self, reference, tmp_path, stop_after_chunks, step, epoch
    ):
        dirpath = tmp_path / "checkpoints"
        stopped = fit(make_trainer([Recorder(stop_after_chunks), ChunkCounter(), store(dirpath)]))
        assert stopped.losses.shape == (step,)
        assert checkpoint_steps(dirpath) == [s for s in SAVED_STEPS if s <= step]
        before = snapshot(dirpath)

        # Another trainer key: the checkpoint's keys are the ones that count.
        recorder, counter = Recorder(), ChunkCounter()
        trainer = make_trainer([recorder, counter, store(dirpath)], seed=123)
        result = fit(trainer, ckpt_path="last")

        assert_bitwise_equal(result, reference.result)
        np.testing.assert_array_equal(jax.random.key_data(trainer.rng_key), jax.random.key_data(jax.random.key(0)))
        assert recorder.calls[0] == ("fit_start", step, epoch)
        assert recorder.calls[1] == ("epoch_start", step, step // STEPS_PER_EPOCH)
        # The shared configuration's chunks end where it saves.
        assert [s for hook, s, _ in recorder.calls if hook == "chunk_end"] == [s for s in SAVED_STEPS if s > step]
        assert counter.loaded == (step, step)
        assert counter.chunks == reference.counter.chunks == 9
        assert trainer.state.step == TOTAL_STEPS
        assert checkpoint_steps(dirpath) == SAVED_STEPS
        # The checkpoints that were there are untouched.
        after = snapshot(dirpath)
        assert {path: after.get(path) for path in before} == before

    @pytest.mark.parametrize("form", ["step", "step_dir", "directory"])
    def test_resume_from_a_step_or_a_path(self, reference, stopped_at_20, tmp_path, form):
        dirpath = copy_checkpoints(stopped_at_20, tmp_path / "checkpoints")
        ckpt_path = {"step": 20, "step_dir": dirpath / "20", "directory": str(dirpath)}[form]
        recorder = Recorder()
        with no_checkpoint_warning():  # the same data and optimizer
            result = fit(make_trainer([recorder, store(dirpath)]), ckpt_path=ckpt_path)
        assert recorder.calls[0] == ("fit_start", 20, 1)
        assert_bitwise_equal(result, reference.result)

    def test_resume_from_an_older_step_than_the_newest(self, reference, stopped_at_20, tmp_path):
        dirpath = copy_checkpoints(stopped_at_20, tmp_path / "checkpoints")
        recorder = Recorder()
        result = fit(make_trainer([recorder, store(dirpath)]), ckpt_path=14)
        assert recorder.calls[0] == ("fit_start", 14, 1)
        assert_bitwise_equal(result, reference.result)

    def test_a_checkpoint_at_the_end_of_a_fit_continues_with_more_epochs(self, reference, tmp_path):
        with pytest.warns(RuntimeWarning, match="state for callbacks this fit does not have: \\['ChunkCounter'\\]"):
            result = fit(make_trainer([store(tmp_path)], max_epochs=5), ckpt_path=reference.dirpath / "40")
        assert result.losses.shape == (50,) and np.isfinite(result.losses).all()
        np.testing.assert_array_equal(result.losses[:40], reference.result.losses, strict=True)
        assert checkpoint_steps(tmp_path) == [42, 49, 50]


# -- SIGKILL and other device counts: real processes -------------------------------------------


def start_worker(devices: int, *args) -> subprocess.Popen:
    # One string hash seed in every process, as the aimz-trainer command sets it. The fit's own
    # programs no longer depend on it (step.independent_of_hash_seed orders the ELBO's terms);
    # a model's code that iterates over a set still could.
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        "PYTHONHASHSEED": "0",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "tests.checkpoint_worker", *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_all(processes: dict[str, subprocess.Popen]) -> dict[str, tuple[int, str]]:
    outcome = {}
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=300)
        outcome[name] = (process.returncode, stderr[-3000:])
    return outcome


def load_npz(path: Path) -> SimpleNamespace:
    with np.load(path) as saved:
        params = {name.removeprefix("param_"): saved[name] for name in saved.files if name.startswith("param_")}
        return SimpleNamespace(losses=saved["losses"], params=params, devices=int(saved["devices"]))


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Real processes, two at a time: an uninterrupted 1-device fit, and a 1-device fit
    SIGKILLed once its step-14 checkpoint (mid-epoch) is on disk; then that checkpoint resumed
    on 1 device and, from a copy, on 4 devices (which writes 4-device checkpoints from step 20
    on)."""
    root = tmp_path_factory.mktemp("killed")
    one = root / "one_device"
    first = wait_all(
        {
            "reference": start_worker(1, "--dirpath", root / "reference", "--out", root / "reference.npz"),
            "kill_one": start_worker(1, "--dirpath", one, "--kill-step", 14),
        }
    )
    after_kill = {
        "one_steps": checkpoint_steps(one),
        "one_at_14": load_checkpoint(one / "14") if (one / "14").exists() else None,
    }
    copy_checkpoints(one, root / "on_four_devices")
    second = wait_all(
        {
            "one_on_one": start_worker(1, "--dirpath", one, "--resume", "--out", root / "one_on_one.npz"),
            "one_on_four": start_worker(
                4, "--dirpath", root / "on_four_devices", "--resume", "--out", root / "one_on_four.npz"
            ),
        }
    )
    return SimpleNamespace(root=root, returncodes={**first, **second}, **after_kill)


def resumed(killed, name: str) -> SimpleNamespace:
    returncode, stderr = killed.returncodes[name]
    assert returncode == 0, stderr
    return load_npz(killed.root / f"{name}.npz")


def assert_continues_the_reference(result, reference, checkpoint) -> None:
    """A resume on another device count: the saved history, then the same fit up to float32
    reductions in another order."""
    assert result.losses.shape == (TOTAL_STEPS,) and np.isfinite(result.losses).all()
    np.testing.assert_array_equal(result.losses[: checkpoint.step], checkpoint.losses, strict=True)
    np.testing.assert_allclose(result.losses, reference.losses, rtol=2e-5)
    for name in PARAM_NAMES:
        np.testing.assert_allclose(np.asarray(result.params[name]), reference.params[name], rtol=1e-3, err_msg=name)


@pytest.mark.slow
@pytest.mark.multidevice
class TestKilledProcess:
    def test_the_worker_was_killed_after_its_mid_epoch_checkpoint(self, killed):
        returncode, stderr = killed.returncodes["kill_one"]
        assert returncode == -signal.SIGKILL, stderr
        assert killed.one_steps == [7, 10, 14]
        assert (killed.one_at_14.step, killed.one_at_14.epoch) == (14, 1)
        assert killed.one_at_14.meta["mesh_shape"] == {"data": 1}
        np.testing.assert_array_equal(killed.one_at_14.losses, resumed(killed, "reference").losses[:14], strict=True)

    def test_sigkill_then_resume_equals_the_uninterrupted_fit_bit_for_bit(self, killed):
        reference, result = resumed(killed, "reference"), resumed(killed, "one_on_one")
        assert reference.devices == result.devices == 1
        assert reference.losses.shape == (TOTAL_STEPS,)
        assert_bitwise_equal(result, reference)
        assert checkpoint_steps(killed.root / "one_device") == SAVED_STEPS

    def test_a_one_device_checkpoint_resumed_on_four_devices(self, killed):
        result = resumed(killed, "one_on_four")
        assert result.devices == 4
        assert_continues_the_reference(result, resumed(killed, "reference"), killed.one_at_14)
        assert load_checkpoint(killed.root / "on_four_devices" / "20").meta["mesh_shape"] == {"data": 4}

    def test_a_four_device_checkpoint_resumed_on_one_device(self, killed, tmp_path):
        saved = load_checkpoint(killed.root / "on_four_devices" / "20")
        assert saved.meta["mesh_shape"] == {"data": 4}
        trainer = make_trainer([store(tmp_path)], devices=1)
        result = fit(trainer, ckpt_path=saved.path)
        assert trainer.mesh.size == 1
        assert_continues_the_reference(result, resumed(killed, "reference"), saved)
        assert checkpoint_steps(tmp_path) == [21, 28, 30, 35, 40]


# -- interrupted saves, bad checkpoints, bad requests ------------------------------------------


def other_model_svi(kind: str) -> SVI:
    def model(x, y=None):
        if kind == "extra_site":
            w = numpyro.sample("w", dist.Normal(0.0, 1.0))
            c = numpyro.sample("c", dist.Normal(0.0, 1.0))
        else:  # "other_shape"
            w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1)).sum()
            c = 0.0
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", NUM_ROWS, subsample_size=x.shape[0]):
            numpyro.sample("y", dist.Normal(w * x + b + c, NOISE), obs=y)

    return SVI(model, AutoNormal(model), adam(0.05), Trace_ELBO())


DAMAGES = {
    "no_state": "it has no 'state' item",  # e.g. a deletion cut short
    "meta": "its 'meta' item is damaged",
    "state": "its 'state' item is damaged",
}


def damage(step_dir: Path, kind: str) -> None:
    if kind == "no_state":
        shutil.rmtree(step_dir / "state")
        return
    files = [path for path in (step_dir / kind).rglob("*") if path.is_file()]
    assert files
    for path in files:
        path.write_bytes(b"\x00 not what orbax wrote {")


class TestBadCheckpoints:
    def test_an_interrupted_save_is_never_resumed(self, reference, stopped_at_20, tmp_path):
        dirpath = copy_checkpoints(stopped_at_20, tmp_path / "checkpoints")
        # What a save cut short leaves: orbax's temporary directory (0.12 names it
        # "<step>.orbax-checkpoint-tmp"; others add a suffix). Not a checkpoint: no warning.
        for name in ("30.orbax-checkpoint-tmp", "30.orbax-checkpoint-tmp-1234"):
            shutil.copytree(dirpath / "20" / "meta", dirpath / name / "meta")
            (dirpath / name / "state").mkdir()

        assert checkpoint_steps(dirpath) == [7, 10, 14, 20]
        recorder = Recorder()
        with no_checkpoint_warning():
            assert resolve_checkpoint(dirpath) == dirpath / "20"
            assert load_checkpoint(dirpath).step == 20
            result = fit(make_trainer([recorder, store(dirpath)]), ckpt_path="last")
        assert recorder.calls[0] == ("fit_start", 20, 1)
        assert_bitwise_equal(result, reference.result)

    @pytest.mark.parametrize("kind", list(DAMAGES))
    def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning_naming_both(
        self, reference, stopped_at_20, tmp_path, kind
    ):
        # Issue 16: the newest checkpoint, damaged, was skipped for the previous one without a word.
        dirpath = copy_checkpoints(stopped_at_20, tmp_path / "checkpoints")
        damage(dirpath / "20", kind)
        names_both = (
            re.escape(f"{str(dirpath / '20')!r} ({DAMAGES[kind]}")
            + "(?s:.*)"
            + re.escape(f"using {str(dirpath / '14')!r} (step 14)")
        )
        with pytest.warns(CheckpointWarning, match=names_both):
            assert load_checkpoint(dirpath).step == 14
        recorder = Recorder()
        with pytest.warns(CheckpointWarning, match=names_both):
            result = fit(make_trainer([recorder, store(dirpath)]), ckpt_path="last")
        assert recorder.calls[0] == ("fit_start", 14, 1)
        assert_bitwise_equal(result, reference.result)
        # The resumed fit wrote step 20 again, in place of the damaged directory.
        assert checkpoint_steps(dirpath) == SAVED_STEPS
        with no_checkpoint_warning():
            np.testing.assert_array_equal(load_checkpoint(dirpath / "20").losses, result.losses[:20], strict=True)

    def test_when_every_checkpoint_is_damaged_last_is_refused_and_names_them(self, stopped_at_20, tmp_path):
        dirpath = copy_checkpoints(stopped_at_20, tmp_path / "checkpoints")
        for step in (7, 10, 14, 20):
            damage(dirpath / str(step), "no_state")
        recorder = Recorder()
        with pytest.raises(
            CheckpointError, match=f"every checkpoint in {re.escape(repr(str(dirpath)))} is damaged"
        ) as raised:
            fit(make_trainer([recorder, store(dirpath)]), ckpt_path="last")
        assert all(str(dirpath / str(step)) in str(raised.value) for step in (7, 10, 14, 20))
        assert recorder.calls == []

    @pytest.mark.parametrize("asked_by", ["step", "path"])
    @pytest.mark.parametrize("kind", list(DAMAGES))
    def test_a_damaged_checkpoint_asked_for_by_its_step_or_path_is_refused(
        self, stopped_at_20, tmp_path, kind, asked_by
    ):
        dirpath = copy_checkpoints(stopped_at_20, tmp_path / "checkpoints")
        damage(dirpath / "20", kind)
        before = snapshot(dirpath)
        recorder = Recorder()
        refusal = re.escape(f"the checkpoint {str(dirpath / '20')!r} cannot be used: {DAMAGES[kind]}")
        with pytest.raises(CheckpointError, match=refusal):
            fit(make_trainer([recorder, store(dirpath)]), ckpt_path=20 if asked_by == "step" else dirpath / "20")
        assert recorder.calls == []
        assert snapshot(dirpath) == before
        if asked_by == "path":
            with pytest.raises(CheckpointError, match=refusal):
                load_checkpoint(dirpath / "20")

    @pytest.mark.parametrize(
        ("kind", "expected"),
        [
            ("extra_site", ["c_auto_loc: not in the checkpoint", "c_auto_scale: not in the checkpoint"]),
            (
                "other_shape",
                [
                    "w_auto_loc: [] float32 in the checkpoint, [2] float32 now",
                    "w_auto_scale: [] float32 in the checkpoint, [2] float32 now",
                ],
            ),
        ],
    )
    def test_another_model_fails_before_training_and_lists_the_sites(self, stopped_at_20, tmp_path, kind, expected):
        dirpath = copy_checkpoints(stopped_at_20, tmp_path / "checkpoints")
        before = snapshot(dirpath)
        recorder = Recorder()
        with pytest.raises(CheckpointError, match="different model") as raised:
            fit(make_trainer([recorder, store(dirpath)]), svi=other_model_svi(kind), ckpt_path="last")
        message = str(raised.value)
        for difference in expected:
            assert difference in message
        assert "b_auto_loc" not in message  # only the differing sites
        assert "fit_start" not in hooks(recorder) and "chunk_end" not in hooks(recorder)
        assert snapshot(dirpath) == before

    def test_another_optimizer_fails_before_training(self, stopped_at_20, tmp_path):
        dirpath = copy_checkpoints(stopped_at_20, tmp_path / "checkpoints")
        before = snapshot(dirpath)
        recorder = Recorder()
        model = linear_svi(NUM_ROWS).model
        svi = SVI(model, AutoNormal(model), sgd(0.01), Trace_ELBO())  # no Adam moments
        with pytest.raises(CheckpointError, match="another optimizer"):
            fit(make_trainer([recorder, store(dirpath)]), svi=svi, ckpt_path="last")
        assert "fit_start" not in hooks(recorder)
        assert snapshot(dirpath) == before

    def test_resuming_with_other_data_of_the_same_shape_warns(self, stopped_at_20, tmp_path):
        # Issue 16: a resume with different data of the same shape continued silently.
        dirpath = copy_checkpoints(stopped_at_20, tmp_path / "checkpoints")
        other = linear_data(NUM_ROWS, seed=1)
        digests = f"is {data_digest(DATA)} in the checkpoint, {data_digest(other)} now"
        trainer = make_trainer([store(dirpath)], max_epochs=3)
        with pytest.warns(CheckpointWarning, match="other training data.*" + re.escape(digests)) as caught:
            result = trainer.fit(linear_svi(NUM_ROWS), other, batch_size=BATCH_SIZE, ckpt_path="last")
        assert [str(w.message) for w in caught if "optimizer" in str(w.message)] == []
        assert result.losses.shape == (30,)

    def test_resuming_with_another_learning_rate_warns(self, stopped_at_20, tmp_path):
        # Issue 16: a resume with a different learning rate continued silently.
        dirpath = copy_checkpoints(stopped_at_20, tmp_path / "checkpoints")
        saved, now = (optimizer_probe(linear_svi(NUM_ROWS, rate).optim) for rate in (0.05, 0.02))
        probes = f"are {saved} in the checkpoint, {now} now"
        with pytest.warns(CheckpointWarning, match="such as the learning rate.*" + re.escape(probes)) as caught:
            fit(make_trainer([store(dirpath)], max_epochs=3), svi=linear_svi(NUM_ROWS, 0.02), ckpt_path="last")
        assert [str(w.message) for w in caught if "training data" in str(w.message)] == []

    def test_a_missing_path_or_an_empty_directory(self, tmp_path):
        for ckpt_path, message in [
            (tmp_path / "nowhere", "does not exist"),
            (tmp_path, "holds no complete checkpoint"),
        ]:
            recorder = Recorder()
            with pytest.raises(CheckpointError, match=message) as raised:
                fit(make_trainer([recorder]), ckpt_path=ckpt_path)
            assert isinstance(raised.value, OSError)
            assert recorder.calls == []
        assert os.listdir(tmp_path) == []

    @pytest.mark.parametrize(
        ("case", "error", "message"),
        [
            ("last_without_a_store", CheckpointError, "has none: add ModelCheckpoint"),
            ("missing_step", CheckpointError, r"no checkpoint of that step; the steps saved are \[7, 10, 14, 20\]"),
            ("fit_already_done", CheckpointError, "is at step 20, and this fit ends at step 20: raise max_epochs"),
            ("other_batch_size", CheckpointError, "batch_size: 100 in the checkpoint, 50 now"),
            ("not_a_path", ConfigurationError, "ckpt_path must be 'last', a step"),
        ],
    )
    def test_requests_that_cannot_resume(self, stopped_at_20, tmp_path, case, error, message):
        dirpath = copy_checkpoints(stopped_at_20, tmp_path / "checkpoints")
        before = snapshot(dirpath)
        recorder = Recorder()
        callbacks = {"last_without_a_store": [recorder]}.get(case, [recorder, store(dirpath)])
        trainer = make_trainer(callbacks, max_epochs=2 if case == "fit_already_done" else MAX_EPOCHS)
        ckpt_path = {"missing_step": 15, "not_a_path": 1.5}.get(case, "last")
        with pytest.raises(error, match=message):
            fit(trainer, ckpt_path=ckpt_path, batch_size=50 if case == "other_batch_size" else BATCH_SIZE)
        assert recorder.calls == []
        assert snapshot(dirpath) == before


def test_last_with_nothing_saved_yet_starts_the_fit_with_a_warning(tmp_path):
    """A requeued job runs one script: its first run has no checkpoint to continue."""
    fresh = fit(make_trainer([store(tmp_path / "a")], max_epochs=1))
    with pytest.warns(CheckpointWarning, match="holds no checkpoint yet: the fit starts from the beginning"):
        started = fit(make_trainer([store(tmp_path / "b")], max_epochs=1), ckpt_path="last")
    np.testing.assert_array_equal(started.losses, fresh.losses)
    assert checkpoint_steps(tmp_path / "b") == checkpoint_steps(tmp_path / "a") != []


# -- callback state across a resume ------------------------------------------------------------


def early_stopping() -> EarlyStopping:
    # The epoch loss falls, so with mode="max" every check after the first is "no improvement":
    # the fit stops at the end of epoch 3 (step 40) of 6.
    return EarlyStopping("train_loss_epoch", mode="max", patience=3)


@pytest.fixture(scope="module")
def early_stopped(tmp_path_factory):
    stopper = early_stopping()
    checkpoint = store(tmp_path_factory.mktemp("es") / "checkpoints", every_n_train_steps=None)
    result = fit(make_trainer([stopper, checkpoint], max_epochs=6))
    assert result.losses.shape == (40,)
    assert (stopper.wait_count, stopper.stopped_epoch) == (3, 3)
    return SimpleNamespace(result=result, stopper=stopper)


class TestCallbackState:
    @pytest.mark.parametrize(
        "order",
        [
            "stopper_first",
            "checkpoint_first",
        ],
    )
    def test_early_stopping_continues_across_a_resume(self, early_stopped, tmp_path, order):
        def callbacks(stopper):
            checkpoint = store(tmp_path, every_n_train_steps=None)
            return [stopper, checkpoint] if order == "stopper_first" else [checkpoint, stopper]

        first = early_stopping()
        fit(make_trainer([Recorder(stop_after_chunks=2), *callbacks(first)], max_epochs=6))
        assert first.wait_count == 1

        stopper = early_stopping()
        result = fit(make_trainer(callbacks(stopper), max_epochs=6), ckpt_path="last")
        assert_bitwise_equal(result, early_stopped.result)  # stopped at step 40 as well
        assert stopper.wait_count == 3 and stopper.stopped_epoch == 3
        assert stopper.best_score == early_stopped.stopper.best_score
        assert load_checkpoint(tmp_path / "20").meta["callbacks"][first.state_key]["wait_count"] == 1

    def test_model_checkpoint_best_and_last_continue_across_a_resume(self, tmp_path):
        def checkpoint(dirpath):
            return ModelCheckpoint(dirpath, every_n_epochs=2, monitor="train_loss_epoch", save_top_k=-1)

        uninterrupted = checkpoint(tmp_path / "reference")
        fit(make_trainer([uninterrupted], max_epochs=3))
        fit(make_trainer([Recorder(stop_after_chunks=2), checkpoint(tmp_path / "resumed")], max_epochs=3))
        resumed_store = checkpoint(tmp_path / "resumed")
        fit(make_trainer([resumed_store], max_epochs=3), ckpt_path="last")  # epoch 3 saves nothing

        def relative(path):
            return None if path is None else Path(path).name

        assert relative(resumed_store.best_model_path) == relative(uninterrupted.best_model_path) == "20"
        assert relative(resumed_store.last_model_path) == relative(uninterrupted.last_model_path) == "20"
        assert resumed_store.best_model_score == uninterrupted.best_model_score

    @pytest.mark.parametrize("mode", ["min", "max"])
    def test_save_top_k_holds_across_a_resume(self, tmp_path, mode):
        # Issue 16: after a resume with save_top_k=2, four checkpoints remained (mode="min": the
        # two kept before the resume stayed, unranked, beside the two best after it).
        def checkpoint():
            return ModelCheckpoint(tmp_path, monitor="train_loss_epoch", mode=mode, save_top_k=2)

        fit(make_trainer([Recorder(stop_after_chunks=3), checkpoint()], max_epochs=6))  # epochs 0-2
        assert checkpoint_steps(tmp_path) == ([20, 30] if mode == "min" else [10, 20, 30])
        resumed_store = checkpoint()
        result = fit(make_trainer([resumed_store], max_epochs=6), ckpt_path="last")
        epoch_means = {10 * (e + 1): float(result.losses[e * 10 : (e + 1) * 10].mean()) for e in range(6)}
        ranked = sorted(epoch_means, key=epoch_means.get, reverse=mode == "max")
        assert checkpoint_steps(tmp_path) == sorted({*ranked[:2], 60})  # the two best and the last
        assert resumed_store.best_model_path == str(tmp_path.resolve() / str(ranked[0]))


# -- the optimizer probe -----------------------------------------------------------------------


def test_the_optimizer_probe_tells_numpyro_and_optax_settings_apart():
    numpyro_probes = [optimizer_probe(o) for o in (Adam(0.01), Adam(0.02), Adam(0.01, b1=0.8), SGD(0.01))]
    optax_settings = [adam(0.01), adam(0.02), adam(0.01, b1=0.8), sgd(0.01, momentum=0.9), sgd(0.01, momentum=0.8)]
    optax_probes = [optimizer_probe(optax_to_numpyro(o)) for o in optax_settings]
    for probes in (numpyro_probes, optax_probes):
        assert all(len(probe) == 4 for probe in probes)
        assert len({tuple(probe) for probe in probes}) == len(probes)
    assert optimizer_probe(Adam(0.01)) == numpyro_probes[0]  # the same settings: the same probe
    # One that needs the model's own parameter tree cannot move the probe: nothing to compare.
    assert optimizer_probe(optax_to_numpyro(multi_transform({"a": adam(0.01)}, {"w": "a"}))) is None


# -- TensorBoard across a resume ---------------------------------------------------------------


def test_tensorboard_events_after_a_resume_are_those_of_the_resumed_fit(tmp_path):
    log_dir, dirpath = tmp_path / "tb", tmp_path / "checkpoints"

    def callbacks(*extra):
        checkpoint = ModelCheckpoint(dirpath, save_top_k=-1)
        return [TensorBoardLogger(log_dir, log_histograms=False), *extra, checkpoint]

    # The first fit logs up to step 24 (chunks of 5 steps) and saves at 10 and 20.
    first = fit(make_trainer(callbacks(Recorder(stop_after_chunks=5)), log_every_n_steps=5))
    assert first.losses.shape == (25,) and checkpoint_steps(dirpath) == [10, 20]
    # Event files are named by the second and read in name order: open the next one a second later.
    time.sleep(1.05 - time.time() % 1.0)
    # Resumed with another learning rate, so its losses from step 20 on differ from the first fit's.
    with pytest.warns(CheckpointWarning, match="another optimizer setting"):
        result = fit(make_trainer(callbacks(), log_every_n_steps=5), svi=linear_svi(NUM_ROWS, 0.02), ckpt_path="last")
    np.testing.assert_array_equal(result.losses[:20], first.losses[:20], strict=True)
    assert result.losses[24] != first.losses[24]

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    logged = events.Scalars("train_loss")
    steps = [event.step for event in logged]
    assert steps == list(range(4, TOTAL_STEPS, 5))  # once each: the first fit's 24 is gone
    np.testing.assert_array_equal(np.float32([event.value for event in logged]), result.losses[steps], strict=True)
    assert [event.step for event in events.Scalars("train_loss_epoch")] == [9, 19, 29, 39]
    epoch_means = [float(result.losses[e * 10 : (e + 1) * 10].mean()) for e in range(MAX_EPOCHS)]
    np.testing.assert_allclose([event.value for event in events.Scalars("train_loss_epoch")], epoch_means, rtol=1e-6)


def test_a_checkpoint_holding_the_digest_of_the_older_sample_is_not_compared_on_it():
    # Before the sample was runs of rows, checkpoints recorded "data_digest" of rows spread one
    # by one: not the digest a fit computes now, so not compared (the resume goes on).
    current = fit_fingerprint(DATA, linear_svi(NUM_ROWS).optim)
    older = {"data_digest": "0123456789abcdef", "optimizer_probe": current["optimizer_probe"]}
    assert fingerprint_differences(older, current) == []
    other = {**older, "sampled_rows_digest": "0123456789abcdef"}
    assert [difference.split(" (")[0] for difference in fingerprint_differences(other, current)] == [
        "other training data"
    ]
