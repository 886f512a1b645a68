"""Bayesian neural network for a binary outcome: the reference tutorial as a monitored run.

What it shows: the tutorial's workflow (synthetic data with a linear logit signal through a
sigmoid and Bernoulli labels; a 3-layer flax nnx network whose weights get a Normal prior via
``random_nnx_module``; an AutoNormal guide, Adam, and ``plate(..., subsample_size=...)``
minibatch scaling) on the Trainer with what a real run needs: validation on held-out rows every
epoch, early stopping on the validation ELBO, TensorBoard logs, checkpoints (``--ckpt_path
last`` continues an interrupted run), the posterior-predictive store of the training rows written to
Zarr by the Predictor, and an evaluation of the held-out predictions against the labels and the
true probabilities (accuracy, AUC, calibration).

Run it with ``aimz-trainer fit --recipe bnn_binary`` (100,000 rows, about a minute on 2 cores);
the tutorial's size is ``--model.num_rows 1000000 --trainer.max_epochs 10 --fit.num_samples 500``.
Everything goes under ``--output_dir`` (default: a new ``runs/bnn_binary/run-<time>``):
``config.yaml`` and ``run.json`` (what the run is), ``logs/`` (``tensorboard --logdir
RUN_DIR/logs``), ``checkpoints/`` and ``predictions/``; ``--ckpt_path last`` continues the
newest run (or ``--output_dir``'s); ``aimz-trainer validate|test|predict --config
RUN_DIR/config.yaml`` evaluate its checkpoint on the validation or test rows, or predict again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from flax import nnx
from jax import Array, random
from jax.typing import ArrayLike
from numpyro import deterministic, plate, sample
from numpyro.contrib.module import random_nnx_module
from numpyro.infer import SVI, Trace_ELBO, init_to_uniform
from numpyro.infer.autoguide import AutoNormal
from optax import adam, inject_hyperparams

from aimz_trainer import ConfigurationError, EarlyStopping
from aimz_trainer.recipe import Experiment, FitOutcome, Recipe, RecipeContext, spec


class MLP(nnx.Module):
    """Three dense layers with ReLU, a sigmoid output: the tutorial's network."""

    def __init__(self, din: int, dmid: int, dout: int, *, rngs: nnx.Rngs) -> None:
        self.linear1 = nnx.Linear(din, dmid, rngs=rngs)
        self.linear2 = nnx.Linear(dmid, dmid, rngs=rngs)
        self.linear3 = nnx.Linear(dmid, dout, rngs=rngs)

    def __call__(self, x: ArrayLike) -> Array:
        x = nnx.relu(self.linear1(x))
        x = nnx.relu(self.linear2(x))
        return nnx.sigmoid(self.linear3(x)).squeeze(-1)


def make_data(num_rows: int, num_features: int, rng_key: Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``X`` (standard normal), ``y`` (Bernoulli labels) and the true probabilities, on the host."""
    key_x, key_beta, key_y = random.split(rng_key, 3)
    X = random.normal(key_x, (num_rows, num_features))
    beta = random.normal(key_beta, (num_features,))
    p_true = nnx.sigmoid(X @ beta)
    y = random.bernoulli(key_y, p_true).astype(jnp.int32)
    return np.asarray(X), np.asarray(y), np.asarray(p_true)


def make_model(num_rows: int, num_features: int, hidden: int, rng_key: Array) -> Callable[..., None]:
    """The tutorial's kernel: a Bayesian MLP with a Bernoulli likelihood and a ``p`` site."""
    network = MLP(num_features, hidden, 1, rngs=nnx.Rngs(params=rng_key))

    def model(X: ArrayLike, *, y: ArrayLike | None = None) -> None:
        nn_p = random_nnx_module("nn_p", nn_module=network, scope_divider="_", prior=dist.Normal())
        with plate("data", size=num_rows, subsample_size=len(X)):
            p = nn_p(X)
            deterministic("p", p)
            sample("y", dist.Bernoulli(p), obs=y)

    return model


def make_svi(model: Callable[..., None], learning_rate: float = 1e-3) -> SVI:
    """AutoNormal guide, Adam and Trace_ELBO, as in the tutorial.

    Adam's rate is a value in the optimizer's state (``optax.inject_hyperparams``), not a
    constant of the compiled training chunk: a run with another ``--model.learning_rate``
    reads the chunk back from the compilation cache and compiles only init."""
    guide = AutoNormal(model=model, init_loc_fn=init_to_uniform(radius=0.1))
    optim = inject_hyperparams(adam)(learning_rate=learning_rate)
    return SVI(model, guide=guide, optim=optim, loss=Trace_ELBO())


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a positive outranks a negative (ties
    count half), from the ranks of the scores."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    positives = labels.astype(bool)
    num_pos, num_neg = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def speed(steady_steps_per_sec: float | None, chunk_steps: int, first_chunk_s: float) -> str:
    """The fit's speed as measured: the steady rate, timed after the first chunk (which holds the
    compilation), when the fit ran more than one chunk; else its only chunk's rate, start-up
    included.

    Example:
        >>> speed(1234.5, 50, 2.0)
        '1,234 steps/s steady'
        >>> speed(None, 8, 2.0)
        '4 steps/s over the only chunk (8 steps), start-up and compilation included'
    """
    if steady_steps_per_sec is not None:
        return f"{steady_steps_per_sec:,.0f} steps/s steady"
    rate = chunk_steps / first_chunk_s
    return f"{rate:,.0f} steps/s over the only chunk ({chunk_steps} steps), start-up and compilation included"


def calibration_error(predicted: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: the row-weighted mean gap between the mean predicted
    probability and the observed frequency in ``bins`` equal-width probability bins."""
    which = np.minimum((predicted * bins).astype(int), bins - 1)
    gaps = [
        abs(predicted[which == b].mean() - labels[which == b].mean()) * np.mean(which == b)
        for b in range(bins)
        if np.any(which == b)
    ]
    return float(np.sum(gaps))


@dataclass
class Settings:
    """The data and the network.

    Args:
        num_rows: training rows (the tutorial's size: 1,000,000).
        num_features: columns of X.
        hidden: width of the network's two hidden layers.
        val_rows: held-out rows validated every epoch (default: 10% of num_rows).
        test_rows: held-out rows for `aimz-trainer test` (default: as many as val_rows).
        learning_rate: Adam's learning rate.
    """

    num_rows: int = 100_000
    num_features: int = 100
    hidden: int = 32
    val_rows: int | None = None
    test_rows: int | None = None
    learning_rate: float = 1e-3


def setup(settings: Settings, context: RecipeContext) -> Experiment:
    """The tutorial's data (training, validation and test rows of one simulation) and SVI."""
    n = settings.num_rows
    val_rows = settings.val_rows if settings.val_rows is not None else max(n // 10, 1)
    test_rows = settings.test_rows if settings.test_rows is not None else val_rows
    if val_rows < 1:  # the held-out accuracy, AUC and calibration need rows
        raise ConfigurationError(f"model.val_rows must be at least 1; got {val_rows}.")
    key_data, key_net = random.split(context.rng_key)
    X, y, p_true = make_data(n + val_rows + test_rows, settings.num_features, key_data)
    held_out = slice(n, n + val_rows)
    tested = slice(n + val_rows, None)
    model = make_model(n, settings.num_features, settings.hidden, key_net)
    return Experiment(
        svi=make_svi(model, settings.learning_rate),
        train_data={"X": X[:n], "y": y[:n]},
        val_data={"X": X[held_out], "y": y[held_out]},
        test_data={"X": X[tested], "y": y[tested]},
        predict_data={"X": X[:n]},
        extras={"p_true_val": p_true[held_out]},
    )


def report(settings: Settings, outcome: FitOutcome) -> dict[str, Any]:
    """Predict the training rows (the posterior-predictive store) and the held-out ones, and
    evaluate the latter against the labels and the true probabilities; print what was found."""
    from aimz_trainer import Predictor  # loads xarray: only when the recipe runs

    trainer, result, experiment = outcome.trainer, outcome.result, outcome.experiment
    train, held_out = experiment.train_data, experiment.val_data
    assert held_out is not None
    n = len(train["X"])
    started = time.perf_counter()
    predictor = Predictor(experiment.svi.model, result.posterior, mesh=trainer.mesh, rng_key=outcome.predict_key)
    batch_size, store_dir = outcome.predict.batch_size, outcome.predictions_dir
    store = predictor.predict({"X": train["X"]}, batch_size=batch_size, output_dir=store_dir)
    held_out_tree = predictor.predict(
        held_out, batch_size=batch_size, output_dir=store_dir, in_sample=False, return_sites=["p"]
    )
    predict_wall = time.perf_counter() - started
    p_mean = held_out_tree["predictions"]["p"].mean(("chain", "draw")).values
    p_true, labels = experiment.extras["p_true_val"], held_out["y"]

    epochs_run = -(-result.losses.size // trainer.steps_per_epoch)
    per_epoch = [float(chunk.mean()) for chunk in np.array_split(result.losses, epochs_run)]
    metrics = trainer.callback_metrics
    num_samples = next(iter(result.posterior.values())).shape[0] if result.posterior else 0
    summary = {
        "rows": n,
        "devices": trainer.mesh.size,
        "steps": int(result.losses.size),
        "epochs": len(per_epoch),
        "stopped_early": trainer.stop_reason,
        "epoch_mean_loss": per_epoch,
        "final_loss": float(result.losses[-1]),
        "val_loss": metrics["val_loss"],
        "val_lpd": metrics["val_lpd"],
        "steps_per_sec": metrics.get("steps_per_sec"),
        "predict_wall_s": predict_wall,
        "accuracy": float(np.mean((p_mean > 0.5) == labels)),
        "accuracy_of_true_p": float(np.mean((p_true > 0.5) == labels)),
        "auc": auc(p_mean, labels),
        "auc_of_true_p": auc(p_true, labels),
        "calibration_error": calibration_error(p_mean, labels),
        "mean_abs_error_to_true_p": float(np.mean(np.abs(p_mean - p_true))),
        "posterior_shapes": {site: tuple(draws.shape) for site, draws in result.posterior.items()},
        "store": store.attrs["store_path"],
        "store_shapes": {name: tuple(store["posterior_predictive"][name].shape) for name in ("y", "p")},
    }
    print(
        f"bnn_binary: {n:,} rows x {settings.num_features}, {summary['devices']} device(s), data on {trainer.placement}"
    )
    print("loss per epoch (mean ELBO): " + ", ".join(f"{loss:,.0f}" for loss in per_epoch))
    stopped = f", stopped early: {trainer.stop_reason}" if trainer.stop_reason else ""
    print(f"final ELBO loss {summary['final_loss']:,.1f} after {summary['steps']} steps{stopped}")
    last_chunk = next(chunk for chunk in trainer.plan.chunks if chunk.steps.stop == trainer.state.step)
    print(
        f"speed: {speed(summary['steps_per_sec'], last_chunk.num_steps, trainer.timings['first_chunk_s'])}; "
        f"{num_samples} posterior draws; "
        f"predictions {predict_wall:.1f} s"
    )
    print(
        f"held out ({len(labels):,} rows): ELBO loss per row {summary['val_loss']:.4f}, mean lpd "
        f"{summary['val_lpd']:.4f}"
    )
    print(
        f"held out: accuracy {summary['accuracy']:.3f} (true p: {summary['accuracy_of_true_p']:.3f}), AUC "
        f"{summary['auc']:.3f} (true p: {summary['auc_of_true_p']:.3f}), calibration error "
        f"{summary['calibration_error']:.3f}, mean |p - true p| {summary['mean_abs_error_to_true_p']:.3f}"
    )
    print("posterior: " + ", ".join(f"{site} {shape}" for site, shape in summary["posterior_shapes"].items()))
    print(f"predictions: {summary['store']} (y {summary['store_shapes']['y']}, p {summary['store_shapes']['p']})")
    print(f"TensorBoard: tensorboard --logdir {outcome.context.output_dir / 'logs'}")
    predictor.cleanup()
    return summary


RECIPE = Recipe(
    settings=Settings,
    setup=setup,
    trainer={"max_epochs": 5, "callbacks": [spec(EarlyStopping, "val_loss", patience=2)]},
    fit={"batch_size": 2000, "num_samples": 100},
    checkpoint={"monitor": "val_loss", "save_top_k": 1},
    predict={"batch_size": 100_000},
    report=report,
)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``aimz-trainer fit --recipe bnn_binary`` with the options ``argv``; returns the summary."""
    return RECIPE.main(argv)


if __name__ == "__main__":
    main()
