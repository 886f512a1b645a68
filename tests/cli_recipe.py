"""A recipe of one's own, given to the command by its path: a small linear regression with
validation and test rows, fast to compile, for the tests of ``aimz-trainer``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from optax import adam

from aimz_trainer.recipe import Experiment, Recipe, RecipeContext


@dataclass
class Settings:
    """The data.

    Args:
        num_rows: training rows (as many again for validation and for test).
        learning_rate: Adam's learning rate.
    """

    num_rows: int = 400
    learning_rate: float = 0.05


def setup(settings: Settings, context: RecipeContext) -> Experiment:
    n = settings.num_rows
    rng = np.random.default_rng(context.seed)
    x = rng.normal(size=3 * n).astype(np.float32)
    y = (2.0 * x - 0.5 + 0.3 * rng.normal(size=3 * n)).astype(np.float32)

    def model(x, y=None):
        w = numpyro.sample("w", dist.Normal(0.0, 1.0))
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        with numpyro.plate("data", n, subsample_size=x.shape[0]):
            numpyro.sample("y", dist.Normal(w * x + b, 0.3), obs=y)

    part = [{"x": x[i * n : (i + 1) * n], "y": y[i * n : (i + 1) * n]} for i in range(3)]
    svi = SVI(model, AutoNormal(model), adam(settings.learning_rate), Trace_ELBO())
    return Experiment(svi=svi, train_data=part[0], val_data=part[1], test_data=part[2])


RECIPE = Recipe(
    settings=Settings,
    setup=setup,
    trainer={"max_epochs": 2, "enable_progress_bar": False},
    fit={"batch_size": 100, "num_samples": 10},
    checkpoint={"monitor": "val_loss"},
    predict={"batch_size": 200, "num_samples": 10},
)
