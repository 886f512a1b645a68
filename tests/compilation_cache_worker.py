"""A small fit and prediction in a process of its own, for the compilation-cache tests
(``python -m tests.compilation_cache_worker OUT_DIR``): writes the losses, the posterior draws and
the predictions to ``OUT_DIR/*.npy``, and prints one JSON line: the compilation-cache directory
JAX uses, the counts of JAX's cache events (``cache_hits``, ``cache_misses``: programs
written to the cache) and of the programs compiled in the process, cached or not."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import jax
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


def main(out_dir: Path) -> dict:
    from aimz_trainer import Predictor, Trainer  # importing them turns the cache on

    events: Counter[str] = Counter()
    monitoring.register_event_listener(lambda name, **kwargs: events.update([name.rsplit("/", 1)[-1]]))
    monitoring.register_event_duration_secs_listener(lambda name, _, **kwargs: events.update([name.rsplit("/", 1)[-1]]))
    # A network's initialisation, before any entry point is built: eager programs a script compiles first.
    init_scale = float(jax.random.truncated_normal(jax.random.key(3), -2.0, 2.0, ()))
    svi = SVI(model, AutoNormal(model), adam(0.05 * (1.0 + 0.0 * init_scale)), Trace_ELBO())
    train = data(NUM_ROWS, seed=0)
    trainer = Trainer(max_epochs=2, enable_progress_bar=False, enable_model_summary=False)
    result = trainer.fit(svi, train, batch_size=50, val_data=data(100, seed=1), num_samples=10)
    predictor = Predictor(model, result.posterior, rng_key=jax.random.key(1))
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
    print(json.dumps(main(Path(sys.argv[1]))))
