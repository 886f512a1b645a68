"""The reference recipe end to end at a tiny size: fit, early stopping, checkpoints, resume,
logs, predictions and the held-out evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from aimz_trainer import open_store
from aimz_trainer.checkpoint import checkpoint_steps
from aimz_trainer.cli import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TINY = ["--num-rows", "4000", "--val-rows", "1000", "--batch-size", "500", "--num-samples", "5"]


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
    first = recipe.main([*TINY, "--max-epochs", "2", "--output-dir", str(tmp_path)])
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

    resumed = recipe.main([*TINY, "--max-epochs", "3", "--output-dir", str(tmp_path), "--resume"])
    assert resumed["steps"] == 24  # 16 restored + one more epoch
    assert resumed["epoch_mean_loss"][:2] == pytest.approx(first["epoch_mean_loss"])
    events = EventAccumulator(str(tmp_path / "logs"), size_guidance={"scalars": 0})
    events.Reload()
    assert [event.step for event in events.Scalars("train_loss_epoch")] == [7, 15, 23]
    # Two prediction stores per run (training rows, held-out rows), all complete.
    assert len([p for p in (tmp_path / "predictions").iterdir() if p.name.startswith("predict-")]) == 4


def test_a_directory_with_checkpoints_is_only_reused_by_resume(recipe, tmp_path, capsys):
    (tmp_path / "checkpoints" / "16").mkdir(parents=True)
    with pytest.raises(SystemExit):
        recipe.parse_args(["--output-dir", str(tmp_path)])
    assert "holds checkpoints of an earlier run: add --resume" in capsys.readouterr().err
    assert recipe.parse_args(["--output-dir", str(tmp_path), "--resume"]).output_dir == tmp_path
    assert (tmp_path / "checkpoints" / "16").is_dir()


def test_resume_without_a_directory_continues_the_newest_run(recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        recipe.parse_args(["--resume"])
    assert "--resume found no earlier run" in capsys.readouterr().err
    for name in ("run-20260101-000000", "run-20260102-000000"):
        (tmp_path / recipe.RUNS / name).mkdir(parents=True)
    assert recipe.parse_args(["--resume"]).output_dir == Path(recipe.RUNS) / "run-20260102-000000"
    fresh = recipe.parse_args([]).output_dir
    assert fresh.parent == Path(recipe.RUNS) and fresh.name.startswith("run-") and not fresh.exists()
