"""The installed recipes, importable as ``aimz_trainer.recipes.NAME``.

The repository's top-level ``recipes/`` folder is their source: a built wheel copies its files
into this package, and in a source checkout (an editable install) this package reads them from
that folder, so that a config's ``class_path`` naming a recipe's class (a callback) resolves
either way. See :mod:`aimz_trainer.recipe`.
"""

from pathlib import Path

_here = Path(__file__).resolve().parent
_source = _here.parents[2] / "recipes"
if not any(_here.glob("[!_]*.py")) and _source.is_dir():
    __path__.append(str(_source))
