"""Preemption and saves on exception: SIGTERM or SIGUSR1 stops a fit at a chunk boundary with a
checkpoint and ends it with FitPreempted (exit status 128 + signal), and a new fit with
``ckpt_path="last"`` continues it bit for bit; ``ModelCheckpoint(save_on_exception=True)`` saves the
last consistent state when the fit raises; the signal handlers are put back (Python's and the
process's own) and a signal the fit did not stop on is handed on; real processes (one, and two
over loopback with only one of them signalled) exit with the status and resume bit for bit.

The fits are those of ``tests/preemption_worker.py``: 10 steps an epoch, 4 epochs, chunks ending at
steps 3, 6, 9, 10, 12, 15, 18, 20, ..., a checkpoint at every epoch end.
"""

from __future__ import annotations

import ctypes
import faulthandler
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from aimz_trainer import (
    Callback,
    CheckpointWarning,
    ConfigurationError,
    FitPreempted,
    ModelCheckpoint,
    NonFiniteLossError,
    Trainer,
    distributed,
    load_checkpoint,
)
from aimz_trainer.callbacks import model_checkpoint
from aimz_trainer.checkpoint import checkpoint_steps, resolve_checkpoint

from .conftest import Recorder, linear_data, linear_svi
from .preemption_worker import BATCH_SIZE, LOG_EVERY_N_STEPS, MAX_EPOCHS, NUM_ROWS
from .test_checkpoint import assert_bitwise_equal

ROOT = Path(__file__).resolve().parent.parent
TOTAL_STEPS = 40
TIMEOUT_S = 240


class ChunkCounter(Callback):
    """A callback with state: counts the chunks it has seen."""

    def __init__(self) -> None:
        self.chunks = 0

    def on_train_chunk_end(self, fit, progress, losses, steps):
        self.chunks += 1

    def state_dict(self):
        return {"chunks": self.chunks}

    def load_state_dict(self, state):
        self.chunks = state["chunks"]


class At(Callback):
    """Runs ``action`` in the hook ``hook`` at step ``step`` (``None``: every time)."""

    def __init__(self, hook: str, action, step: int | None = None) -> None:
        self.hook, self.action, self.step = hook, action, step

    def _maybe(self, hook, progress):
        if hook == self.hook and (self.step is None or progress.step == self.step):
            self.action()

    def on_fit_start(self, fit, progress):
        self._maybe("fit_start", progress)

    def on_train_epoch_start(self, fit, progress):
        self._maybe("epoch_start", progress)

    def on_train_chunk_end(self, fit, progress, losses, steps):
        self._maybe("chunk_end", progress)

    def on_fit_end(self, fit, progress):
        self._maybe("fit_end", progress)


def send(signum: int):
    """An action sending ``signum`` to this process (its handler runs before the next line)."""
    return lambda: signal.raise_signal(signum)


def interrupt():
    raise KeyboardInterrupt


def fail():
    raise RuntimeError("on purpose")


def make_trainer(callbacks=()) -> Trainer:
    return Trainer(
        max_epochs=MAX_EPOCHS,
        rng_key=jax.random.key(0),
        enable_progress_bar=False,
        callbacks=list(callbacks),
        log_every_n_steps=LOG_EVERY_N_STEPS,
    )


def fit(trainer: Trainer, *, ckpt_path=None, data=None, **kwargs):
    data = linear_data(NUM_ROWS) if data is None else data
    return trainer.fit(linear_svi(NUM_ROWS), data, batch_size=BATCH_SIZE, ckpt_path=ckpt_path, **kwargs)


def store(dirpath: Path, **kwargs) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath, **({"every_n_epochs": 1, "save_top_k": -1} | kwargs))


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted fit, with a stateful callback."""
    counter = ChunkCounter()
    result = fit(make_trainer([counter]))
    assert result.losses.shape == (TOTAL_STEPS,)
    return SimpleNamespace(result=result, chunks=counter.chunks)


# -- a signal in the fit's own process -----------------------------------------------------------


# Where the signal comes, what the fit saves: SIGTERM in the hooks of the chunk ending at step 15
# (mid-epoch; the chunk after it is in flight and is dropped), beside a checkpoint at every epoch
# end; SIGUSR1 as epoch 2 starts (the loop's other place to stop), with no scheduled checkpoint:
# the fit saves step 20 as the start of epoch 2, like a mid-epoch checkpoint 0 steps into it.
PREEMPTIONS = {
    "SIGTERM": SimpleNamespace(
        signum=signal.SIGTERM, hook="chunk_end", step=15, epoch=1, chunks=6, every_n_epochs=1, before=[10]
    ),
    "SIGUSR1": SimpleNamespace(
        signum=signal.SIGUSR1, hook="epoch_start", step=20, epoch=2, chunks=8, every_n_epochs=None, before=[]
    ),
}


@pytest.mark.parametrize("case", PREEMPTIONS.values(), ids=PREEMPTIONS.keys())
def test_a_signal_stops_at_the_boundary_saves_and_the_fit_resumes_bit_for_bit(reference, tmp_path, case):
    recorder, counter = Recorder(), ChunkCounter()
    callbacks = [recorder, counter, At(case.hook, send(case.signum), step=case.step)]
    with pytest.raises(FitPreempted) as raised:
        fit(make_trainer([*callbacks, store(tmp_path, every_n_epochs=case.every_n_epochs)]))
    preempted = raised.value
    assert (preempted.signal, preempted.code, preempted.step) == (case.signum, 128 + case.signum, case.step)
    assert preempted.checkpoint == tmp_path / str(case.step)
    assert not isinstance(preempted, Exception) and isinstance(preempted, SystemExit)
    # Complete when fit raised.
    assert checkpoint_steps(tmp_path) == [*case.before, case.step]
    saved = load_checkpoint(preempted.checkpoint)
    assert (saved.step, saved.epoch, saved.meta["loader_state"]["next_index"]) == (case.step, case.epoch, case.chunks)
    assert saved.meta["callbacks"]["ChunkCounter"] == {"chunks": case.chunks}
    np.testing.assert_array_equal(saved.losses, reference.result.losses[: case.step], strict=True)
    # on_fit_end as after any stop, then the exception, then teardown; no step after the stop.
    hooks = [call[0] for call in recorder.calls]
    assert hooks[-3:] == ["fit_end", "exception:FitPreempted", "teardown"]
    assert max(step for _, step, _ in recorder.calls) == case.step

    counter = ChunkCounter()
    result = fit(make_trainer([counter, store(tmp_path, every_n_epochs=case.every_n_epochs)]), ckpt_path="last")
    assert_bitwise_equal(result, reference.result)
    assert counter.chunks == reference.chunks


def test_without_a_model_checkpoint_the_fit_is_preempted_without_a_checkpoint():
    with pytest.raises(FitPreempted) as raised:
        fit(make_trainer([At("chunk_end", send(signal.SIGTERM), step=6)]))
    assert (raised.value.step, raised.value.checkpoint) == (6, None)
    assert "SIGTERM at step 6 without a checkpoint" in str(raised.value)


def test_preempted_before_its_first_chunk_a_fit_saves_nothing(tmp_path):
    with pytest.raises(FitPreempted) as raised:
        fit(make_trainer([At("fit_start", send(signal.SIGTERM)), store(tmp_path)]))
    assert (raised.value.step, raised.value.checkpoint) == (0, None)
    assert checkpoint_steps(tmp_path) == []


def test_a_resumed_fit_preempted_at_once_points_to_its_checkpoint(tmp_path):
    with pytest.raises(FitPreempted):
        fit(make_trainer([At("chunk_end", send(signal.SIGTERM), step=12), store(tmp_path)]))
    with pytest.raises(FitPreempted) as raised:
        fit(make_trainer([At("fit_start", send(signal.SIGTERM)), store(tmp_path)]), ckpt_path="last")
    assert (raised.value.step, raised.value.checkpoint) == (12, tmp_path / "12")
    assert checkpoint_steps(tmp_path) == [10, 12]


def test_a_checkpoint_ranked_by_a_metric_not_logged_yet_is_saved_unranked(tmp_path):
    data = linear_data(NUM_ROWS + 200, seed=1)
    train = {name: values[:NUM_ROWS] for name, values in data.items()}
    held_out = {name: values[NUM_ROWS:] for name, values in data.items()}
    checkpoint = store(tmp_path, monitor="val_loss", save_top_k=1)
    with pytest.raises(FitPreempted) as raised:  # before the first validation (at the first epoch's end)
        fit(make_trainer([At("chunk_end", send(signal.SIGTERM), step=6), checkpoint]), data=train, val_data=held_out)
    assert raised.value.checkpoint == tmp_path / "6"
    assert checkpoint.last_model_score is None and checkpoint.best_model_score is None
    assert checkpoint_steps(tmp_path) == [6]


def test_a_signal_after_the_last_boundary_is_handed_on_to_the_handler_before(reference):
    seen: list[int] = []
    before = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        # Nothing left to stop: the fit finishes and the process gets the signal as without it.
        result = fit(make_trainer([At("fit_end", send(signal.SIGUSR1))]))
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert seen == [signal.SIGUSR1]
    assert_bitwise_equal(result, reference.result)


# -- the handlers --------------------------------------------------------------------------------


def native_handler(signum: int) -> int:
    """The address of the process's own handler of ``signum`` (``struct sigaction``'s first field)."""
    buffer = ctypes.create_string_buffer(1024)
    assert ctypes.CDLL(None).sigaction(signum, None, buffer) == 0
    return ctypes.cast(buffer, ctypes.POINTER(ctypes.c_void_p))[0] or 0


def test_the_handlers_are_put_back_after_a_fit_that_ends_or_raises():
    def mine(signum, frame):
        pass

    during = []
    previous = {signum: signal.signal(signum, mine) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        look = At("chunk_end", lambda: during.append(signal.getsignal(signal.SIGTERM)), step=3)
        fit(make_trainer([look]))
        with pytest.raises(RuntimeError, match="on purpose"):
            fit(make_trainer([At("chunk_end", fail, step=3)]))
        assert signal.getsignal(signal.SIGTERM) is mine and signal.getsignal(signal.SIGUSR1) is mine
        assert during and during[0] is not mine  # the fit's own, while it ran
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_a_handler_installed_outside_python_is_put_back():
    # faulthandler installs a C handler, which Python's signal.getsignal does not know of: JAX's
    # SIGTERM handler in a multi-process run is one too.
    faulthandler.register(signal.SIGUSR1)
    try:
        before = native_handler(signal.SIGUSR1)
        fit(make_trainer([At("chunk_end", lambda: None, step=3)]))
        assert native_handler(signal.SIGUSR1) == before
    finally:
        faulthandler.unregister(signal.SIGUSR1)


def test_an_ignored_signal_stays_ignored(reference):
    before = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        result = fit(make_trainer([At("chunk_end", send(signal.SIGUSR1), step=15)]))
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert_bitwise_equal(result, reference.result)


def test_a_fit_outside_the_main_thread_installs_no_handler(reference):
    seen, outcome = [], {}
    look = At("chunk_end", lambda: seen.append(signal.getsignal(signal.SIGTERM)), step=3)
    thread = threading.Thread(target=lambda: outcome.update(result=fit(make_trainer([look]))))
    before = signal.getsignal(signal.SIGTERM)
    thread.start()
    thread.join(timeout=TIMEOUT_S)
    assert seen == [before]
    assert_bitwise_equal(outcome["result"], reference.result)


# -- saves on exception --------------------------------------------------------------------------


def test_save_on_exception_saves_the_last_boundary_not_the_state_at_the_interrupt(reference, tmp_path):
    # The KeyboardInterrupt comes in the hooks of the chunk ending at step 15, after the fit took
    # that chunk's results and before the ChunkCounter after it counted the chunk: that moment is
    # no state to continue from. The chunk before it, ending at step 12, is.
    counter = ChunkCounter()
    callbacks = [At("chunk_end", interrupt, step=15), counter, store(tmp_path, save_on_exception=True)]
    with pytest.raises(KeyboardInterrupt):
        fit(make_trainer(callbacks))
    assert counter.chunks == 5  # it did not see the chunk ending at step 15
    assert checkpoint_steps(tmp_path) == [10, 12]
    saved = load_checkpoint(tmp_path / "12")
    assert (saved.step, saved.meta["loader_state"]["next_index"]) == (12, 5)
    assert saved.meta["callbacks"]["ChunkCounter"] == {"chunks": 5}
    assert saved.meta["callbacks"][callbacks[-1].state_key]["last_model_path"] == str(tmp_path / "12")
    np.testing.assert_array_equal(saved.losses, reference.result.losses[:12], strict=True)

    counter = ChunkCounter()
    result = fit(make_trainer([counter, store(tmp_path)]), ckpt_path="last")
    assert_bitwise_equal(result, reference.result)
    assert counter.chunks == reference.chunks


def test_without_save_on_exception_an_interrupt_saves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        fit(make_trainer([At("chunk_end", interrupt, step=15), store(tmp_path)]))
    assert checkpoint_steps(tmp_path) == [10]


def test_a_non_finite_loss_saves_the_chunk_before_it_and_the_resume_meets_it_again(tmp_path):
    data = linear_data(NUM_ROWS)
    # Finite, but its squared error overflows float32: unshuffled, row 550 is in the batch of
    # step 5 (in the chunk [3, 6)), whose loss is inf.
    data["x"][550] = 1e30
    with pytest.raises(NonFiniteLossError) as raised:
        fit(make_trainer([store(tmp_path, save_on_exception=True)]), data=data, shuffle=False)
    assert raised.value.step == 5
    assert checkpoint_steps(tmp_path) == [3]
    trainer = make_trainer([store(tmp_path)])
    with pytest.raises(NonFiniteLossError) as again:
        fit(trainer, data=data, shuffle=False, ckpt_path="last")
    assert again.value.step == 5
    assert again.value.loss == raised.value.loss == np.inf
    assert trainer.state.step == 5  # trainer.state still holds the state from before the bad step


def test_save_on_exception_must_be_a_bool(tmp_path):
    with pytest.raises(ConfigurationError, match="save_on_exception must be"):
        ModelCheckpoint(tmp_path, save_on_exception="yes")


def test_in_a_multi_process_fit_only_an_exception_of_every_process_is_saved(tmp_path, monkeypatch):
    def interrupt_as_if_one_of_two_processes():
        # What ModelCheckpoint sees of JAX from here on: a run of two processes.
        monkeypatch.setattr(model_checkpoint, "jax", SimpleNamespace(process_count=lambda: 2))
        raise KeyboardInterrupt

    checkpoint = store(tmp_path, save_on_exception=True)
    with pytest.raises(KeyboardInterrupt), pytest.warns(CheckpointWarning, match="did not save step 12: the Keyboard"):
        fit(make_trainer([At("chunk_end", interrupt_as_if_one_of_two_processes, step=15), checkpoint]))
    assert checkpoint_steps(tmp_path) == [10]


# -- real processes ------------------------------------------------------------------------------


def start(directory: Path, *args: str, name: str, num_processes: int = 1) -> list[subprocess.Popen]:
    """``tests.preemption_worker`` as ``num_processes`` processes of one run (stderr to a file)."""
    port = distributed.free_port()
    processes = []
    for rank in range(num_processes):
        env = {
            **os.environ,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "JAX_PLATFORMS": "cpu",
            "PYTHONHASHSEED": "0",  # the same loss bits in every process (see test_checkpoint.start_worker)
        }
        if num_processes > 1:
            env.update({
                distributed.ENV_ADDRESS: f"127.0.0.1:{port}",
                distributed.ENV_NUM_PROCESSES: str(num_processes),
                distributed.ENV_PROCESS_ID: str(rank),
            })  # fmt: skip
        with open(directory.parent / f"{name}.{rank}.stderr", "w") as stderr:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tests.preemption_worker", str(directory), *args],
                    cwd=ROOT,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    text=True,
                )
            )
    return processes


def wait_until_holding(process: subprocess.Popen, stderr: Path) -> None:
    for line in process.stdout:
        if line.startswith("holding"):
            return
    pytest.fail(f"the worker ended before holding for the signal: {stderr.read_text()[-3000:]}")


def finish(processes: list[subprocess.Popen], name: str, directory: Path) -> list[SimpleNamespace]:
    outcomes = []
    for rank, process in enumerate(processes):
        try:
            process.wait(timeout=TIMEOUT_S)  # its stdout is a few lines: the pipe never fills
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            pytest.fail(f"a worker hung for {TIMEOUT_S} s")
        out = process.stdout.read()
        process.stdout.close()
        reports = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        stderr = (directory.parent / f"{name}.{rank}.stderr").read_text()
        outcomes.append(
            SimpleNamespace(code=process.returncode, report=reports[-1] if reports else None, stderr=stderr)
        )
    return outcomes


def load_result(out: Path, rank: int = 0) -> SimpleNamespace:
    with np.load(f"{out}.{rank}.npz") as saved:
        params = {name.removeprefix("param_"): saved[name] for name in saved.files if name.startswith("param_")}
        return SimpleNamespace(losses=saved["losses"], params=params)


def preempt(directory: Path, signum: int, *, name: str, num_processes: int = 1, target: int = 0):
    """A worker run held at step 15 in process ``target``, which then gets ``signum`` (the others
    get nothing)."""
    processes = start(
        directory, "--hold-at", "15", "--hold-process", str(target), name=name, num_processes=num_processes
    )
    wait_until_holding(processes[target], directory.parent / f"{name}.{target}.stderr")
    os.kill(processes[target].pid, signum)
    return processes


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """An uninterrupted worker beside two preempted ones (SIGTERM, SIGUSR1), and the SIGTERM one
    resumed from ``"last"`` as soon as it has exited."""
    root = tmp_path_factory.mktemp("single")
    reference = start(root / "reference", "--out", str(root / "reference"), name="reference")
    sigterm = preempt(root / "sigterm", signal.SIGTERM, name="sigterm")
    sigusr1 = preempt(root / "sigusr1", signal.SIGUSR1, name="sigusr1")
    outcomes = {"sigterm": finish(sigterm, "sigterm", root / "sigterm")[0]}
    steps = {"sigterm": checkpoint_steps(root / "sigterm")}
    resumed = start(root / "sigterm", "--resume", "--out", str(root / "resumed"), name="resumed")
    outcomes["sigusr1"] = finish(sigusr1, "sigusr1", root / "sigusr1")[0]
    steps["sigusr1"] = checkpoint_steps(root / "sigusr1")
    outcomes["reference"] = finish(reference, "reference", root / "reference")[0]
    outcomes["resumed"] = finish(resumed, "resumed", root / "sigterm")[0]
    return SimpleNamespace(root=root, outcomes=outcomes, steps=steps)


@pytest.mark.slow
class TestASignalledProcess:
    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
    def test_it_exits_with_128_plus_the_signal_without_a_traceback_after_saving(self, single_process, signum):
        name = signal.Signals(signum).name.lower()
        outcome = single_process.outcomes[name]
        assert outcome.code == 128 + signum, outcome.stderr[-3000:]
        assert "Traceback" not in outcome.stderr
        checkpoint = single_process.root / name / "15"
        assert outcome.report == {"signal": signum, "step": 15, "checkpoint": str(checkpoint)}
        assert single_process.steps[name] == [10, 15]
        assert load_checkpoint(checkpoint).step == 15

    def test_a_new_process_continues_it_bit_for_bit(self, single_process):
        for name in ("reference", "resumed"):
            outcome = single_process.outcomes[name]
            assert outcome.code == 0, outcome.stderr[-3000:]
        result, reference = load_result(single_process.root / "resumed"), load_result(single_process.root / "reference")
        np.testing.assert_array_equal(
            result.losses[:15], load_checkpoint(single_process.root / "sigterm" / "15").losses
        )
        assert_bitwise_equal(result, reference)
        assert checkpoint_steps(single_process.root / "sigterm") == [10, 15, 20, 30, 40]


@pytest.mark.slow
@pytest.mark.multidevice
def test_two_processes_stop_together_when_one_is_signalled_and_resume_bit_for_bit(tmp_path):
    reference = start(tmp_path / "reference", "--out", str(tmp_path / "reference"), name="reference", num_processes=2)
    preempted = preempt(tmp_path / "checkpoints", signal.SIGTERM, name="preempted", num_processes=2, target=1)
    outcomes = finish(preempted, "preempted", tmp_path / "checkpoints")
    steps = checkpoint_steps(tmp_path / "checkpoints")
    meta = load_checkpoint(resolve_checkpoint(tmp_path / "checkpoints")).meta
    resumed = start(
        tmp_path / "checkpoints", "--resume", "--out", str(tmp_path / "resumed"), name="resumed", num_processes=2
    )
    for outcome in [
        *finish(reference, "reference", tmp_path / "reference"),
        *finish(resumed, "resumed", tmp_path / "checkpoints"),
    ]:
        assert outcome.code == 0, outcome.stderr[-3000:]

    for outcome in outcomes:  # process 0 got no signal, and stops at the same boundary all the same
        assert outcome.code == 128 + signal.SIGTERM, outcome.stderr[-3000:]
        assert "Traceback" not in outcome.stderr
        assert outcome.report == {
            "signal": signal.SIGTERM,
            "step": 15,
            "checkpoint": str(tmp_path / "checkpoints" / "15"),
        }
    assert steps == [10, 15]
    assert meta["step"] == 15 and len(meta["process_loader_states"]) == 2
    for rank in (0, 1):
        assert_bitwise_equal(load_result(tmp_path / "resumed", rank), load_result(tmp_path / "reference", rank))
