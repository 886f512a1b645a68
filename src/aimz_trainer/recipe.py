"""What a recipe declares for the command line, and where recipes are found.

A *declared* recipe is a Python file with a module-level ``RECIPE = Recipe(...)``: the typed
settings of its model and data (a dataclass), a ``setup`` that builds the SVI and the data from
them, and its defaults for the Trainer, the fit, the checkpoints and the predictions. From that
one declaration ``aimz-trainer fit --recipe NAME`` derives its options (``--model.hidden``,
``--trainer.max_epochs``, ``--fit.batch_size``, ...), their help and the config file's schema;
``validate``, ``test`` and ``predict`` use it again on a finished run. A *script* recipe has only
a ``main(argv)`` function, and ``aimz-trainer run NAME`` runs it.

The recipes of the repository's ``recipes/`` folder are installed with the package (as
``aimz_trainer/recipes/``), so a name works from any directory; a recipe of one's own is given by
its path.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from aimz_trainer.errors import CommandLineError, ConfigurationError

if TYPE_CHECKING:
    import jax
    from numpyro.infer import SVI

    from aimz_trainer.trainer import FitResult, Trainer

__all__ = [
    "Experiment",
    "FitOutcome",
    "PredictSettings",
    "Recipe",
    "RecipeContext",
    "RecipeInfo",
    "installed_recipes",
    "load_recipe",
    "recipes_folder",
    "spec",
]

Logger = Literal["tensorboard", "csv"]


class Experiment(NamedTuple):
    """What a recipe's ``setup`` builds: the SVI and the data of a run.

    Attributes:
        svi: the model, guide, optimizer and loss (static model arguments bound to it, as
            ``SVI(..., num_groups=G)``).
        train_data: the training rows (keyword name -> array), as ``Trainer.fit`` takes them.
        val_data: held-out rows validated during the fit and by ``aimz-trainer validate``.
        test_data: held-out rows for ``aimz-trainer test``.
        predict_data: the rows ``aimz-trainer predict`` draws for (default: ``train_data``).
        extras: anything else the recipe's ``report`` needs (true values of a simulation, ...).
    """

    svi: SVI
    train_data: Mapping[str, Any]
    val_data: Mapping[str, Any] | None = None
    test_data: Mapping[str, Any] | None = None
    predict_data: Mapping[str, Any] | None = None
    extras: Mapping[str, Any] = {}


@dataclass(frozen=True)
class RecipeContext:
    """What a recipe's ``setup`` may know of the run besides its own settings.

    Attributes:
        seed: the run's ``--seed``.
        rng_key: the setup's own key (split off the seed: the Trainer and the predictions get
            others), for the data and the model's initial values.
        output_dir: the run's directory.
        max_epochs: the Trainer's ``max_epochs`` (for a learning-rate schedule over the fit).
        max_steps: the Trainer's ``max_steps``.
        batch_size: the fit's ``batch_size``.
    """

    seed: int
    rng_key: jax.Array
    output_dir: Path
    max_epochs: int | None
    max_steps: int | None
    batch_size: int


@dataclass
class PredictSettings:
    """Predictions of a run (``aimz-trainer predict``, and a recipe's own report after ``fit``).

    Args:
        batch_size: rows per compiled call and per Zarr block.
        num_samples: posterior draws taken from the checkpoint by ``aimz-trainer predict``.
        in_sample: the prediction rows are the fit's own (per-row latent sites drawn from the
            guide); ``False``: new rows (drawn from the prior).
    """

    batch_size: int = 10_000
    num_samples: int = 100
    in_sample: bool = True


@dataclass(frozen=True)
class FitOutcome:
    """What a recipe's ``report`` gets once ``aimz-trainer fit`` has fitted.

    Attributes:
        experiment: what ``setup`` built.
        trainer: the Trainer that fitted (its ``mesh``, ``callback_metrics``, ``stop_reason``).
        result: the fit's :class:`~aimz_trainer.FitResult`.
        context: the run (seed, output directory, ...).
        predict: the run's prediction settings.
        predictions_dir: where the run's prediction stores go (``<output_dir>/predictions``).
        predict_key: the key of the run's predictions (split off the seed).
    """

    experiment: Experiment
    trainer: Trainer
    result: FitResult
    context: RecipeContext
    predict: PredictSettings
    predictions_dir: Path
    predict_key: jax.Array


def spec(cls: type, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """A class with its arguments as a config file writes it (``class_path`` and ``init_args``):
    how a :class:`Recipe` gives default callbacks, which a config can then change.

    Example:
        >>> from aimz_trainer import EarlyStopping
        >>> spec(EarlyStopping, "val_loss", patience=2)
        {'class_path': 'aimz_trainer.EarlyStopping', 'init_args': {'monitor': 'val_loss', 'patience': 2}}
    """
    try:
        bound = inspect.signature(cls).bind(*args, **kwargs)
    except TypeError as error:
        raise ConfigurationError(f"spec({cls.__name__}, ...): {error}.") from error
    return {"class_path": class_path(cls), "init_args": dict(bound.arguments)}


def class_path(cls: type) -> str:
    """Where a config finds ``cls``: its package's public name when the package exports it
    (``aimz_trainer.EarlyStopping``), else its module's."""
    package = sys.modules.get(cls.__module__.split(".")[0])
    if getattr(package, cls.__qualname__, None) is cls:
        return f"{package.__name__}.{cls.__qualname__}"  # type: ignore[union-attr]
    return f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class Recipe:
    """A recipe's declaration: what it configures, typed, once.

    The command line derives a config with these sections from it: ``model`` (the fields of
    ``settings``), ``trainer`` (the :class:`~aimz_trainer.Trainer`'s arguments, ``callbacks``
    included), ``fit`` (``Trainer.fit``'s), ``checkpoint`` (a
    :class:`~aimz_trainer.ModelCheckpoint` in ``<output_dir>/checkpoints``), ``loggers`` and
    ``predict`` (:class:`PredictSettings`); the mappings given here are their defaults, and
    any of them can be changed by a config file or an option (``--trainer.max_epochs 3``).

    Args:
        settings: a dataclass of the model's and the data's settings, every field with a type
            and a default; its docstring's ``Args:``/``Attributes:`` give the options' help.
        setup: ``setup(settings, context) -> Experiment``: builds the SVI and the data.
        trainer: defaults of Trainer arguments (not ``rng_key`` or ``mesh``: the run's seed
            and devices give them); callbacks as :func:`spec` entries.
        fit: defaults of ``Trainer.fit`` arguments (not the SVI, the data or ``ckpt_path``);
            ``batch_size`` is required.
        checkpoint: defaults of the run's ``ModelCheckpoint`` (not ``dirpath``).
        loggers: the run's loggers, in ``<output_dir>/logs``: ``"tensorboard"`` (with the
            run's config as its hyperparameters) and ``"csv"`` (``metrics.csv``).
        predict: defaults of :class:`PredictSettings`.
        report: ``report(settings, outcome) -> summary``: what the recipe does after the fit
            (predictions, an evaluation), printing what it finds; the summary is returned by
            :meth:`main`.
        description: one line for ``aimz-trainer list`` and ``--help`` (default: the first
            paragraph of the recipe file's docstring).

    Example:
        >>> from dataclasses import dataclass
        >>> from aimz_trainer import EarlyStopping
        >>> @dataclass
        ... class Settings:
        ...     num_rows: int = 1000
        >>> def setup(settings, context): ...
        >>> recipe = Recipe(Settings, setup, trainer={"max_epochs": 5,
        ...                 "callbacks": [spec(EarlyStopping, "val_loss")]}, fit={"batch_size": 100})
        >>> Recipe(Settings, setup, trainer={"max_epoch": 5})
        Traceback (most recent call last):
        ...
        aimz_trainer.errors.ConfigurationError: Recipe trainer=...: Trainer has no argument 'max_epoch'; ...
    """

    settings: type
    setup: Callable[[Any, RecipeContext], Experiment]
    trainer: Mapping[str, Any] = field(default_factory=dict)
    fit: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: Mapping[str, Any] = field(default_factory=dict)
    loggers: Sequence[Logger] = ("tensorboard",)
    predict: Mapping[str, Any] = field(default_factory=dict)
    report: Callable[[Any, FitOutcome], Mapping[str, Any]] | None = None
    description: str | None = None

    def __post_init__(self) -> None:
        from aimz_trainer import ModelCheckpoint, Trainer

        if not (isinstance(self.settings, type) and dataclasses.is_dataclass(self.settings)):
            raise ConfigurationError(
                f"Recipe settings must be a dataclass (a class decorated with @dataclass); got {self.settings!r}."
            )
        missing = [f.name for f in dataclasses.fields(self.settings) if not _has_default(f)]
        if missing:
            raise ConfigurationError(
                f"Recipe settings: every field needs a default (the config's starting point); {missing} have none."
            )
        if not callable(self.setup):
            raise ConfigurationError(
                f"Recipe setup must be a function (settings, context) -> Experiment; got {self.setup!r}."
            )
        if self.report is not None and not callable(self.report):
            raise ConfigurationError(
                f"Recipe report must be a function (settings, outcome) or None; got {self.report!r}."
            )
        for section, target, skipped in [
            ("trainer", Trainer, TRAINER_SKIP),
            ("fit", Trainer.fit, FIT_SKIP),
            ("checkpoint", ModelCheckpoint, CHECKPOINT_SKIP),
            ("predict", PredictSettings, frozenset()),
        ]:
            values = getattr(self, section)
            if not isinstance(values, Mapping):
                raise ConfigurationError(f"Recipe {section} must be a mapping of argument names; got {values!r}.")
            accepted = [name for name in inspect.signature(target).parameters if name not in {"self", *skipped}]
            for name in values:
                if name not in accepted:
                    owner = getattr(target, "__qualname__", str(target))
                    raise ConfigurationError(
                        f"Recipe {section}={dict(values)!r}: {owner} has no argument {name!r}; "
                        f"the {section} section takes {accepted}."
                    )
        if "batch_size" not in self.fit:
            raise ConfigurationError("Recipe fit must give a default batch_size (fit={'batch_size': ...}).")
        for logger in self.loggers:
            if logger not in ("tensorboard", "csv"):
                raise ConfigurationError(f"Recipe loggers: {logger!r} is not one of 'tensorboard', 'csv'.")

    @property
    def module(self) -> ModuleType:
        """The module that declares the recipe."""
        return sys.modules[self.setup.__module__]

    def main(self, argv: Sequence[str] | None = None) -> dict[str, Any]:
        """``aimz-trainer fit`` of this recipe, in this process: ``argv`` are the command's
        options (``["--trainer.max_epochs", "2", "--output_dir", "runs/try"]``); returns the
        report's summary (with ``output_dir``). A recipe file ends with
        ``if __name__ == "__main__": RECIPE.main()``, so ``python recipes/NAME.py --help`` works.
        """
        from aimz_trainer import cli

        return cli.fit_in_process(self, list(sys.argv[1:] if argv is None else argv))


def _has_default(item: dataclasses.Field[Any]) -> bool:
    return item.default is not dataclasses.MISSING or item.default_factory is not dataclasses.MISSING


# Arguments the command line gives itself, from the run's seed, devices, data and directory.
TRAINER_SKIP = frozenset({"rng_key", "mesh"})
FIT_SKIP = frozenset({"svi", "train_data", "val_data", "ckpt_path", "init_state"})
CHECKPOINT_SKIP = frozenset({"dirpath"})


class RecipeInfo(NamedTuple):
    """An installed recipe, read without importing it.

    Attributes:
        name: its name (the file's stem).
        path: the file.
        declared: it declares a ``RECIPE`` (run with ``fit``); else it is a script (``run``).
        description: the first paragraph of its docstring.
    """

    name: str
    path: Path
    declared: bool
    description: str


def recipes_folder() -> Path | None:
    """The folder of the installed recipes: the package ``aimz_trainer.recipes`` of an installed
    wheel, or the repository's ``recipes/`` in a source checkout (an editable install), whichever
    holds them; ``None`` when neither does."""
    import aimz_trainer.recipes

    for folder in map(Path, aimz_trainer.recipes.__path__):
        if any(folder.glob("[!_]*.py")):
            return folder
    return None


def installed_recipes() -> list[RecipeInfo]:
    """The installed recipes, by name (read, not imported: importing one loads JAX).

    Example:
        >>> [recipe.name for recipe in installed_recipes()][:2]
        ['bnn_binary', 'causal_effect']
    """
    folder = recipes_folder()
    if folder is None:
        return []
    found = []
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        declared = any(
            isinstance(node, ast.Assign | ast.AnnAssign)
            and any(isinstance(t, ast.Name) and t.id == "RECIPE" for t in _targets(node))
            for node in tree.body
        )
        found.append(RecipeInfo(path.stem, path, declared, first_paragraph(ast.get_docstring(tree))))
    return found


def _targets(node: ast.Assign | ast.AnnAssign) -> list[ast.expr]:
    return list(node.targets) if isinstance(node, ast.Assign) else [node.target]


def load_recipe(recipe: str | Path, recipes_dir: Path | None = None) -> ModuleType:
    """Import a recipe by name (an installed one, or one in ``recipes_dir``) or by path.

    The module is registered in ``sys.modules`` (``aimz_trainer.recipes.NAME`` for an installed
    recipe), so that a config's ``class_path`` can name the classes it defines (a callback).

    Raises:
        CommandLineError: no such recipe; the message lists the installed ones.

    Example:
        >>> load_recipe("bnn_binary").RECIPE.fit["batch_size"]
        2000
    """
    folder = recipes_dir or recipes_folder()
    path = Path(recipe)
    by_name = path.suffix != ".py"
    if by_name:
        path = (folder / f"{recipe}.py") if folder is not None else path
    if not path.is_file():
        available = (
            [info.name for info in installed_recipes()]
            if recipes_dir is None
            else sorted(p.stem for p in (folder.glob("*.py") if folder else []) if not p.name.startswith("_"))
        )
        raise CommandLineError(
            f"no recipe {str(recipe)!r}: give an installed recipe's name ({', '.join(available) or 'none installed'}; "
            "`aimz-trainer list` describes them) or the path of a recipe file (a .py file)."
        )
    name = f"aimz_trainer.recipes.{path.stem}" if by_name else f"aimz_recipe_{path.stem}"
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == path.resolve():
        module = loaded  # imported already (by name, or by a config's class_path)
    else:
        module = _import_file(name, path)
    declaration = getattr(module, "RECIPE", None)
    if declaration is not None and not isinstance(declaration, Recipe):
        raise CommandLineError(f"recipe {path}: RECIPE must be an aimz_trainer.recipe.Recipe; got {declaration!r}.")
    if declaration is None and not callable(getattr(module, "main", None)):
        raise CommandLineError(f"recipe {path} declares no RECIPE and has no main(argv) function.")
    return module


def _import_file(name: str, path: Path) -> ModuleType:
    module_spec = importlib.util.spec_from_file_location(name, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before it runs: dataclasses and jsonargparse look their module up
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def description_of(module: ModuleType) -> str:
    """A recipe's one-line purpose: its declared description, else its docstring's first line."""
    declaration = getattr(module, "RECIPE", None)
    if declaration is not None and declaration.description:
        return str(declaration.description)
    return first_paragraph(module.__doc__)


def first_paragraph(docstring: str | None) -> str:
    """A docstring's first paragraph, on one line."""
    return " ".join((docstring or "").strip().split("\n\n")[0].split())
