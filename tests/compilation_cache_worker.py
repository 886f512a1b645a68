"""A small fit and prediction in a process of its own, for the compilation-cache tests
(``python -m tests.compilation_cache_worker OUT_DIR [--dense] [--cores N]``): writes the losses,
the posterior draws and the predictions to ``OUT_DIR/*.npy``, and prints one JSON line: the
compilation-cache directory JAX uses, the counts of JAX's cache events (``cache_hits``,
``cache_misses``: programs written to the cache) and of the programs compiled in the process,
cached or not.

``--dense`` fits a dense layer instead, whose gradient sums over a batch of 1,000 rows: XLA's CPU
matrix product splits that sum over the threads it has, so its last bits follow the number of
cores. ``--cores N`` runs the process on N of the cores it may use."""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax import monitoring
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from optax import adam

# Not tests.conftest's models: importing it sets the test session's JAX cache directory.
NUM_ROWS = 200


def model(x, y=None):
    """y ~ Normal(w x + b, s): three latent sites, whose ELBO terms NumPyro orders by hash."""
    w = numpyro.sample("w", dist.Normal(0.0, 1.0))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    with numpyro.plate("data", NUM_ROWS, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(w * x + b, s), obs=y)


def data(num_rows: int, seed: int) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).normal(size=num_rows).astype(np.float32)
    return {"x": x, "y": (2 * x - 0.5 + np.sin(7 * x)).astype(np.float32)}


DENSE_ROWS, DENSE_BATCH, FEATURES, UNITS = 2000, 1000, 100, 8


def dense_model(x, y=None):
    """y ~ Normal(tanh(x W) v, 1): W's gradient is a matrix product summed over the batch."""
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([FEATURES, UNITS]).to_event(2))
    v = numpyro.sample("v", dist.Normal(0.0, 1.0).expand([UNITS]).to_event(1))
    with numpyro.plate("data", DENSE_ROWS, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(jnp.tanh(x @ w / 10.0) @ v, 1.0), obs=y)


def dense_data(num_rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_rows, FEATURES)).astype(np.float32)
    return {"x": x, "y": (x[:, 0] - x[:, 1] + rng.normal(size=num_rows)).astype(np.float32)}


def main(out_dir: Path, *, dense: bool = False) -> dict:
    from aimz_trainer import Predictor, Trainer  # importing them turns the cache on

    events: Counter[str] = Counter()
    monitoring.register_event_listener(lambda name, **kwargs: events.update([name.rsplit("/", 1)[-1]]))
    monitoring.register_event_duration_secs_listener(lambda name, _, **kwargs: events.update([name.rsplit("/", 1)[-1]]))
    # A network's initialisation, before any entry point is built: eager programs a script compiles first.
    init_scale = float(jax.random.truncated_normal(jax.random.key(3), -2.0, 2.0, ()))
    fitted, make_data = (dense_model, dense_data) if dense else (model, data)
    svi = SVI(fitted, AutoNormal(fitted), adam(0.05 * (1.0 + 0.0 * init_scale)), Trace_ELBO())
    train = make_data(DENSE_ROWS if dense else NUM_ROWS, seed=0)
    trainer = Trainer(max_epochs=2, enable_progress_bar=False, enable_model_summary=False)
    batch_size = DENSE_BATCH if dense else 50
    result = trainer.fit(svi, train, batch_size=batch_size, val_data=make_data(100, seed=1), num_samples=10)
    predictor = Predictor(fitted, result.posterior, rng_key=jax.random.key(1))
    tree = predictor.predict({"x": train["x"][:100]}, batch_size=100, output_dir=out_dir / "store")
    arrays = {"losses": result.losses, "predictions": tree["posterior_predictive"]["y"].values}
    arrays |= {f"posterior_{site}": draws for site, draws in result.posterior.items()}
    for name, values in arrays.items():
        np.save(out_dir / f"{name}.npy", np.asarray(values))
    predictor.cleanup()
    return {
        "cache_dir": jax.config.jax_compilation_cache_dir,
        "hits": events["cache_hits"],
        "misses": events["cache_misses"],
        # Every XLA compilation or cache read, less the reads: the programs compiled here.
        "compiled": events["backend_compile_duration"] - events["cache_hits"],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dense", action="store_true")
    parser.add_argument("--cores", type=int)
    args = parser.parse_args()
    if args.cores is not None:  # before the first computation starts XLA's threads
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    print(json.dumps(main(args.out_dir, dense=args.dense)))
