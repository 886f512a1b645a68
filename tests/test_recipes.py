"""The documented recipes run and do what their docstrings say."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from optax import adam
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from aimz_trainer import Trainer
from aimz_trainer.cli import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def scalars(log_dir: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def test_custom_callback_logs_the_posterior_mean_every_epoch(tmp_path, capsys):
    recipe = load_recipe("custom_callback", RECIPES)
    summary = recipe.main(
        ["--output_dir", str(tmp_path), "--model.num_rows", "4000", "--trainer.max_epochs", "6",
         "--fit.batch_size", "100", "--trainer.enable_progress_bar", "false"]
    )  # fmt: skip
    log_dir = tmp_path / "logs"
    # The fit recovers the coefficients, and the callback followed them epoch by epoch.
    np.testing.assert_allclose(summary["beta_mean"], summary["beta_true"], atol=0.1)
    # Through the logging API, into the same TensorBoard run and CSV file as the built-in curves.
    rows = pd.read_csv(log_dir / "metrics.csv")
    for index, fitted in enumerate(summary["beta_mean"]):
        tag = f"posterior_mean/beta_auto_loc/{index}"
        means = scalars(log_dir, tag)
        assert sorted(means) == [39, 79, 119, 159, 199, 239]  # the last step of each 40-step epoch
        assert means[239] == np.float32(fitted)
        csv_means = rows[rows.metric == tag]
        assert csv_means.step.tolist() == [39, 79, 119, 159, 199, 239]
        assert csv_means.epoch.tolist() == list(range(6))
        assert csv_means.value.iloc[-1] == pytest.approx(fitted, rel=1e-6)
    assert len(scalars(log_dir, "train_loss_epoch")) == 6
    assert f"TensorBoard logs in {log_dir}" in capsys.readouterr().out


def test_custom_callback_names_the_parameters_when_the_one_asked_for_is_missing(tmp_path):
    recipe = load_recipe("custom_callback", RECIPES)
    data, _ = recipe.make_data(200, 2, 0)
    model = recipe.make_model(200, 2)
    svi = SVI(model, AutoNormal(model), adam(0.01), Trace_ELBO())
    trainer = Trainer(
        max_epochs=1,
        rng_key=jax.random.key(0),
        enable_progress_bar=False,
        callbacks=[recipe.PosteriorMeanLogger(param="gamma_auto_loc")],
    )
    with pytest.raises(KeyError, match="no variational parameter 'gamma_auto_loc'.*beta_auto_loc"):
        trainer.fit(svi, data, batch_size=100)
