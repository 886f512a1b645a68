"""Scaling benchmark: fit and predict throughput over processes x devices on this machine.

Setting: the fit benchmark's model (``recipes/bnn_binary.py``: flax nnx MLP d -> 32 -> 32 -> 1,
AutoNormal, Adam, Trace_ELBO) on n=100,000 rows x d=100, global batch 2,000 (50 steps an
epoch), ``--epochs`` epochs (default 50: a step takes under a millisecond on one device, and
the steady figure needs a second or more of steps), 100 posterior draws; then the
:class:`~aimz_trainer.Predictor` on the trainer's mesh over 20,000 of the rows x those 100
draws, batches of 10,000 rows, written to a Zarr store in a directory every process shares.

Configurations, ``PROCESSES x DEVICES PER PROCESS`` (``--configs``, default ``1x1,1x2,2x1``):

- **1x1**: one process, one CPU device (``--xla_force_host_platform_device_count=1``);
- **1x2**: one process, two CPU devices: the batch is split over them and the gradient is
  all-reduced inside the process;
- **2x1**: two processes of one ``jax.distributed`` run over loopback, one device each, started
  by :func:`aimz_trainer.distributed.launch` (each calls
  :func:`aimz_trainer.distributed.initialize` first): the same mesh as 1x2, but the all-reduce
  goes through gloo over TCP. Process 0 reports the figures.

The machine has 2 cores: more devices share the same cores, so this measures the overhead of
splitting a step, not a speed-up. Two processes on two cores are also the configuration most
hurt by anything else running: a peer that is descheduled stalls every all-reduce, so the
1-minute load average before and after is reported with the figures.

Figures, per configuration (medians over ``--repeats`` fresh runs):

- ``fit_steps_per_sec``: steady steps/s, from the times of the chunk ends after the first
  epoch (as in ``bench_fit.py``);
- ``predict_rows_draws_per_sec``: rows x draws per second of ``Predictor.predict`` over the
  prediction rows, after a warm-up call on one batch (compilation excluded), Zarr writes
  included; ``null``, with the error under ``errors``, where ``predict`` fails;
- ratios of both to 1x1; ``final_loss`` (the same data, seed and global batches everywhere:
  the configurations agree up to the order of float sums);
- ``allreduce_latency_s`` and ``allreduce_step_s`` (meshes of 2 devices): one all-reduce alone
  on the mesh, of one float and of the step's own buffers, timed as 300 ``psum`` in one
  compiled loop.

And across them:

- ``overhead_s_per_step``: seconds per step of 2x1 minus 1x2 (the same two devices, the
  collective over gloo/TCP instead of in-process), of 1x2 minus 1x1 (splitting the step over
  two devices at all) and of 2x1 minus 1x1;
- what a step communicates, read from the optimized HLO of the compiled training chunk (the
  collectives inside its scan body, which runs once per step; through the trainer's private
  ``_run.chunk_fn``, ``null`` if that moves): ``step_collectives`` (ops, buffers, bytes per
  kind) and ``allreduce_bytes_per_step``. For comparison, ``params_bytes`` is the size of the
  variational parameters (AutoNormal's locs and scales), which a data-parallel step *could*
  all-reduce the gradient of; XLA all-reduces the gradient with respect to the sampled network
  weights instead (half as many floats, every device draws the same weights), plus the loss.

Every run is a fresh subprocess of this script (``--only 1x2`` runs one configuration's worker,
``--launch 2x1`` starts its processes), in a session of its own bounded by ``--timeout-s``: a
hung collective kills the whole run and is reported as that configuration's error, with the
figures it printed before (fit figures are printed before prediction starts). The
configurations alternate in order between repeats: machine drift hits them alike. Other
``XLA_FLAGS`` in the environment are passed to every run (and reported as ``xla_flags``).

Run it from the repository root (about 1.5 minutes on an idle 2-core machine)::

    .venv/bin/python benchmarks/bench_scaling.py [--epochs 50] [--repeats 1]

It prints one JSON line with all figures on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench_fit import chunk_clock, forwarded, load_recipe, steady_steps_per_sec

CONFIGS = ("1x1", "1x2", "2x1")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=50, help="fit epochs (at least 2: the first is not timed)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each configuration (medians reported)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="PROCESSESxDEVICES, comma-separated")
    parser.add_argument("--num-rows", type=int, default=100_000)
    parser.add_argument("--num-features", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--draws", type=int, default=100, help="posterior draws, predicted for every row")
    parser.add_argument("--predict-rows", type=int, default=20_000)
    parser.add_argument("--predict-batch-size", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout-s", type=float, default=300.0, help="wall limit of one configuration's run")
    parser.add_argument("--only", help="run one configuration's worker in this process (internal)")
    parser.add_argument("--launch", help="start one configuration's processes (internal)")
    parser.add_argument("--output-dir", help="where the prediction stores go (internal: shared by the processes)")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: steady steps/s are timed after the first epoch")
    if args.predict_rows > args.num_rows:
        parser.error("--predict-rows must be at most --num-rows: the predictions are over training rows")
    return args


def parse_config(config: str) -> tuple[int, int]:
    """``"2x1"`` -> ``(2, 1)``: processes, devices per process."""
    processes, _, devices = config.partition("x")
    if not (processes.isdigit() and devices.isdigit() and int(processes) >= 1 and int(devices) >= 1):
        raise SystemExit(f"a configuration is PROCESSESxDEVICES, e.g. 2x1; got {config!r}")
    return int(processes), int(devices)


def emit(figures: dict[str, Any]) -> None:
    """Print one JSON line on stdout (process 0 only): the parent merges every line it gets."""
    import jax

    if jax.process_index() == 0:
        print(json.dumps(figures), flush=True)


COLLECTIVE = re.compile(
    r"^\s*(?:ROOT )?%\S+ = (.+?) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)\((.*)$"
)
ARRAY_TYPE = re.compile(r"\b(pred|[a-z]+\d+)\[([\d,]*)\]")
ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f64": 8, "s64": 8, "u64": 8}


def step_collectives(hlo: str) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
    """The collectives of a compiled chunk that run once per step (inside the scan's body),
    from its optimized HLO: ``(op kind, [(dtype, shape) of each buffer]), ...``."""
    found = []
    for line in hlo.splitlines():
        match = COLLECTIVE.match(line)
        if match is not None and "while/body" in match.group(3):
            buffers = [
                (dtype, tuple(int(d) for d in dims.split(",") if d))
                for dtype, dims in ARRAY_TYPE.findall(match.group(1))
            ]
            found.append((match.group(2), buffers))
    return found


def summarize_collectives(collectives: list[tuple[str, list[tuple[str, tuple[int, ...]]]]]) -> dict[str, Any]:
    """Op kind -> ops, buffers and bytes per step."""
    summary: dict[str, dict[str, int]] = {}
    for kind, buffers in collectives:
        entry = summary.setdefault(kind, {"ops": 0, "buffers": 0, "bytes": 0})
        entry["ops"] += 1
        entry["buffers"] += len(buffers)
        entry["bytes"] += sum(ITEMSIZE.get(dtype, 4) * math.prod(shape) for dtype, shape in buffers)
    return summary


def allreduce_seconds(mesh: Any, shapes: Sequence[tuple[int, ...]], repeats: int = 300) -> float:
    """Seconds per all-reduce of float32 buffers of ``shapes`` (one op, as XLA combines them)
    over the mesh: ``repeats`` ``psum`` in a loop inside one compiled call, so no dispatch."""
    import jax
    import numpy as np
    from jax import lax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    def loop(*blocks: jax.Array) -> tuple[jax.Array, ...]:
        def body(_: Any, values: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            return tuple(value / mesh.size for value in lax.psum(values, "data"))

        return lax.fori_loop(0, repeats, body, blocks)

    sharding = NamedSharding(mesh, P("data"))
    reduce = jax.jit(jax.shard_map(loop, mesh=mesh, in_specs=P("data"), out_specs=P("data"), check_vma=False))
    blocks = []
    for shape in shapes:
        ones = np.ones((mesh.size, *shape), np.float32)
        blocks.append(jax.make_array_from_callback(ones.shape, sharding, lambda index, ones=ones: ones[index]))
    jax.block_until_ready(reduce(*blocks))  # compile
    started = time.perf_counter()
    jax.block_until_ready(reduce(*blocks))
    return (time.perf_counter() - started) / repeats


def run_worker(args: argparse.Namespace) -> None:
    """Fit, then predict, on every device of every process of this run; figures as they come.

    The fit figures are printed before prediction starts, so a prediction that fails or hangs
    still leaves them to the parent.
    """
    from aimz_trainer import distributed

    distributed.initialize()  # before any other use of JAX; nothing for one process

    import jax

    processes, devices = parse_config(args.only)
    if (jax.process_count(), jax.local_device_count()) != (processes, devices):
        raise SystemExit(
            f"configuration {args.only} but JAX sees {jax.process_count()} process(es) x "
            f"{jax.local_device_count()} device(s): check XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
        )

    from aimz_trainer import Predictor, Trainer

    recipe = load_recipe(with_trainer=True)
    key_data, key_net, key_fit, key_predict = jax.random.split(jax.random.key(args.seed), 4)
    X, y, _ = recipe.make_data(args.num_rows, args.num_features, key_data)
    model = recipe.make_model(args.num_rows, args.num_features, args.hidden, key_net)
    svi = recipe.make_svi(model)
    clock = chunk_clock()
    trainer = Trainer(max_epochs=args.epochs, rng_key=key_fit, callbacks=[clock], enable_progress_bar=False)
    started = time.perf_counter()
    result = trainer.fit(svi, {"X": X, "y": y}, batch_size=args.batch_size, num_samples=args.draws)
    jax.block_until_ready(result.posterior)
    fit_wall = time.perf_counter() - started
    # A data-parallel step could all-reduce the gradient of the optimizer's parameters ...
    param_leaves = jax.tree.leaves(svi.optim.get_params(result.state.optim_state))
    # ... what it does all-reduce is in the compiled chunk's scan body.
    chunk_fn = getattr(getattr(trainer, "_run", None), "chunk_fn", None)  # private: None if it moves
    collectives = step_collectives(chunk_fn.as_text()) if hasattr(chunk_fn, "as_text") else None
    summary = None if collectives is None else summarize_collectives(collectives)
    emit(
        {
            "config": args.only,
            "processes": jax.process_count(),
            "devices": trainer.mesh.size,
            "steps": int(result.losses.size),
            "final_loss": float(result.losses[-1]),
            "fit_steps_per_sec": steady_steps_per_sec(clock.marks, trainer.steps_per_epoch),
            "fit_first_step_s": trainer.timings["first_chunk_s"],
            "fit_wall_s": fit_wall,
            "num_params": sum(int(leaf.size) for leaf in param_leaves),
            "params_bytes": sum(int(leaf.size) * leaf.dtype.itemsize for leaf in param_leaves),
            "step_collectives": summary,
            "allreduce_bytes_per_step": None if summary is None else sum(e["bytes"] for e in summary.values()),
            "placement": trainer.placement,
            "jax_version": jax.__version__,
        }
    )
    if trainer.mesh.size > 1:
        # The collective alone: one float (latency), and the step's own buffers.
        step_shapes = [shape for kind, buffers in collectives or [] if kind == "all-reduce" for _, shape in buffers]
        emit(
            {
                "allreduce_latency_s": allreduce_seconds(trainer.mesh, [(1,)]),
                "allreduce_step_s": allreduce_seconds(trainer.mesh, step_shapes) if step_shapes else None,
            }
        )

    X_predict = X[: args.predict_rows]
    predictor = Predictor(model, result.posterior, mesh=trainer.mesh, rng_key=key_predict)
    try:
        # Warm-up on one batch: compilation is not part of the throughput.
        batch = args.predict_batch_size
        predictor.predict({"X": X_predict[:batch]}, batch_size=batch, output_dir=args.output_dir)
        started = time.perf_counter()
        tree = predictor.predict({"X": X_predict}, batch_size=batch, output_dir=args.output_dir)
        wall = time.perf_counter() - started
        shape = tuple(tree["posterior_predictive"]["y"].shape)
        if shape != (1, args.draws, args.predict_rows):
            raise AssertionError(f"expected y of shape (1, {args.draws}, {args.predict_rows}); got {shape}")
        emit({"predict_wall_s": wall, "predict_rows_draws_per_sec": args.predict_rows * args.draws / wall})
    except Exception as error:  # reported as this configuration's figure, not a crash
        traceback.print_exc()
        frames = [f for f in traceback.extract_tb(error.__traceback__) if "aimz_trainer" in f.filename]
        where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
        emit({"predict_rows_draws_per_sec": None, "predict_error": f"{type(error).__name__}: {error}{where}"})
    finally:
        predictor.cleanup()


def worker_arguments(args: argparse.Namespace, output_dir: str) -> list[str]:
    names = (
        "epochs", "num_rows", "num_features", "hidden", "batch_size",
        "draws", "predict_rows", "predict_batch_size", "seed",
    )  # fmt: skip
    return [*forwarded(args, *names), "--output-dir", output_dir]


def run_launcher(args: argparse.Namespace) -> int:
    """Start the configuration's processes with :func:`aimz_trainer.distributed.launch`."""
    from aimz_trainer import distributed

    processes, devices = parse_config(args.launch)
    worker = ["--only", args.launch, *worker_arguments(args, args.output_dir)]
    command = [sys.executable, str(Path(__file__).resolve()), *worker]
    return distributed.launch(command, processes, local_devices=devices, grace_s=10.0)


def spawn(config: str, args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in fresh processes, bounded by ``--timeout-s``.

    Returns the merged JSON lines that process 0 printed, plus ``error`` when the run failed
    or timed out (with the end of its stderr).
    """
    processes, devices = parse_config(config)
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f)
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        # First: XLA stops reading its flags at one it does not know.
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {flags}".strip(),
    }
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as output_dir:
        mode = ["--launch", config] if processes > 1 else ["--only", config]
        command = [sys.executable, str(Path(__file__).resolve()), *mode, *worker_arguments(args, output_dir)]
        # A session of its own: on a timeout, the launcher and every worker it started go together.
        child = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
        )
        error = None
        try:
            stdout, stderr = child.communicate(timeout=args.timeout_s)
            if child.returncode != 0:
                error = f"exit status {child.returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            stdout, stderr = child.communicate()
            error = f"timed out after {args.timeout_s:.0f} s"
    figures: dict[str, Any] = {"config": config}
    for line in stdout.splitlines():
        if line.startswith("{"):
            figures.update(json.loads(line))
    if error is not None:
        tail = [line for line in stderr.splitlines() if line.strip()][-5:]
        figures["error"] = f"{error}: " + " | ".join(tail) if tail else error
    return figures


def median(runs: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [run[key] for run in runs if run.get(key) is not None]
    return statistics.median(values) if values else None


def difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Alternate fresh runs of the configurations; medians, ratios to 1x1 and overheads."""
    configs = [config.strip() for config in args.configs.split(",") if config.strip()]
    for config in configs:
        parse_config(config)
    runs: dict[str, list[dict[str, Any]]] = {config: [] for config in configs}
    load_before = os.getloadavg()[0]  # other work on the machine shows here
    for repeat in range(args.repeats):
        for config in configs if repeat % 2 == 0 else configs[::-1]:
            started = time.perf_counter()
            run = spawn(config, args)
            run["cold_wall_s"] = time.perf_counter() - started
            runs[config].append(run)
            fit = run.get("fit_steps_per_sec")
            predict = run.get("predict_rows_draws_per_sec")
            print(
                f"[{repeat + 1}/{args.repeats}] {config}: "
                + (f"fit {fit:,.1f} steps/s steady" if fit is not None else "fit failed")
                + (f", predict {predict / 1e6:,.2f} M rows x draws/s" if predict is not None else ", predict failed")
                + f", {run['cold_wall_s']:.1f} s"
                + "".join(f"\n  {key}: {run[key]}" for key in ("predict_error", "error") if key in run),
                file=sys.stderr,
            )

    figures: dict[str, Any] = {
        "benchmark": "scaling",
        "n": args.num_rows,
        "num_features": args.num_features,
        "hidden": args.hidden,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "draws": args.draws,
        "predict_rows": args.predict_rows,
        "predict_batch_size": args.predict_batch_size,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),  # besides the device count, passed to every run
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "configs": {},
    }
    base = configs[0] if "1x1" not in configs else "1x1"
    base_fit = median(runs[base], "fit_steps_per_sec")
    base_predict = median(runs[base], "predict_rows_draws_per_sec")
    seconds_per_step: dict[str, float | None] = {}
    for config, config_runs in runs.items():
        fit, predict = median(config_runs, "fit_steps_per_sec"), median(config_runs, "predict_rows_draws_per_sec")
        seconds_per_step[config] = None if fit is None else 1.0 / fit
        entry: dict[str, Any] = {
            "fit_steps_per_sec": fit,
            "predict_rows_draws_per_sec": predict,
            f"fit_ratio_to_{base}": ratio(fit, base_fit),
            f"predict_ratio_to_{base}": ratio(predict, base_predict),
            "fit_first_step_s": median(config_runs, "fit_first_step_s"),
            "final_loss": config_runs[-1].get("final_loss"),
            "allreduce_latency_s": median(config_runs, "allreduce_latency_s"),
            "allreduce_step_s": median(config_runs, "allreduce_step_s"),
            "cold_wall_s": median(config_runs, "cold_wall_s"),
            "runs": {
                key: [run.get(key) for run in config_runs]
                for key in ("fit_steps_per_sec", "predict_rows_draws_per_sec", "cold_wall_s")
            },
        }
        errors = [run[key] for run in config_runs for key in ("predict_error", "error") if key in run]
        if errors:
            entry["errors"] = errors
        figures["configs"][config] = entry

    # Per-step overheads in seconds (positive: the second configuration is slower per step).
    figures["overhead_s_per_step"] = {
        "2x1_minus_1x2": difference(seconds_per_step.get("2x1"), seconds_per_step.get("1x2")),
        "1x2_minus_1x1": difference(seconds_per_step.get("1x2"), seconds_per_step.get("1x1")),
        "2x1_minus_1x1": difference(seconds_per_step.get("2x1"), seconds_per_step.get("1x1")),
    }
    sample = next((run for config_runs in runs.values() for run in config_runs if "num_params" in run), {})
    figures["num_params"] = sample.get("num_params")
    figures["params_bytes"] = sample.get("params_bytes")
    # The collectives of a step are the same for any mesh of more than one device.
    split = [run for config, config_runs in runs.items() for run in config_runs if run.get("devices", 1) > 1]
    figures["step_collectives"] = split[0].get("step_collectives") if split else None
    figures["allreduce_bytes_per_step"] = split[0].get("allreduce_bytes_per_step") if split else None
    figures["jax_version"] = sample.get("jax_version")
    figures["python"] = platform.python_version()
    overheads = ", ".join(
        f"{name} {value * 1e3:+.2f} ms" for name, value in figures["overhead_s_per_step"].items() if value is not None
    )
    latencies = ", ".join(
        f"{config} {entry['allreduce_step_s'] * 1e3:,.2f} ms (one float: {entry['allreduce_latency_s'] * 1e3:,.2f} ms)"
        for config, entry in figures["configs"].items()
        if entry["allreduce_step_s"] is not None and entry["allreduce_latency_s"] is not None
    )
    print(
        f"overhead per step: {overheads or 'n/a'}; all-reduced per step: {figures['allreduce_bytes_per_step']} bytes "
        f"(the variational parameters: {figures['num_params']} floats, {figures['params_bytes']} bytes); "
        f"one such all-reduce alone: {latencies or 'n/a'}",
        file=sys.stderr,
    )
    return figures


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.launch:
        sys.exit(run_launcher(args))
    if args.only:
        run_worker(args)
        return
    print(json.dumps(compare(args)), flush=True)


if __name__ == "__main__":
    main()
