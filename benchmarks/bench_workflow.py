"""Workflow benchmark: the reference tutorial end to end, ``aimz_trainer.ImpactModel`` against aimz.

Setting: the reference library's tutorial (``/work/shared/reference/tutorial.rst``) at full
size on this machine, CPU backend: n=1,000,000 x d=100 synthetic binary data, the flax nnx
BNN 100 -> 32 -> 32 -> 1 with a Normal prior (``random_nnx_module``) inside
``plate("data", size=n, subsample_size=len(X))``, ``ImpactModel(model, rng_key=...,
inference=SVI(AutoNormal, adam(1e-3), Trace_ELBO))``, then
``im.fit(X, y, num_samples=500, batch_size=2000, epochs=10, progress=False)`` (5,000 steps
and 500 posterior draws), ``dt = im.predict(X, batch_size=100_000)`` (500 draws of ``y`` and
``p`` for every row, streamed to Zarr) and ``im.cleanup()``. The tutorial's code lives in
``tutorial_workflow.py``; the same file runs under either library, with only the module that
provides ``ImpactModel`` changed.

Every run is a fresh subprocess of ``tutorial_workflow.py``: ours with this interpreter
(``aimz_trainer``), the reference (aimz 0.17.0) with ``--reference-python`` (default
``/work/aimz-ref-env/bin/python`` when it exists), alternating, ``--repeats`` times; medians
are reported. Per library:

- ``fit_s``: the ``im.fit`` call; ``predict_s``: the ``im.predict`` call (Zarr writes
  included) plus a check of the returned shapes; ``end_to_end_s``: from the tutorial's first
  statement (its imports) to after ``im.cleanup()``; ``process_wall_s``: from the process's
  creation (interpreter start-up included) to the same point; ``spawn_to_exit_s``: measured
  here, from spawn to exit (teardown included);
- peak RSS growth (MiB) of fit, predict and end to end: RSS sampled every 10 ms during the
  phase minus RSS just before it; for end to end also ``ru_maxrss`` minus the RSS before the
  tutorial's imports (exact; the bar uses the larger of the two). At full size the tutorial's
  own data creation (``random.normal`` of 1,000,000 x 100 and its temporaries) already peaks
  about 1.6 GiB above the start, whatever the library, and predict peaks about as high; each
  run reports the phase that held the peak (``end_to_end_peak_phase``) and ``data_rss_growth_mib``.

Also reported: ours / reference ratios, and, when the reference was not run, the figures of
``/work/shared/reference/baseline.md`` for context (another machine and other settings: see
``BASELINE``).

The bars (reported, not asserted):

- ``end_to_end_faster_than_reference``: our median ``end_to_end_s`` below the reference's
  (``null`` when the reference was not run);
- ``peak_rss_growth_below_2GiB``: our end-to-end peak RSS growth below 2,048 MiB.

Run it from the repository root (full size takes a few minutes per run)::

    .venv/bin/python benchmarks/bench_workflow.py [--repeats 1] [--num-rows 1000000] [--reference-python PATH]

It prints one JSON line on stdout; progress (and the runs' own output) goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORKFLOW = HERE / "tutorial_workflow.py"
DEFAULT_REFERENCE_PYTHON = Path("/work/aimz-ref-env/bin/python")
RSS_BAR_MIB = 2048.0
FIGURES = (
    "fit_s",
    "predict_s",
    "end_to_end_s",
    "process_wall_s",
    "spawn_to_exit_s",
    "fit_rss_growth_mib",
    "predict_rss_growth_mib",
    "end_to_end_rss_growth_mib",
)

# From /work/shared/reference/baseline.md (aimz 0.17.0 on another 2-core VM, 2026-11-24, jax
# 0.12.0.1, CPU). Context only: none of these is the tutorial's exact setting.
BASELINE = {
    "source": "/work/shared/reference/baseline.md",
    # Fit: n=100,000, batch 2,000, 3 epochs (150 steps), 500 draws; the tutorial runs 5,000 steps.
    "fit_steady_steps_per_s": 681,
    "fit_cold_process_wall_s_150_steps": 19.7,
    "fit_s_before_first_step_finished": 13.4,
    # Predict with the tutorial's batch_size=100_000, but 1,000 draws (the tutorial has 500).
    "predict_s_1m_rows_1000_draws_batch_100k": 88.6,
    "predict_rss_growth_mib_1m_rows_1000_draws_batch_100k": 1.3 * 1024,
    "predict_s_100k_rows_1000_draws_batch_100k": 9.4,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each library (medians reported)")
    parser.add_argument("--num-rows", type=int, default=1_000_000)
    parser.add_argument(
        "--reference-python",
        type=Path,
        help=f"an interpreter with aimz installed (default {DEFAULT_REFERENCE_PYTHON} when it exists)",
    )
    parser.add_argument("--no-reference", action="store_true", help="run ours only")
    parser.add_argument("--no-ours", action="store_true", help="run the reference only")
    return parser.parse_args(argv)


def spawn(python: str, module: str, num_rows: int) -> dict[str, Any]:
    """One run of the tutorial in a fresh process; its own output goes to stderr."""
    with tempfile.TemporaryDirectory(prefix="bench-workflow-") as directory:
        output = Path(directory) / "figures.json"
        command = [python, str(WORKFLOW), "--module", module, "--num-rows", str(num_rows), "--output", str(output)]
        started = time.perf_counter()
        subprocess.run(command, stdout=sys.stderr, check=True, cwd=HERE.parent)
        spawn_to_exit = time.perf_counter() - started
        figures = json.loads(output.read_text())
    figures["spawn_to_exit_s"] = spawn_to_exit
    figures["end_to_end_rss_growth_mib"] = max(
        figures["end_to_end_rss_growth_mib"], figures["end_to_end_rss_growth_ru_maxrss_mib"]
    )
    return figures


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {name: statistics.median(run[name] for run in runs) for name in FIGURES}
    extra = ("imports_s", "data_s", "model_s", "cleanup_s", "data_rss_growth_mib", "end_to_end_peak_phase")
    summary["runs"] = [{name: run[name] for name in (*FIGURES, *extra)} for run in runs]
    summary["versions"] = runs[0]["versions"]
    summary["python"] = runs[0]["python"]
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    reference_python = args.reference_python
    if reference_python is None and DEFAULT_REFERENCE_PYTHON.exists():
        reference_python = DEFAULT_REFERENCE_PYTHON
    libraries: list[tuple[str, str, str]] = []
    if not args.no_ours:
        libraries.append(("ours", sys.executable, "aimz_trainer"))
    if reference_python is not None and not args.no_reference:
        libraries.append(("reference", str(reference_python), "aimz"))

    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in libraries}
    for repeat in range(args.repeats):
        for label, python, module in libraries if repeat % 2 == 0 else libraries[::-1]:
            print(f"[{repeat + 1}/{args.repeats}] {label} ({module}), n={args.num_rows:,}", file=sys.stderr, flush=True)
            run = spawn(python, module, args.num_rows)
            runs[label].append(run)
            print(
                f"[{repeat + 1}/{args.repeats}] {label}: fit {run['fit_s']:.1f} s, predict {run['predict_s']:.1f} s, "
                f"end to end {run['end_to_end_s']:.1f} s, +{run['end_to_end_rss_growth_mib']:.0f} MiB",
                file=sys.stderr,
                flush=True,
            )

    figures: dict[str, Any] = {"benchmark": "workflow", "num_rows": args.num_rows, "repeats": args.repeats}
    for label, label_runs in runs.items():
        figures[label] = summarise(label_runs)
    ours, reference = figures.get("ours"), figures.get("reference")
    if ours is not None and reference is not None:
        figures["ratios_ours_over_reference"] = {
            name: ours[name] / reference[name] if reference[name] else None for name in FIGURES
        }
    if reference is None:
        figures["baseline"] = BASELINE
    figures["bars_met"] = {
        "end_to_end_faster_than_reference": (
            ours["end_to_end_s"] < reference["end_to_end_s"] if ours is not None and reference is not None else None
        ),
        "peak_rss_growth_below_2GiB": ours["end_to_end_rss_growth_mib"] < RSS_BAR_MIB if ours is not None else None,
    }
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
