"""What ``aimz-trainer fit``, ``validate``, ``test`` and ``predict`` do with a parsed config:
build the run's Trainer (its callbacks, a ``ModelCheckpoint`` and the loggers in the run
directory), the recipe's experiment, and then fit (after writing the run's record), evaluate a
checkpoint or predict from one. The command line itself (parsing, errors, exit status) is
:mod:`aimz_trainer.cli`.

A run directory holds ``config.yaml`` and ``run.json`` (:mod:`aimz_trainer.run_record`),
``logs/``, ``checkpoints/`` and ``predictions/``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aimz_trainer.errors import CommandLineError
from aimz_trainer.recipe import Experiment, FitOutcome, PredictSettings, Recipe, RecipeContext

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser, Namespace

    from aimz_trainer.trainer import Trainer

__all__ = ["CHECKPOINTS", "LOGS", "PREDICTIONS", "execute", "finished_run", "fit_directory"]

# The folders of a run directory.
CHECKPOINTS, LOGS, PREDICTIONS = "checkpoints", "logs", "predictions"


def execute(
    name: str, declaration: Recipe, parser: ArgumentParser, config: Namespace, argv: list[str]
) -> dict[str, Any]:
    """Run the command ``name`` on the parsed ``config``; returns what it printed as a dict."""
    import jax

    from aimz_trainer.distributed import allgather_json

    reference = str(config.recipe)
    resuming = config.ckpt_path is not None
    if name == "fit":
        output_dir = Path(allgather_json(str(fit_directory(config.output_dir, reference, resuming)))[0])
    else:
        output_dir = finished_run(name, config.output_dir)
    config.output_dir = str(output_dir)
    seed_key = jax.random.key(config.seed)
    setup_key, fit_key, predict_key = jax.random.split(seed_key, 3)
    recorded = config.clone()
    recorded.ckpt_path = None  # the record describes the run; how it was (re)started is in run.json
    config_yaml = parser.dump(recorded, skip_unset=False)

    with _as_usage_error():
        instantiated = parser.instantiate(config)
        settings = instantiated.model
        trainer_args = dict(vars(instantiated.trainer))
        fit_args = dict(vars(instantiated.fit))
        checkpoint = _checkpoint(output_dir, vars(instantiated.checkpoint))
        loggers = _loggers(output_dir, list(config.loggers), config_yaml) if name != "predict" else []
        callbacks = [*trainer_args.pop("callbacks"), *loggers, checkpoint]
        trainer = _trainer(trainer_args, callbacks, fit_key)
        predict = PredictSettings(**vars(instantiated.predict))
    context = RecipeContext(
        seed=config.seed,
        rng_key=setup_key,
        output_dir=output_dir,
        max_epochs=trainer.max_epochs,
        max_steps=trainer.max_steps,
        batch_size=fit_args["batch_size"],
    )
    experiment = declaration.setup(settings, context)
    if not isinstance(experiment, Experiment):
        raise TypeError(f"recipe {reference}: setup must return an Experiment; got {type(experiment).__name__}.")
    if name == "fit":
        return _fit(declaration, settings, experiment, trainer, config, fit_args, predict, context, predict_key, argv,
                    config_yaml)  # fmt: skip
    if name in ("validate", "test"):
        return _evaluate(name, reference, experiment, trainer, config, fit_args)
    return _predict(reference, experiment, config, predict, predict_key, output_dir)


@contextlib.contextmanager
def _as_usage_error() -> Iterator[None]:
    """A value the library refuses while the run is being configured (a Trainer argument, a
    callback's) is a usage error: the config holds it."""
    from aimz_trainer.errors import ConfigurationError

    try:
        yield
    except ConfigurationError as error:
        raise CommandLineError(str(error)) from error
    except Exception as error:  # jsonargparse wraps what a class raises while it instantiates it
        cause = error.__cause__ or error.__context__
        if isinstance(cause, ConfigurationError):
            raise CommandLineError(str(cause)) from cause
        raise


def fit_directory(requested: str | None, reference: str, resuming: bool) -> Path:
    """The run directory of a fit: ``requested``; else the newest ``runs/NAME/run-*`` when
    resuming, a new ``runs/NAME/run-TIME`` otherwise. A directory that holds checkpoints is
    only reused to continue it (``--ckpt_path``)."""
    runs = Path("runs") / Path(reference).stem
    if requested is None and resuming:
        earlier = sorted(runs.glob("run-*"))
        if not earlier:
            raise CommandLineError(f"--ckpt_path found no earlier run in {runs}/: pass --output_dir RUN_DIR.")
        return earlier[-1]
    if requested is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        directory, count = runs / f"run-{stamp}", 1
        while directory.exists():
            count += 1
            directory = runs / f"run-{stamp}-{count}"
        return directory
    directory = Path(requested)
    if not resuming and any(step.name.isdigit() for step in (directory / CHECKPOINTS).glob("*")):
        raise CommandLineError(
            f"{directory} holds checkpoints of an earlier run: continue it with --ckpt_path last, or pass another "
            "--output_dir."
        )
    return directory


def finished_run(name: str, requested: str | None) -> Path:
    """The run directory that ``validate``/``test``/``predict`` read."""
    if requested is None:
        raise CommandLineError(
            f"{name} reads a finished run: pass --config RUN_DIR/config.yaml (the run's own config) or --output_dir "
            "RUN_DIR."
        )
    directory = Path(requested)
    if not (directory / CHECKPOINTS).is_dir():
        raise CommandLineError(f"--output_dir {directory} holds no {CHECKPOINTS}/ folder: it is not a run's directory.")
    return directory


def _checkpoint(output_dir: Path, settings: Mapping[str, Any]) -> Any:
    from aimz_trainer import ModelCheckpoint

    return ModelCheckpoint(output_dir / CHECKPOINTS, **settings)


def _loggers(output_dir: Path, names: Sequence[str], config_yaml: str) -> list[Any]:
    import yaml

    from aimz_trainer import CSVLogger, TensorBoardLogger
    from aimz_trainer.run_record import flat_hparams

    loggers: list[Any] = []
    if "tensorboard" in names:
        loggers.append(TensorBoardLogger(output_dir / LOGS, hparams=flat_hparams(yaml.safe_load(config_yaml))))
    if "csv" in names:
        loggers.append(CSVLogger(output_dir / LOGS / "metrics.csv"))
    return loggers


def _trainer(arguments: dict[str, Any], callbacks: list[Any], rng_key: Any) -> Trainer:
    from aimz_trainer import Trainer

    return Trainer(rng_key=rng_key, callbacks=callbacks, **arguments)


def _fit(
    declaration: Recipe,
    settings: Any,
    experiment: Experiment,
    trainer: Trainer,
    config: Namespace,
    fit_args: dict[str, Any],
    predict: PredictSettings,
    context: RecipeContext,
    predict_key: Any,
    argv: list[str],
    config_yaml: str,
) -> dict[str, Any]:
    import jax

    from aimz_trainer.run_record import CONFIG_FILE, write_run_record

    output_dir = context.output_dir
    if jax.process_index() == 0:
        write_run_record(output_dir, config_yaml, argv)
    result = trainer.fit(
        experiment.svi,
        experiment.train_data,
        val_data=experiment.val_data,
        ckpt_path=config.ckpt_path,
        **fit_args,
    )
    outcome = FitOutcome(experiment, trainer, result, context, predict, output_dir / PREDICTIONS, predict_key)
    if declaration.report is not None:
        summary = dict(declaration.report(settings, outcome))
    else:
        summary = {"steps": int(result.losses.size), "final_loss": float(result.losses[-1])}
        metrics = ", ".join(f"{key} {value:.4g}" for key, value in sorted(trainer.callback_metrics.items()))
        print(f"{Path(config.recipe).stem}: {summary['steps']} steps, final loss {summary['final_loss']:,.4g}")
        print(f"metrics: {metrics}")
    summary["output_dir"] = str(output_dir)
    print(f"{Path(config.recipe).stem} wrote:")
    print(f"  config: {output_dir / CONFIG_FILE}")
    for folder in (LOGS, CHECKPOINTS, PREDICTIONS):
        if (output_dir / folder).exists():
            print(f"  {folder}: {output_dir / folder}")
    return summary


def _evaluate(
    name: str, reference: str, experiment: Experiment, trainer: Trainer, config: Namespace, fit_args: Mapping[str, Any]
) -> dict[str, Any]:
    import json

    data = experiment.val_data if name == "validate" else experiment.test_data
    if data is None:
        kind = "validation" if name == "validate" else "test"
        raise CommandLineError(f"recipe {reference} has no {kind} data: its setup returns {kind[:4]}_data=None.")
    evaluate = trainer.validate if name == "validate" else trainer.test
    metrics = evaluate(
        experiment.svi,
        data,
        ckpt_path=config.ckpt_path if config.ckpt_path is not None else "last",
        batch_size=fit_args.get("val_batch_size"),
        num_samples=fit_args.get("val_num_samples", 20),
    )
    print(json.dumps(metrics))
    return dict(metrics)


def _predict(
    reference: str,
    experiment: Experiment,
    config: Namespace,
    predict: PredictSettings,
    predict_key: Any,
    output_dir: Path,
) -> dict[str, Any]:
    import jax
    import numpy as np

    from aimz_trainer import Predictor, load_checkpoint
    from aimz_trainer.plates import model_layout

    ckpt_path = config.ckpt_path if config.ckpt_path is not None else "last"
    if ckpt_path == "last":
        source = output_dir / CHECKPOINTS
    elif isinstance(ckpt_path, int):
        source = output_dir / CHECKPOINTS / str(ckpt_path)
    else:
        source = Path(ckpt_path)
    checkpoint = load_checkpoint(source)
    svi = experiment.svi
    data = dict(experiment.predict_data if experiment.predict_data is not None else experiment.train_data)
    static = dict(getattr(svi, "static_kwargs", {}) or {})
    # The guide is set up, and its global sites found, on training rows: with their observed
    # values, which prediction rows may lack.
    train = experiment.train_data
    # Only the first rows are read: the training data may be on disk (aimz_trainer.data).
    rows = min(int(np.shape(next(iter(train.values())))[0]), predict.batch_size)
    first = {key: np.asarray(value[:rows]) for key, value in train.items()}
    layout = model_layout(svi.model, train, batch_rows=rows, static_kwargs=static)
    draw_key, predict_key = jax.random.split(predict_key)
    draws = checkpoint.sample_posterior(svi.guide, predict.num_samples, draw_key, **first, **static)
    posterior = {site: value for site, value in draws.items() if site in layout.global_sites}
    local = {"guide": svi.guide, "params": checkpoint.params} if layout.local_sites else {}
    predictor = Predictor(svi.model, posterior, rng_key=predict_key, static_kwargs=static, **local)
    store = predictor.predict(
        data, batch_size=predict.batch_size, output_dir=output_dir / PREDICTIONS, in_sample=predict.in_sample
    )
    path = store.attrs["store_path"]
    group = "posterior_predictive" if predict.in_sample else "predictions"
    shapes = {site: tuple(store[group][site].shape) for site in store[group].data_vars}
    name = Path(reference).stem
    print(f"{name}: {predict.num_samples} draws from checkpoint {checkpoint.path} (step {checkpoint.step})")
    print(f"predictions: {path} ({', '.join(f'{site} {shape}' for site, shape in shapes.items())})")
    return {"store": path, "checkpoint": str(checkpoint.path), "shapes": shapes}
