"""``import aimz_trainer`` loads its errors only; the fit's API loads jax and numpyro, not the
libraries only some runs use (orbax, Grain, TensorBoard's writer, prediction's xarray and zarr,
...): those are imported where first needed. The public names still resolve, and their type
hints still evaluate (the command line reads them)."""

from __future__ import annotations

import inspect
import subprocess
import sys
import typing

import pytest

import aimz_trainer
import aimz_trainer.callbacks

# Libraries a run imports only when it writes a checkpoint, builds a fit's loader, logs to
# TensorBoard or MLflow, predicts, or parses a command line.
DEFERRED = (
    "arviz",
    "grain",
    "jsonargparse",
    "mlflow",
    "optax",
    "orbax",
    "pandas",
    "tensorboard",
    "tensorboardX",
    "tensorstore",
    "xarray",
    "zarr",
)

# Built by the Trainer, not by a user: its hints name the loop's internals, imported for type
# checkers only.
BUILT_BY_THE_TRAINER = {"FitContext"}


def loaded_after(statement: str) -> set[str]:
    """The top-level modules a fresh process has loaded after ``statement``."""
    probe = f"import sys; {statement}; print(' '.join(sorted({{name.split('.')[0] for name in sys.modules}})))"
    completed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    return set(completed.stdout.split())


def test_import_loads_nothing_but_the_errors():
    loaded = loaded_after("import aimz_trainer")
    assert "aimz_trainer" in loaded
    assert sorted(loaded.intersection({"jax", "numpyro", *DEFERRED})) == []


def test_the_fit_api_leaves_the_deferred_libraries_unloaded():
    loaded = loaded_after("from aimz_trainer import Callback, EarlyStopping, ModelCheckpoint, Trainer, make_mesh")
    assert "jax" in loaded and "numpyro" in loaded
    assert sorted(loaded.intersection(DEFERRED)) == []


@pytest.mark.parametrize("module", [aimz_trainer, aimz_trainer.callbacks], ids=lambda module: module.__name__)
def test_every_public_name_resolves(module):
    missing = [name for name in module.__all__ if getattr(module, name, None) is None]
    assert missing == []


def public_callables() -> list[tuple[str, object]]:
    """The constructor of every public class that defines one, every public function, and the
    main methods."""
    callables = {}
    for module in (aimz_trainer, aimz_trainer.callbacks):
        for name in module.__all__:
            value = getattr(module, name)
            if inspect.isclass(value) and inspect.isfunction(value.__init__) and name not in BUILT_BY_THE_TRAINER:
                callables[f"{name}.__init__"] = value.__init__
            elif inspect.isfunction(value):
                callables[name] = value
    trainer, predictor = aimz_trainer.Trainer, aimz_trainer.Predictor
    methods = [trainer.fit, trainer.validate, trainer.test, predictor.predict, aimz_trainer.ImpactModel.fit]
    callables.update({method.__qualname__: method for method in methods})
    return sorted(callables.items())


@pytest.mark.parametrize(("name", "function"), public_callables(), ids=[name for name, _ in public_callables()])
def test_type_hints_evaluate(name, function):
    typing.get_type_hints(function)  # raises NameError for a name imported for type checkers only
