"""The reference tutorial's workflow, statement for statement, timed phase by phase.

This is the code of the reference tutorial (``/work/shared/reference/tutorial.rst``: a
Bayesian neural network on a synthetic binary outcome, fitted with SVI through
``ImpactModel`` and predicted into Zarr), with the same statements in the same order. Left
out: the ``%config`` line, the plot cell and its ``import matplotlib.pyplot as plt``, and the
bare ``dt`` that displays the tree in a notebook. Parameterised only by:

- ``--module``: the package that provides ``ImpactModel`` (``aimz``, the reference library,
  or ``aimz_trainer``);
- ``--num-rows``: the tutorial's ``n`` (default 1,000,000; ``d`` stays 100);
- ``--output``: where the JSON figures go (a path, or ``-`` for stdout, the default).

Per phase (imports, data, model, fit, predict, cleanup), it records the wall
(``time.perf_counter``) and the peak RSS growth: the resident set size sampled by a
background thread (``PeakRss`` from ``bench_predict.py``) during the phase, minus the RSS just
before it. ``fit`` is the ``im.fit`` call; ``predict`` is the ``im.predict`` call (the Zarr
store is written inside it) plus a check of the returned tree's shapes (``y`` and ``p`` in
``posterior_predictive``, both ``(1, 500, n)``). ``end_to_end`` runs from the tutorial's first
statement (its imports) to just after ``im.cleanup()``; its RSS growth is sampled too, and also
taken exactly from ``ru_maxrss`` (the process's lifetime peak) minus the RSS before the
imports. ``process_wall_s`` runs from the process's creation (so the interpreter's start-up is
in it) to the end of the workflow.

Run it from the repository root, with the interpreter of the environment to measure::

    .venv/bin/python benchmarks/tutorial_workflow.py --module aimz_trainer [--num-rows 1000000] [--output -]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import platform
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
from bench_predict import PeakRss, current_rss_mib


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", choices=("aimz", "aimz_trainer"), default="aimz_trainer")
    parser.add_argument("--num-rows", type=int, default=1_000_000)
    parser.add_argument("--output", default="-", help="a JSON file to write, or - for stdout")
    return parser.parse_args(argv)


class Phases:
    """Wall and peak RSS growth of each named block; ``phase`` is the context manager."""

    def __init__(self) -> None:
        self.figures: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with PeakRss() as rss:
            started = time.perf_counter()
            yield
            wall = time.perf_counter() - started
        self.figures[name] = {
            "wall_s": wall,
            "rss_before_mib": rss.before,
            "rss_peak_mib": rss.peak,
            "rss_growth_mib": rss.growth_mib,
        }
        print(f"  {name}: {wall:.2f} s, +{rss.growth_mib:.0f} MiB", file=sys.stderr, flush=True)


def run_tutorial(module: str, num_rows: int, phases: Phases) -> dict[str, Any]:
    """The tutorial's cells, with ``n`` and the ``ImpactModel`` import as parameters."""
    phase = phases.phase

    with phase("imports"):
        import jax.numpy as jnp
        import numpyro.distributions as dist
        from flax import nnx
        from jax import Array, default_backend, random
        from jax.typing import ArrayLike
        from numpyro import deterministic, plate, sample
        from numpyro.contrib.module import random_nnx_module
        from numpyro.infer import SVI, Trace_ELBO, init_to_uniform
        from numpyro.infer.autoguide import AutoNormal
        from optax import adam

        ImpactModel = importlib.import_module(module).ImpactModel  # "from aimz import ImpactModel"

    with phase("data"):
        n = num_rows  # dataset size
        d = 100  # dimensionality
        rng_key = random.key(0)
        rng_key, rng_subkey_X, rng_subkey_beta, rng_subkey_y = random.split(rng_key, 4)
        X = random.normal(rng_subkey_X, (n, d))
        beta = random.normal(rng_subkey_beta, (d,))
        logits = X @ beta
        p_true = nnx.sigmoid(logits)
        y = random.bernoulli(rng_subkey_y, p_true).astype(jnp.int32)
        # Not in the tutorial: JAX dispatches asynchronously; wait so the data's cost lands here.
        y.block_until_ready()

    with phase("model"):

        class MLP(nnx.Module):
            dtype: jnp.dtype = jnp.bfloat16 if default_backend() == "gpu" else jnp.float32

            def __init__(self, din: int, dmid: int, dout: int, *, rngs: nnx.Rngs) -> None:
                self.linear1 = nnx.Linear(din, dmid, dtype=self.dtype, rngs=rngs)
                self.linear2 = nnx.Linear(dmid, dmid, dtype=self.dtype, rngs=rngs)
                self.linear3 = nnx.Linear(dmid, dout, dtype=self.dtype, rngs=rngs)

            def __call__(self, x: ArrayLike) -> Array:
                x = self.linear1(x)
                x = nnx.relu(x)
                x = self.linear2(x)
                x = nnx.relu(x)
                x = self.linear3(x)

                return nnx.sigmoid(x).squeeze()

        rng_key, rng_subkey = random.split(rng_key)
        p_nn_module = MLP(
            din=X.shape[1],
            dmid=32,
            dout=1,
            rngs=nnx.Rngs(params=rng_subkey),
        )

        def model(X: ArrayLike, *, y: ArrayLike | None = None) -> None:
            nn_p = random_nnx_module(
                "nn_p",
                nn_module=p_nn_module,
                scope_divider="_",
                prior=dist.Normal(),
            )
            with plate("data", size=n, subsample_size=len(X)):
                p = nn_p(X)
                deterministic("p", p)
                sample("y", dist.Bernoulli(p), obs=y)

        rng_key, rng_subkey = random.split(key=rng_key)
        im = ImpactModel(
            model,
            rng_key=rng_subkey,
            inference=SVI(
                model,
                guide=AutoNormal(model=model, init_loc_fn=init_to_uniform(radius=0.1)),
                optim=adam(learning_rate=1e-3),
                loss=Trace_ELBO(),
            ),
        )

    with phase("fit"):
        im.fit(X, y, num_samples=500, batch_size=2000, epochs=10, progress=False)

    with phase("predict"):
        dt = im.predict(X, batch_size=100_000)
        # Not in the tutorial: the store is written by predict; check what came back.
        shapes = {site: tuple(dt["posterior_predictive"][site].shape) for site in ("y", "p")}
        assert shapes == {"y": (1, 500, n), "p": (1, 500, n)}, shapes
        layout = {group: {name: list(dt[group][name].dims) for name in dt[group].data_vars} for group in dt.children}

    with phase("cleanup"):
        im.cleanup()

    losses = im.vi_result.losses
    return {
        "shapes": {site: list(shape) for site, shape in shapes.items()},
        "layout": layout,
        "num_losses": len(losses),
        "final_loss": float(losses[-1]),
        "backend": default_backend(),
    }


def versions(module: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in (module, "jax", "jaxlib", "numpyro", "flax", "optax", "zarr", "xarray", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    process = psutil.Process()
    print(f"tutorial workflow: {args.module}, n={args.num_rows:,}", file=sys.stderr, flush=True)
    phases = Phases()
    rss_start = current_rss_mib()
    with PeakRss() as whole:
        started = time.perf_counter()
        outcome = run_tutorial(args.module, args.num_rows, phases)
        end_to_end = time.perf_counter() - started
    process_wall = time.time() - process.create_time()
    ru_maxrss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    figures: dict[str, Any] = {
        "benchmark": "tutorial_workflow",
        "module": args.module,
        "num_rows": args.num_rows,
        **{f"{name}_s": phase["wall_s"] for name, phase in phases.figures.items()},
        "end_to_end_s": end_to_end,
        "process_wall_s": process_wall,
        **{f"{name}_rss_growth_mib": phase["rss_growth_mib"] for name, phase in phases.figures.items()},
        "end_to_end_rss_growth_mib": whole.growth_mib,
        "end_to_end_rss_growth_ru_maxrss_mib": ru_maxrss_mib - rss_start,
        "end_to_end_peak_phase": max(phases.figures, key=lambda name: phases.figures[name]["rss_peak_mib"]),
        "rss_start_mib": rss_start,
        "ru_maxrss_mib": ru_maxrss_mib,
        "phases": phases.figures,
        **outcome,
        "python": sys.executable,
        "python_version": platform.python_version(),
        "versions": versions(args.module),
    }
    line = json.dumps(figures)
    if args.output == "-":
        print(line, flush=True)
    else:
        Path(args.output).write_text(line + "\n")


if __name__ == "__main__":
    main()
