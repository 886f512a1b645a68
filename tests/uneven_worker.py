"""Fits and predictions for ``tests/test_uneven_devices.py``, in a process of their own
(``python -m tests.uneven_worker MODE``) started with a forced CPU device count: XLA fixes it
when JAX starts. Each mode prints one JSON line on stdout.

``fit``: the Trainer on 1030 rows with ``batch_size=100`` (11 steps per epoch, the last batch
completed with the epoch's first rows) and validation batches of 40 rows (the last one wraps),
for a model with global latents only (device placement) and one with a latent per row (host
placement); beside each, on the same batches and from the same initial state, NumPyro's own
``SVI.update``, jitted on one device. ``predict``: the Predictor's three kinds of draws with a
row count and a batch size that split over no device count but one. On several devices,
``fit`` also reports the errors of what padding cannot do (``refused``).
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from optax import adam

from aimz_trainer import ConfigurationError, ImpactModel, Predictor, Trainer
from aimz_trainer.callbacks import Callback
from aimz_trainer.data import ChunkSource
from aimz_trainer.trainer import FitKeys
from tests.conftest import linear_data, linear_svi, local_data, local_model
from tests.predictor_worker import dyadic_posterior, dyadic_x
from tests.predictor_worker import linear_model as dyadic_model

NUM_ROWS, BATCH, VAL_ROWS, VAL_BATCH, EPOCHS = 1030, 100, 130, 40, 2


class ValidationLog(Callback):
    """Every validation pass's metrics."""

    def __init__(self) -> None:
        self.passes: list[dict[str, float]] = []

    def on_validation_end(self, fit, progress) -> None:
        self.passes.append({name: value for name, value in fit.callback_metrics.items() if name.startswith("val_")})


def numpyro_losses(svi: SVI, data: dict[str, np.ndarray], plan, rng_key: jax.Array) -> tuple[list[float], dict]:
    """NumPyro's ``SVI.init`` and ``SVI.update`` on the fit's batches (the fit's shuffle, the
    batch's rows in the plate ``data``), with no padding and on one device."""
    keys = FitKeys.split(rng_key)
    source = ChunkSource(plan, seed=_seed(keys.shuffle), shuffle=True, process_index=0, process_count=1)
    device = jax.devices()[0]
    batches = []
    for epoch in range(EPOCHS):
        order = source.epoch_order(epoch)[: plan.steps_per_epoch * BATCH]
        batches.extend(np.sort(order.reshape(plan.steps_per_epoch, BATCH), axis=1))

    def rows(indices: np.ndarray) -> dict[str, jax.Array]:
        return {key: jax.device_put(value[indices], device) for key, value in data.items()}

    def update(state, indices, batch):
        with handlers.substitute(data={"data": indices}):
            return svi.update(state, **batch)

    with handlers.substitute(data={"data": jax.numpy.asarray(batches[0])}):
        state = svi.init(keys.init, **rows(batches[0]))
    step = jax.jit(update)
    losses = []
    for indices in batches:
        state, loss = step(state, jax.device_put(indices, device), rows(indices))
        losses.append(float(loss))
    return losses, {name: np.asarray(value).tolist() for name, value in svi.get_params(state).items()}


def _seed(key: jax.Array) -> list[int]:
    return [int(word) for word in np.asarray(jax.random.key_data(key)).ravel()]


def fit_one(kind: str) -> dict:
    if kind == "linear":
        svi, data, val = linear_svi(NUM_ROWS), linear_data(NUM_ROWS), linear_data(VAL_ROWS, seed=1)
        placement, reference_svi = "device", linear_svi(NUM_ROWS)
    else:
        model = local_model(NUM_ROWS)
        svi = SVI(model, AutoNormal(model), adam(0.05), Trace_ELBO())
        reference_svi = SVI(model, AutoNormal(model), adam(0.05), Trace_ELBO())
        data, val = local_data(NUM_ROWS)[0], local_data(VAL_ROWS, seed=1)[0]
        placement = "host"
    rng_key = jax.random.key(0)
    log = ValidationLog()
    trainer = Trainer(max_epochs=EPOCHS, rng_key=rng_key, enable_progress_bar=False, steps_per_chunk=4, callbacks=[log])
    result = trainer.fit(
        svi, data, batch_size=BATCH, val_data=val, val_batch_size=VAL_BATCH, num_samples=5, data_placement=placement
    )
    losses, params = numpyro_losses(reference_svi, data, trainer.plan, rng_key)
    return {
        "devices": trainer.mesh.size,
        "padded_batch": trainer.plan.padded_batch_size,
        "losses": result.losses.tolist(),
        "params": {name: np.asarray(value).tolist() for name, value in result.params.items()},
        "validation": log.passes,
        "posterior": {name: np.asarray(value).tolist() for name, value in result.posterior.items()},
        "numpyro_losses": losses,
        "numpyro_params": params,
    }


def impact_model() -> dict:
    """The reference library's call on this host's devices: ImpactModel.fit(X, y, batch_size=100)."""
    data = linear_data(NUM_ROWS)
    svi = linear_svi(NUM_ROWS)
    im = ImpactModel(svi.model, rng_key=jax.random.key(0), inference=svi, param_input="x")
    im.fit(data["x"], data["y"], batch_size=BATCH, epochs=EPOCHS, num_samples=5, progress=False)
    return {"losses": np.asarray(im.vi_result.losses).tolist(), "w": np.asarray(im.posterior["w"]).tolist()}


def predict() -> dict:
    """Draws of the dyadic linear model on 37 rows in batches of 10 rows (4 rows per key), and
    the posterior draws' log-likelihood; prior draws of a model with a latent per row."""
    x = dyadic_x(37)
    predictor = Predictor(dyadic_model, dyadic_posterior(), rng_key=jax.random.key(7), rows_per_key=4)
    posterior = predictor.predict({"x": x}, batch_size=10)["posterior_predictive"]
    y = np.asarray(posterior["y"])[0, 0]
    likelihood = predictor.log_likelihood({"x": x, "y": y}, batch_size=10)["log_likelihood"]
    model = local_model(37)
    prior = Predictor(model, None, rng_key=jax.random.key(3), rows_per_key=4).sample_prior_predictive(
        {"x": x}, num_samples=3, batch_size=10
    )
    # In sample, each row's latent z is drawn from the guide, row by row.
    rng = np.random.default_rng(0)
    params = {
        "b_auto_loc": np.float32(0.5),
        "b_auto_scale": np.float32(0.25),
        "z_auto_loc": (rng.integers(-8, 9, 37) / 4).astype(np.float32),
        "z_auto_scale": np.full(37, 0.125, np.float32),
    }
    in_sample = Predictor(
        model, {"b": dyadic_posterior()["b"]}, rng_key=jax.random.key(5), rows_per_key=4, guide=AutoNormal(model),
        params=params,
    ).predict({"x": x}, batch_size=10)["posterior_predictive"]  # fmt: skip
    two_rows = predictor.predict({"x": x[:2]}, batch_size=1)["posterior_predictive"]
    return {
        "devices": predictor.mesh.size,
        "y": np.asarray(posterior["y"]).tolist(),
        "mu": np.asarray(posterior["mu"]).tolist(),
        "log_likelihood": np.asarray(likelihood["y"]).tolist(),
        "prior_y": np.asarray(prior["prior_predictive"]["y"]).tolist(),
        "in_sample_y": np.asarray(in_sample["y"]).tolist(),
        "two_rows_y": np.asarray(two_rows["y"]).tolist(),
    }


def unplated_model(x, y=None):
    """``y`` follows the rows in no plate: padding rows could not be masked there."""
    w = numpyro.sample("w", dist.Normal())
    numpyro.sample("y", dist.Normal(w * x, 1.0).to_event(1), obs=y)


def refused() -> dict[str, str]:
    """The errors of fits that padding cannot serve (raised before anything compiles)."""
    messages = {}
    data = linear_data(NUM_ROWS)
    trainer = Trainer(max_epochs=1, enable_progress_bar=False)
    svi = SVI(unplated_model, AutoNormal(unplated_model), adam(0.05), Trace_ELBO())
    for name, options in [("batch_size", {}), ("val_batch_size", {"val_data": data, "val_batch_size": 40})]:
        try:
            trainer.fit(svi, data, batch_size=BATCH if name == "batch_size" else 102, **options)
        except ConfigurationError as error:
            messages[name] = str(error)
    return messages


def main(mode: str) -> None:
    if mode == "fit":
        output = {kind: fit_one(kind) for kind in ("linear", "local")}
        output["impact_model"] = impact_model()
        if jax.device_count() > 1:
            output["refused"] = refused()
    elif mode == "predict":
        output = predict()
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(output), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
