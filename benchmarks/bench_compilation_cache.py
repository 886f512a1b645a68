"""Compilation-cache benchmark: a small ``Trainer.fit`` in a fresh process, with an empty cache
(cold) and with the one the cold run filled (warm).

Setting: y ~ Normal(w x + b, s) (three latent sites, AutoNormal, Adam, Trace_ELBO) on 1,000
rows, batch 100, 2 epochs with validation on 200 rows, 20 posterior draws: a run that is mostly
compilation. Each run is a new Python process (with a hash seed of its own) that uses a cache
directory under a temporary folder (``AIMZ_TRAINER_COMPILATION_CACHE``; the ``JAX_*`` cache
variables removed), timed from before ``Trainer(...)`` to after ``fit`` returns (what a user
waits for beyond the imports) and as the whole process; ``--pairs`` cold/warm pairs alternate
(each pair on stderr), and one JSON line gives the medians and the warm/cold ratios.

    python benchmarks/bench_compilation_cache.py --pairs 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIT = """
import time
import numpy as np, numpyro, numpyro.distributions as dist
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from optax import adam
from aimz_trainer import Trainer

def model(x, y=None):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    with numpyro.plate("data", 1000, subsample_size=x.shape[0]):
        numpyro.sample("y", dist.Normal(w * x + b, s), obs=y)

x = np.random.default_rng(0).normal(size=1000).astype(np.float32)
data = {"x": x, "y": 2 * x - 0.5}
started = time.perf_counter()
trainer = Trainer(max_epochs=2, enable_progress_bar=False, enable_model_summary=False)
svi = SVI(model, AutoNormal(model), adam(0.05), Trace_ELBO())
trainer.fit(svi, data, batch_size=100, val_data={"x": x[:200], "y": data["y"][:200]}, num_samples=20)
print(time.perf_counter() - started)
"""


def run(cache: Path) -> tuple[float, float]:
    """(fit seconds, process seconds) of one fresh process using ``cache``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("JAX_COMPILATION_CACHE")}
    env |= {"AIMZ_TRAINER_COMPILATION_CACHE": str(cache), "JAX_PLATFORMS": "cpu"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", FIT], env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.split()[-1]), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    pairs = parser.parse_args().pairs
    cold, warm = [], []
    with tempfile.TemporaryDirectory() as folder:
        for pair in range(pairs):
            cache = Path(folder) / str(pair)
            cold.append(run(cache))
            warm.append(run(cache))
            print(f"pair {pair}: cold fit {cold[-1][0]:.2f} s (process {cold[-1][1]:.2f} s), "
                  f"warm fit {warm[-1][0]:.2f} s (process {warm[-1][1]:.2f} s)", file=sys.stderr)  # fmt: skip
            shutil.rmtree(cache)
    figures = {}
    for name, runs in (("cold", cold), ("warm", warm)):
        figures[f"{name}_fit_s"], figures[f"{name}_process_s"] = map(statistics.median, zip(*runs, strict=True))
    figures |= {
        f"warm_over_cold_{what}": figures[f"warm_{what}_s"] / figures[f"cold_{what}_s"] for what in ("fit", "process")
    }
    print(json.dumps({key: round(value, 3) for key, value in figures.items()}))


if __name__ == "__main__":
    main()
