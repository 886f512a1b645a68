"""The reference recipe end to end at a tiny size: fit, early stopping, checkpoints, resume,
logs, predictions and the held-out evaluation."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from aimz_trainer import CommandLineError, open_store
from aimz_trainer.checkpoint import checkpoint_steps
from aimz_trainer.cli import fit_directory, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = [
    "--model.num_rows", "4000", "--model.val_rows", "1000", "--fit.batch_size", "500", "--fit.num_samples", "5",
    "--trainer.enable_progress_bar", "false",
]  # fmt: skip


@pytest.fixture(scope="module")
def recipe():
    return load_recipe("bnn_binary", RECIPES)


def test_auc_and_calibration_error(recipe):
    labels = np.array([0, 0, 1, 1])
    assert recipe.auc(np.array([0.1, 0.4, 0.35, 0.8]), labels) == 0.75
    assert recipe.auc(np.array([0.5, 0.5, 0.5, 0.5]), labels) == 0.5  # ties count half
    assert recipe.auc(np.array([0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    # Two bins: [0.05, 0.15] predicts 0.1 and sees 0.5; [0.85, 0.95] predicts 0.9 and sees 0.5.
    predicted, labels = np.array([0.05, 0.15, 0.85, 0.95]), np.array([0, 1, 0, 1])
    assert recipe.calibration_error(predicted, labels, bins=2) == pytest.approx(0.4)
    # Ten bins: one row each, gaps 0.05, 0.85, 0.85, 0.05.
    assert recipe.calibration_error(predicted, labels) == pytest.approx(0.45)
    assert recipe.calibration_error(np.array([0.0, 1.0]), np.array([0, 1])) == pytest.approx(0.0)


@pytest.mark.slow
def test_a_run_then_a_resumed_run(recipe, tmp_path, capsys):
    first = recipe.main([*TINY, "--trainer.max_epochs", "2", "--output_dir", str(tmp_path)])
    assert (first["steps"], first["epochs"]) == (16, 2)
    assert checkpoint_steps(tmp_path / "checkpoints")[-1] == 16
    out = capsys.readouterr().out
    for line in ("final ELBO loss", "held out: accuracy", "AUC", "calibration error", f"--logdir {tmp_path / 'logs'}"):
        assert line in out
    store = open_store(first["store"])
    assert store["posterior_predictive"]["y"].shape == (1, 5, 4000)
    assert str(store["posterior_predictive"]["y"].dtype) == "int8"
    assert first["store_shapes"] == {"y": (1, 5, 4000), "p": (1, 5, 4000)}
    assert 0.0 <= first["auc"] <= 1.0 and first["auc_of_true_p"] > 0.95  # the oracle separates well
    assert 0.0 <= first["calibration_error"] <= 1.0

    resumed = recipe.main([*TINY, "--trainer.max_epochs", "3", "--output_dir", str(tmp_path), "--ckpt_path", "last"])
    assert resumed["steps"] == 24  # 16 restored + one more epoch
    assert resumed["epoch_mean_loss"][:2] == pytest.approx(first["epoch_mean_loss"])
    events = EventAccumulator(str(tmp_path / "logs"), size_guidance={"scalars": 0})
    events.Reload()
    assert [event.step for event in events.Scalars("train_loss_epoch")] == [7, 15, 23]
    # Two prediction stores per run (training rows, held-out rows), all complete.
    assert len([p for p in (tmp_path / "predictions").iterdir() if p.name.startswith("predict-")]) == 4


def test_a_directory_with_checkpoints_is_only_reused_to_continue_it(tmp_path):
    (tmp_path / "checkpoints" / "16").mkdir(parents=True)
    with pytest.raises(
        CommandLineError, match="holds checkpoints of an earlier run: continue it with --ckpt_path last"
    ):
        fit_directory(str(tmp_path), "bnn_binary", resuming=False)
    assert fit_directory(str(tmp_path), "bnn_binary", resuming=True) == tmp_path
    assert (tmp_path / "checkpoints" / "16").is_dir()


def test_continuing_without_a_directory_takes_the_newest_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CommandLineError, match="--ckpt_path found no earlier run in runs/bnn_binary/"):
        fit_directory(None, "bnn_binary", resuming=True)
    for name in ("run-20260101-000000", "run-20260102-000000"):
        (tmp_path / "runs" / "bnn_binary" / name).mkdir(parents=True)
    assert fit_directory(None, "bnn_binary", resuming=True) == Path("runs/bnn_binary/run-20260102-000000")
    fresh = fit_directory(None, "bnn_binary", resuming=False)
    assert fresh.parent == Path("runs/bnn_binary") and fresh.name.startswith("run-") and not fresh.exists()


@pytest.mark.slow
def test_a_one_chunk_run_reports_the_speed_it_measured(recipe, tmp_path, capsys):
    # One epoch of 8 steps is one chunk: no steady rate, which is timed after the first chunk.
    recipe.main([*TINY, "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "8", "--output_dir", str(tmp_path)])
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if re.search(r"\bnan\b", line, re.IGNORECASE)] == []
    speed = next(line for line in lines if line.startswith("speed: "))
    assert re.match(r"speed: [\d,]+ steps/s over the only chunk \(8 steps\), start-up and compilation included", speed)
