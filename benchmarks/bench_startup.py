"""Start-up benchmark: short runs in fresh processes, with an empty compilation cache (cold) and
with the cache the previous run left (warm).

Workloads, each run as a user runs it, in a fresh process:

- **recipe**: ``aimz-trainer fit --recipe bnn_binary --trainer.max_epochs 1`` (the console
  script, in a scratch working directory: its run folder is written there);
- **tutorial**: the reference tutorial's workflow (``tutorial_workflow.py``) at
  ``--tutorial-rows`` rows (default 20,000);
- **bench_fit**: ``bench_fit.py --only aimz --epochs 2``: its first-step figure (two epochs:
  it measures steady steps/s from the second).

Each pair runs a workload cold (a new, empty per-user cache directory: ``XDG_CACHE_HOME``
pointed at a scratch folder, so the library's default cache location lands there; no
``JAX_COMPILATION_CACHE_*`` nor ``AIMZ_TRAINER_COMPILATION_CACHE`` setting) and then warm (the
same folder, as the cold run left it), workloads interleaved, ``--pairs`` times (default 3).
Every run logs JAX's compilations (``JAX_LOG_COMPILES=1``); from the log come the breakdown of
the seconds JAX spent (tracing, lowering to MLIR, XLA compilation or cache reads), the same per
program for the costliest ones (``programs``: a fit's ``set_up_once``, the one trace that
``init_with_params``, ``chunk_with_outputs`` and ``validate`` are lowered from, ``sample``;
compiles on a worker thread overlap the rest, so these do not add up to the wall) and the
cache's hits and misses.

Printed: one JSON line, with per workload the medians of cold and warm wall, the paired ratio
(median of warm / cold over the pairs), the breakdown of the last pair, the cache's size after a
cold run; the import time of ``aimz_trainer`` and of the fit's API beyond ``jax`` and
``numpyro`` (compiled bytecode present; ``-X importtime`` top modules); and the bars (warm <=
0.55x cold for the recipe; bench_fit's first step <= 2.0 s cold, <= 1.0 s warm; imports <= 0.5 s).

Run it from the repository root::

    .venv/bin/python benchmarks/bench_startup.py [--pairs 3] [--tutorial-rows 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
WARM_RATIO_BAR, FIRST_STEP_COLD_BAR_S, FIRST_STEP_WARM_BAR_S = 0.55, 2.0, 1.0

# JAX_LOG_COMPILES lines: what each compiled function cost, and whether the cache served it.
_DURATION = re.compile(
    r"Finished (?P<what>tracing|jaxpr to MLIR module conversion|XLA compilation)"
    r"(?: of)? (?:jit\()?(?P<name>[\w.<>-]+)\)?.*? in (?P<s>[0-9.]+) sec"
)
TOP_PROGRAMS = 6  # the programs of the breakdown by name: the fit's own and the costliest eager ones
_PHASES = {"tracing": "tracing_s", "jaxpr to MLIR module conversion": "lowering_s", "XLA compilation": "compile_s"}


def workload_command(name: str, args: argparse.Namespace) -> list[str]:
    python = sys.executable
    if name == "recipe":
        script = Path(python).with_name("aimz-trainer")
        return [str(script), "fit", "--recipe", "bnn_binary", "--trainer.max_epochs", "1"]
    if name == "tutorial":
        return [python, str(BENCHMARKS / "tutorial_workflow.py"), "--num-rows", str(args.tutorial_rows)]
    return [python, str(BENCHMARKS / "bench_fit.py"), "--only", "aimz", "--epochs", "2"]


def run_once(name: str, args: argparse.Namespace, cache_home: Path, workdir: Path) -> dict[str, Any]:
    """One fresh process of workload ``name``: its wall and its compile log's figures."""
    cache_settings = ("JAX_COMPILATION_CACHE", "AIMZ_TRAINER_COMPILATION_CACHE")  # the library's default decides
    env = {key: value for key, value in os.environ.items() if not key.startswith(cache_settings)}
    env.update({"XDG_CACHE_HOME": str(cache_home), "JAX_LOG_COMPILES": "1", "CI": "true"})
    env.pop("PYTHONHASHSEED", None)  # as a user's shell has it: the cache must not need one
    started = time.perf_counter()
    completed = subprocess.run(
        workload_command(name, args), cwd=workdir, env=env, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"{name} failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    figures: dict[str, Any] = {"wall_s": wall, "tracing_s": 0.0, "lowering_s": 0.0, "compile_s": 0.0}
    programs: dict[str, dict[str, float]] = {}
    for match in _DURATION.finditer(completed.stderr):
        phase, seconds = _PHASES[match["what"]], float(match["s"])
        figures[phase] += seconds
        program = programs.setdefault(match["name"], {"tracing_s": 0.0, "lowering_s": 0.0, "compile_s": 0.0})
        program[phase] += seconds
    costliest = sorted(programs.items(), key=lambda item: -sum(item[1].values()))[:TOP_PROGRAMS]
    figures["programs"] = {name: {k: round(v, 3) for k, v in phases.items()} for name, phases in costliest}
    figures["compiles"] = completed.stderr.count("Finished XLA compilation")
    figures["cache_hits"] = completed.stderr.count("Persistent compilation cache hit")
    figures["cache_misses"] = completed.stderr.count("PERSISTENT COMPILATION CACHE MISS")
    figures["other_s"] = wall - figures["tracing_s"] - figures["lowering_s"] - figures["compile_s"]
    if name == "bench_fit":
        figures["first_step_s"] = json.loads(completed.stdout.strip().splitlines()[-1])["first_step_s"]
    return figures


def directory_mib(path: Path) -> float:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file()) / 2**20


def import_figures() -> dict[str, Any]:
    """What the library's imports cost beyond ``import jax, numpyro`` (fresh processes, compiled
    bytecode present after a warm-up, 5 interleaved pairs, the median of the pairs' own
    differences): ``import aimz_trainer`` and the fit's API (``from aimz_trainer import Trainer,
    ModelCheckpoint``); and the top modules of ``-X importtime`` for the latter."""

    def timed(statement: str) -> float:
        code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
        return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)

    base = "import jax, numpyro"
    fit_api = f"{base}; from aimz_trainer import Trainer, ModelCheckpoint"
    timed(fit_api)  # bytecode written, files in the page cache
    beyond: dict[str, list[float]] = {"import_s": [], "fit_api_s": []}
    for _ in range(5):
        reference = timed(base)
        beyond["import_s"].append(timed(f"{base}; import aimz_trainer") - reference)
        beyond["fit_api_s"].append(timed(fit_api) - reference)
    profile = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", fit_api], capture_output=True, text=True, check=True
    ).stderr
    rows = []
    for line in profile.splitlines()[1:]:
        parts = [part.strip() for part in line.removeprefix("import time:").split("|")]
        if len(parts) == 3 and parts[1].isdigit():
            rows.append((int(parts[1]), parts[2]))
    top = [{"module": name.strip(), "cumulative_s": micro / 1e6} for micro, name in sorted(rows, reverse=True)[:10]]
    return {
        "import_beyond_jax_numpyro_s": statistics.median(beyond["import_s"]),
        "fit_api_beyond_jax_numpyro_s": statistics.median(beyond["fit_api_s"]),
        "top_cumulative": top,
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--tutorial-rows", type=int, default=20_000)
    parser.add_argument("--workloads", default="recipe,tutorial,bench_fit")
    args = parser.parse_args(argv)
    names = args.workloads.split(",")
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {name: {"cold": [], "warm": []} for name in names}
    cache_mib: dict[str, float] = {}
    scratch = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    try:
        for pair in range(args.pairs):
            for name in names:
                cache_home, workdir = scratch / f"{name}-{pair}" / "cache", scratch / f"{name}-{pair}" / "work"
                workdir.mkdir(parents=True)
                for kind in ("cold", "warm"):
                    figures = run_once(name, args, cache_home, workdir)
                    runs[name][kind].append(figures)
                    print(f"pair {pair} {name} {kind}: {json.dumps(figures)}", file=sys.stderr, flush=True)
                    if kind == "cold":
                        cache_mib[name] = directory_mib(cache_home)
                shutil.rmtree(scratch / f"{name}-{pair}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    result: dict[str, Any] = {"pairs": args.pairs}
    for name in names:
        cold, warm = runs[name]["cold"], runs[name]["warm"]
        result[name] = {
            "cold_wall_s": statistics.median(run["wall_s"] for run in cold),
            "warm_wall_s": statistics.median(run["wall_s"] for run in warm),
            "paired_ratio": statistics.median(w["wall_s"] / c["wall_s"] for c, w in zip(cold, warm, strict=True)),
            "cache_mib_after_cold": cache_mib[name],
            "last_cold": cold[-1],
            "last_warm": warm[-1],
        }
        if name == "bench_fit":
            result[name]["first_step_cold_s"] = statistics.median(run["first_step_s"] for run in cold)
            result[name]["first_step_warm_s"] = statistics.median(run["first_step_s"] for run in warm)
    result["import"] = import_figures()
    bars = {}
    if "recipe" in result:
        bars[f"recipe_warm/cold<={WARM_RATIO_BAR}"] = result["recipe"]["paired_ratio"] <= WARM_RATIO_BAR
    if "bench_fit" in result:
        bars[f"first_step_cold<={FIRST_STEP_COLD_BAR_S}"] = (
            result["bench_fit"]["first_step_cold_s"] <= FIRST_STEP_COLD_BAR_S
        )
        bars[f"first_step_warm<={FIRST_STEP_WARM_BAR_S}"] = (
            result["bench_fit"]["first_step_warm_s"] <= FIRST_STEP_WARM_BAR_S
        )
    bars["import_beyond<=0.5"] = result["import"]["import_beyond_jax_numpyro_s"] <= 0.5
    bars["fit_api_beyond<=0.5"] = result["import"]["fit_api_beyond_jax_numpyro_s"] <= 0.5
    result["bars"] = bars
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
