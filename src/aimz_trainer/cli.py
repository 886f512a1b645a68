"""The ``aimz-trainer`` command.

``aimz-trainer run RECIPE [--max-epochs N] [--batch-size B] [--devices N] [--output-dir D]
[--resume] [recipe options]`` runs a recipe: a Python file with a ``main(argv)`` function that
returns a summary dict. ``RECIPE`` is a path to such a file or the name of one in the
``recipes/`` folder of the current directory. The common options are forwarded to the recipe
as they are; anything else after the recipe's name goes to the recipe too (``python
recipes/NAME.py --help`` lists a recipe's own options). At the end the command prints where
the run's logs, checkpoints and predictions went (the summary's ``log_dir``,
``checkpoint_dir`` and ``store``).

``--num-processes N`` runs the recipe as N processes of one ``jax.distributed`` run on this
machine (loopback, ``--local-devices K`` CPU devices each); a process started that way (or by
SLURM, see :mod:`aimz_trainer.distributed`) joins the run before the recipe starts, and only
process 0 prints. An error of the library's own types (a bad option value, a checkpoint of
another model, ...) is printed as one line naming its cause, with exit status 1; any other
error keeps its traceback.

The command runs with a fixed ``PYTHONHASHSEED`` (``0`` unless the environment sets one): started
without one, it starts itself again with it, so that two runs of one recipe, or a run and its
resume, compute the same losses bit for bit (see :func:`aimz_trainer.distributed.with_fixed_hash_seed`).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import jax

from aimz_trainer import distributed
from aimz_trainer.errors import AimzTrainerError, ConfigurationError

__all__ = ["command", "load_recipe", "main"]

# (flag, argparse keywords): the options every bundled recipe understands.
COMMON_OPTIONS: list[tuple[str, dict[str, object]]] = [
    ("--max-epochs", {"type": int, "metavar": "N", "help": "passes over the training data"}),
    ("--batch-size", {"type": int, "metavar": "B", "help": "rows per SVI step (the global batch)"}),
    ("--devices", {"type": int, "metavar": "N", "help": "devices on the mesh's data axis (default: all)"}),
    ("--output-dir", {"metavar": "D", "help": "where the run writes logs, checkpoints and predictions"}),
    ("--resume", {"action": "store_true", "help": "continue from the newest checkpoint in --output-dir"}),
]
# (flag, argparse keywords): options of the command itself, not forwarded.
LAUNCH_OPTIONS: list[tuple[str, dict[str, object]]] = [
    (
        "--num-processes",
        {"type": int, "metavar": "N", "help": "run as N processes of one jax.distributed run on this machine"},
    ),
    (
        "--local-devices",
        {"type": int, "metavar": "K", "default": 1, "help": "CPU devices per process with --num-processes (1)"},
    ),
]
OUTPUTS = [("log_dir", "logs"), ("checkpoint_dir", "checkpoints"), ("store", "predictions")]


def load_recipe(recipe: str, recipes_dir: Path | None = None) -> ModuleType:
    """Import a recipe by path or by name (``recipes/NAME.py``)."""
    folder = recipes_dir or Path.cwd() / "recipes"
    path = Path(recipe)
    if path.suffix != ".py":
        path = folder / f"{recipe}.py"
    if not path.is_file():
        available = sorted(p.stem for p in folder.glob("*.py")) if folder.is_dir() else []
        raise ConfigurationError(
            f"no recipe {recipe!r}: expected a .py file or one of {available or 'the recipes in ./recipes'}."
        )
    spec = importlib.util.spec_from_file_location(f"aimz_recipe_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "main", None)):
        raise ConfigurationError(f"recipe {path} has no main(argv) function.")
    return module


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aimz-trainer",
        description="Run aimz_trainer recipes: training recipes for NumPyro SVI models.",
        epilog="Example: aimz-trainer run bnn_binary --max-epochs 3 --output-dir runs/try1",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="run a recipe; options it does not know go to the recipe",
        description="Run a recipe with overrides; prints where its logs, checkpoints and predictions went.",
    )
    run.add_argument("recipe", help="recipe name in ./recipes (bnn_binary, causal_effect, ...) or a .py path")
    for flag, options in COMMON_OPTIONS + LAUNCH_OPTIONS:
        run.add_argument(flag, **options)  # type: ignore[arg-type]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, recipe_argv = parser.parse_known_args(argv)
    try:
        recipe = load_recipe(args.recipe)
    except ConfigurationError as error:
        parser.error(str(error))
    forwarded: list[str] = []
    for flag, options in COMMON_OPTIONS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if options.get("action") == "store_true":
            forwarded += [flag] if value else []
        elif value is not None:
            forwarded += [flag, str(value)]
    if args.num_processes is not None and args.num_processes > 1:
        # The launcher: N copies of this command (without --num-processes), one run.
        command = [sys.executable, "-m", "aimz_trainer.cli", "run", args.recipe, *forwarded, *recipe_argv]
        return distributed.launch(command, args.num_processes, local_devices=args.local_devices)
    try:
        if distributed.initialize() is not None and jax.process_index() != 0:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - one summary: process 0 prints it
        summary = recipe.main([*forwarded, *recipe_argv])
    except AimzTrainerError as error:  # our errors say what to do: a traceback would bury it
        print(f"aimz-trainer: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    written = [(label, summary[key]) for key, label in OUTPUTS if isinstance(summary, dict) and summary.get(key)]
    if written:
        print(f"{args.recipe} wrote:")
        for label, path in written:
            print(f"  {label}: {path}")
    return 0


def command() -> int:
    """The ``aimz-trainer`` console script: :func:`main` in a process whose hash seed is fixed.

    ``PYTHONHASHSEED`` only takes effect when the interpreter starts, so a process started
    without it replaces itself (``exec``, same arguments) with one that has it.
    """
    if distributed.HASH_SEED not in os.environ:
        arguments = [sys.executable, "-m", "aimz_trainer.cli", *sys.argv[1:]]
        os.execve(sys.executable, arguments, distributed.with_fixed_hash_seed(os.environ))
    return main()


if __name__ == "__main__":
    sys.exit(command())
