"""The ``aimz-trainer`` command: ``aimz-trainer run RECIPE [recipe options]``.

A recipe is a Python file with a ``main(argv)`` function; ``RECIPE`` is either a path to such
a file or the name of one in the ``recipes/`` folder of the current directory.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from aimz_trainer.errors import ConfigurationError

__all__ = ["load_recipe", "main"]


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aimz-trainer", description="Run aimz_trainer recipes.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a recipe; options after its name go to the recipe")
    run.add_argument("recipe", help="recipe name in ./recipes or path to a recipe file")
    args, recipe_argv = parser.parse_known_args(argv)
    try:
        recipe = load_recipe(args.recipe)
    except ConfigurationError as error:
        parser.error(str(error))
    recipe.main(recipe_argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
