"""The ``aimz-trainer`` command: runs configured by recipes, config files and options.

Commands:

- ``fit``: fit a declared recipe (see :mod:`aimz_trainer.recipe`). Its options come from the
  recipe's declaration, in sections: ``--model.*`` (the recipe's settings), ``--trainer.*``,
  ``--fit.*``, ``--checkpoint.*``, ``--loggers``, ``--predict.*``, and ``--recipe``, ``--seed``,
  ``--output_dir``, ``--ckpt_path``. ``--print_config`` prints the whole config as YAML;
  ``--config FILE`` reads one (options after it override it). Before training, the run's
  directory gets ``config.yaml`` (the resolved config: ``fit --config <run dir>/config.yaml
  --ckpt_path last`` continues the run) and ``run.json`` (command line, versions, device and
  process layout, one entry per launch); TensorBoard's HParams tab shows the same config.
- ``validate``, ``test``: the held-out metrics of a run's checkpoint (``--ckpt_path``, default
  ``last``) on the recipe's validation or test data, printed as one JSON line.
- ``predict``: posterior-predictive draws of a run's checkpoint for the recipe's prediction
  rows, written to ``<run dir>/predictions``.
- ``run RECIPE [its options]``: run a recipe that is a plain script (its ``main(argv)``).
- ``list``: the installed recipes and what each shows.

A recipe is an installed recipe's name (the repository's ``recipes/``, installed with the
package) or a path to a recipe file. ``--num_processes N`` (every command) runs N processes of
one ``jax.distributed`` run on this machine (``--local_devices K`` CPU devices each); a process
started that way or by SLURM (see :mod:`aimz_trainer.distributed`) joins the run first, and only
process 0 prints and writes the run's record.

Exit status: 0 done; 2 a usage error (an unknown option or config key, a value of the wrong
type, a missing recipe: the message names it and what is accepted); 1 a failed run (its
exception's message on one line; ``--debug`` shows the traceback).

The command runs with a fixed ``PYTHONHASHSEED`` (``0`` unless the environment sets one): started
without one, it starts itself again with it, so that two runs of one recipe, or a run and its
resume, compute the same losses bit for bit (see :func:`aimz_trainer.hash_seed.with_fixed_hash_seed`).
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import sys
import textwrap
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aimz_trainer._version import library_version
from aimz_trainer.commands import CHECKPOINTS, LOGS, PREDICTIONS, execute, fit_directory
from aimz_trainer.errors import CommandLineError
from aimz_trainer.gc_pause import freeze_imported
from aimz_trainer.recipe import (
    CHECKPOINT_SKIP,
    FIT_SKIP,
    TRAINER_SKIP,
    Logger,
    PredictSettings,
    Recipe,
    description_of,
    installed_recipes,
    load_recipe,
    recipes_folder,
)

if TYPE_CHECKING:
    from jsonargparse import ArgumentParser, Namespace


__all__ = ["command", "fit_directory", "fit_in_process", "load_recipe", "main"]

CONFIGURED = ("fit", "validate", "test", "predict")
COMMANDS = {
    "fit": "fit a recipe: --recipe NAME or --config FILE, then --section.key VALUE overrides",
    "validate": "validation metrics of a run's checkpoint (--config RUN_DIR/config.yaml)",
    "test": "test metrics of a run's checkpoint (--config RUN_DIR/config.yaml)",
    "predict": "posterior-predictive draws of a run's checkpoint, into RUN_DIR/predictions",
    "run": "run a recipe that is a plain script: run NAME [its own options]",
    "list": "the installed recipes and what each shows",
}
LAUNCH_HELP = """launch options (any command):
  --num_processes N   run as N processes of one jax.distributed run on this machine
  --local_devices K   CPU devices per process with --num_processes (default 1)
  --debug             print the traceback of a failed run"""
TOP_HELP = f"""usage: aimz-trainer [--version] [-h] COMMAND [options]

Fit NumPyro SVI models from recipes, config files and command-line overrides.

commands:
{chr(10).join(f"  {name:<9} {text}" for name, text in COMMANDS.items())}

{LAUNCH_HELP}

examples:
  aimz-trainer list
  aimz-trainer fit --recipe bnn_binary --help            every option of a recipe
  aimz-trainer fit --recipe bnn_binary --print_config > run.yaml
  aimz-trainer fit --config run.yaml --trainer.max_epochs 3
  aimz-trainer fit --config RUN_DIR/config.yaml --ckpt_path last    continue a run
  aimz-trainer validate --config RUN_DIR/config.yaml

exit status: 0 done, 1 the run failed, 2 a usage error."""


@dataclass(frozen=True)
class Launch:
    """How to run a command (not what: these are not part of a run's config)."""

    debug: bool = False
    num_processes: int | None = None
    local_devices: int = 1


LAUNCH_FLAGS = {"--num_processes": "num_processes", "--num-processes": "num_processes"}
LAUNCH_FLAGS |= {"--local_devices": "local_devices", "--local-devices": "local_devices"}


def split_launch_options(argv: Sequence[str]) -> tuple[Launch, list[str]]:
    """``(launch options, the other arguments)``; raises :class:`CommandLineError` for a launch
    option without an integer.

    Example:
        >>> split_launch_options(["fit", "--num_processes", "2", "--debug", "--seed=3"])
        (Launch(debug=True, num_processes=2, local_devices=1), ['fit', '--seed=3'])
    """
    values: dict[str, Any] = {}
    rest: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        flag, has_value, value = token.partition("=")
        if token == "--debug":
            values["debug"] = True
        elif flag in LAUNCH_FLAGS:
            if not has_value:
                value = next(tokens, "")
            if not re.fullmatch(r"[1-9]\d*", value):
                raise CommandLineError(f"{flag} takes a positive integer; got {value!r}.")
            values[LAUNCH_FLAGS[flag]] = int(value)
        else:
            rest.append(token)
    return Launch(**values), rest


def main(argv: Sequence[str] | None = None) -> int:
    """The command with ``argv`` (default: ``sys.argv[1:]``); returns its exit status. It runs
    as the process's command: once a run's recipe is imported, what the process holds is frozen
    out of the cyclic collector's walks (:func:`~aimz_trainer.gc_pause.freeze_imported`)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    name = arguments[0] if arguments else ""
    debug = "--debug" in arguments
    try:
        launch, arguments = split_launch_options(arguments)
        if not arguments or arguments[0] in ("-h", "--help"):
            print(TOP_HELP, file=sys.stdout if arguments else sys.stderr)
            return 0 if arguments else 2
        if arguments[0] == "--version":
            print(f"aimz-trainer {library_version()}")
            return 0
        name, rest = arguments[0], arguments[1:]
        if name not in COMMANDS:
            close = difflib.get_close_matches(name, COMMANDS, n=1)
            raise CommandLineError(
                f"unknown command {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}; the commands are "
                f"{', '.join(COMMANDS)} (aimz-trainer --help)."
            )
        if launch.num_processes is not None and launch.num_processes > 1 and not _in_launched_process():
            from aimz_trainer import distributed

            # The launcher: N copies of this command without the launch options, one run.
            command = [sys.executable, "-m", "aimz_trainer.cli", name, *rest, *(["--debug"] if launch.debug else [])]
            return distributed.launch(command, launch.num_processes, local_devices=launch.local_devices)
        with _quiet_unless_first_process():
            if name == "list":
                return list_recipes(rest)
            if name == "run":
                return run_script(rest)
            _run_configured(name, rest)
            return 0
    except CommandLineError as error:
        print(f"aimz-trainer {name}: error: {error}".replace("  ", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aimz-trainer: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a failed run: its message, the traceback only when asked for
        if debug:
            traceback.print_exc()
        else:
            print(f"aimz-trainer: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


def _in_launched_process() -> bool:
    from aimz_trainer import distributed

    return distributed.ENV_NUM_PROCESSES in os.environ


@contextlib.contextmanager
def _quiet_unless_first_process() -> Iterator[None]:
    """Join a multi-process run (when this process belongs to one), then let only process 0
    print: N copies of every line would say nothing more."""
    from aimz_trainer import distributed

    if distributed.cluster_spec() is None:
        yield
        return
    import jax

    distributed.initialize()
    if jax.process_index() == 0:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


# -- list and run ------------------------------------------------------------------------------


def list_recipes(argv: Sequence[str]) -> int:
    """``aimz-trainer list``: one line per installed recipe (name, how to run it, purpose)."""
    if argv:
        raise CommandLineError(f"list takes no arguments; got {' '.join(argv)!r}.")
    recipes = installed_recipes()
    if not recipes:
        print("no recipes are installed (give a recipe file's path to fit or run).")
        return 0
    width = max(len(info.name) for info in recipes)
    for info in recipes:
        how = "fit --recipe" if info.declared else "run"
        print(f"{info.name:<{width}}  {how:<12}  {info.description}")
    print(f"\n(from {recipes_folder()}; `aimz-trainer fit --recipe NAME --help` lists a recipe's options)")
    return 0


def run_script(argv: Sequence[str]) -> int:
    """``aimz-trainer run RECIPE [options]``: the recipe's ``main(options)``; prints where its
    logs, checkpoints and predictions went (the summary's ``log_dir``, ``checkpoint_dir``,
    ``store``)."""
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: aimz-trainer run RECIPE [its options]\n\nRun a recipe's main(options): a plain script, or a "
              "declared recipe (then its options are fit's).\n`aimz-trainer run RECIPE --help` shows the recipe's "
              "options; `aimz-trainer list` the installed recipes.\n\n" + LAUNCH_HELP)  # fmt: skip
        return 0 if argv else 2
    recipe, options = argv[0], list(argv[1:])
    module = load_recipe(recipe)
    freeze_imported()
    summary = module.main(options)
    if isinstance(getattr(module, "RECIPE", None), Recipe):
        return 0  # a declared recipe's main is fit's, which has said where everything went
    outputs = [("log_dir", LOGS), ("checkpoint_dir", CHECKPOINTS), ("store", PREDICTIONS)]
    written = [(label, summary[key]) for key, label in outputs if isinstance(summary, dict) and summary.get(key)]
    if written:
        print(f"{Path(recipe).stem} wrote:")
        for label, path in written:
            print(f"  {label}: {path}")
    return 0


# -- the configured commands -------------------------------------------------------------------


def _run_configured(name: str, argv: list[str]) -> dict[str, Any]:
    reference = find_recipe_reference(argv)
    wants_help = any(token in ("-h", "--help") for token in argv)  # the sections, without a recipe's
    declaration = None
    if reference is not None:
        module = load_recipe(reference)
        declaration = getattr(module, "RECIPE", None)
        if declaration is None:
            raise CommandLineError(
                f"recipe {reference!r} is a plain script (it declares no RECIPE): run it with "
                f"`aimz-trainer run {reference}`."
            )
    elif not wants_help:
        names = ", ".join(info.name for info in installed_recipes() if info.declared)
        raise CommandLineError(
            f"{name} needs a recipe: --recipe NAME (installed: {names}) or --recipe PATH.py, or a --config file "
            "with a `recipe:` key."
        )
    parser = build_parser(name, declaration, None if declaration is None else description_of(module))
    config = parse(parser, argv)
    assert declaration is not None  # without one, only --help gets here, and it exits
    freeze_imported()  # jax, numpyro, the recipe's libraries: the full collections of the run walked them all
    return execute(name, declaration, parser, config, ["aimz-trainer", name, *argv])


def fit_in_process(declaration: Recipe, argv: list[str]) -> dict[str, Any]:
    """``aimz-trainer fit`` of ``declaration`` with the options ``argv``, in this process (what
    :meth:`Recipe.main` runs): returns the summary instead of an exit status, and raises
    instead of printing errors."""
    reference = recipe_reference(declaration)
    parser = build_parser("fit", declaration, description_of(declaration.module))
    parser.set_defaults(recipe=reference)
    config = parse(parser, argv)
    if config.recipe != reference:
        raise CommandLineError(f"--recipe is {reference!r} here (the recipe being run); got {config.recipe!r}.")
    return execute("fit", declaration, parser, config, ["aimz-trainer", "fit", "--recipe", reference, *argv])


def recipe_reference(declaration: Recipe) -> str:
    """How a config names ``declaration``: its name when it is installed, else its file's path."""
    path = Path(declaration.module.__file__ or "").resolve()
    folder = recipes_folder()
    if folder is not None and path.parent == folder.resolve():
        return path.stem
    return str(path)


def find_recipe_reference(argv: Sequence[str]) -> str | None:
    """The recipe the arguments name, as the parser will see it: the last ``--recipe`` or
    ``recipe:`` key of a ``--config``, in order, else ``AIMZ_RECIPE`` when options are read from
    the environment (the parser needs the recipe's schema first)."""
    import yaml

    found = None
    tokens = iter(argv)
    for token in tokens:
        flag, has_value, value = token.partition("=")
        if flag not in ("--recipe", "--config"):
            continue
        if not has_value:
            value = next(tokens, "")
        if flag == "--recipe":
            found = value or None
            continue
        path = Path(value)
        try:
            text = path.read_text(encoding="utf-8") if path.is_file() else value
            content = yaml.safe_load(text)
        except (OSError, yaml.YAMLError) as error:
            raise CommandLineError(f"--config {value}: cannot read it as YAML ({error}).") from error
        if not path.is_file() and not isinstance(content, dict):
            raise CommandLineError(f"--config {value}: no such file.")
        if isinstance(content, dict) and content.get("recipe"):
            found = str(content["recipe"])
    if found is None and os.environ.get("JSONARGPARSE_DEFAULT_ENV", "").lower() in ("true", "1", "yes"):
        found = os.environ.get("AIMZ_RECIPE") or None  # options from the environment: see build_parser
    return found


def build_parser(name: str, declaration: Recipe | None, description: str | None) -> ArgumentParser:
    """The parser of ``aimz-trainer NAME`` for a recipe: its sections and their defaults."""
    from argparse import RawDescriptionHelpFormatter

    from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

    from aimz_trainer import ModelCheckpoint, Trainer

    class HelpFormatter(DefaultHelpFormatter, RawDescriptionHelpFormatter):
        """jsonargparse's help, with the epilog's lines kept as written."""

    _register_durations()

    purpose = COMMANDS[name]
    about = f"{purpose[0].upper()}{purpose[1:]}." + (f"\n\nRecipe: {description}" if description else "")
    parser = ArgumentParser(
        formatter_class=HelpFormatter,
        prog=f"aimz-trainer {name}",
        usage=f"aimz-trainer {name} [--recipe NAME | --config FILE] [--print_config] [--SECTION.KEY VALUE ...]",
        description="\n".join(textwrap.fill(paragraph, 100) for paragraph in about.split("\n")),
        epilog=LAUNCH_HELP,
        exit_on_error=False,
        allow_abbrev=False,
        # Off unless JSONARGPARSE_DEFAULT_ENV=true: then AIMZ_TRAINER__MAX_EPOCHS=3 is an option.
        env_prefix="AIMZ",
    )
    parser.add_argument(
        "--config", action=ActionConfigFile, help="a config file (YAML, as --print_config writes it); later options win"
    )
    parser.add_argument(
        "--recipe", type=str | None, default=None, help="an installed recipe's name (aimz-trainer list) or a .py path"
    )
    parser.add_argument("--seed", type=int, default=0, help="the run's randomness: data, initial values, shuffling")
    parser.add_argument(
        "--output_dir",
        type=str | None,
        default=None,
        help="the run's directory (default: a new runs/RECIPE/run-TIME; with --ckpt_path, the newest one)",
    )
    parser.add_argument(
        "--ckpt_path",
        type=int | str | None,
        default=None,
        help="fit: continue from this checkpoint ('last', a step, a path); validate, test, predict: the checkpoint "
        "to use (default 'last')",
    )
    if declaration is not None:
        parser.add_class_arguments(declaration.settings, "model", help="The recipe's settings: its model and data")
    parser.add_class_arguments(Trainer, "trainer", skip=set(TRAINER_SKIP), instantiate=False)
    parser.add_method_arguments(Trainer, "fit", "fit", skip=set(FIT_SKIP))
    parser.add_class_arguments(
        ModelCheckpoint,
        "checkpoint",
        skip=set(CHECKPOINT_SKIP),
        instantiate=False,
        help="The run's ModelCheckpoint, in OUTPUT_DIR/checkpoints",
    )
    parser.add_argument(
        "--loggers",
        type=list[Logger],
        default=["tensorboard"],
        help="the run's loggers, in OUTPUT_DIR/logs: tensorboard (the config as its hyperparameters), csv",
    )
    parser.add_class_arguments(PredictSettings, "predict", instantiate=False)
    if declaration is not None:
        defaults: dict[str, Any] = {"loggers": list(declaration.loggers)}
        for section in ("trainer", "fit", "checkpoint", "predict"):
            defaults |= {f"{section}.{key}": value for key, value in getattr(declaration, section).items()}
        parser.set_defaults(defaults)
    return parser


def _register_durations() -> None:
    """Read a ``timedelta`` (``trainer.max_time``, a ``Timer``'s ``duration``) as the library
    does: jsonargparse's own reading takes the first ``H:M:S`` of ``"DD:HH:MM:SS"`` (one hour
    would become one minute)."""
    from datetime import timedelta

    from jsonargparse.typing import register_type

    from aimz_trainer.callbacks.timer import as_duration

    def text(duration: timedelta) -> str:
        minutes, seconds = divmod(duration.total_seconds(), 60)
        hours, minutes = divmod(int(minutes), 60)
        days, hours = divmod(hours, 24)
        return f"{days:02d}:{hours:02d}:{minutes:02d}:{seconds:02g}"

    register_type(timedelta, serializer=text, deserializer=lambda value: as_duration(value, "a duration"))


def parse(parser: ArgumentParser, argv: Sequence[str]) -> Namespace:
    """``parser.parse_args(argv)``; a usage error becomes a :class:`CommandLineError` that names
    the bad key and the accepted ones, or the bad value and the type it should have."""
    from argparse import ArgumentError

    try:
        return parser.parse_args([_underscored(token) for token in argv])
    except ArgumentError as error:
        raise CommandLineError(explain(parser, str(error))) from None


def _underscored(token: str) -> str:
    """An option's name with dashes as underscores (``--output-dir`` is ``--output_dir``, as in
    most commands); its value is kept as it is."""
    if not token.startswith("--"):
        return token
    flag, equals, value = token.partition("=")
    return "--" + flag[2:].replace("-", "_") + equals + value


def explain(parser: ArgumentParser, message: str) -> str:
    """A usage error of jsonargparse's, said with the key at fault and what would be accepted."""
    keys = sorted(
        action.dest
        for action in parser._actions
        if action.dest not in ("help", "config", "print_config", "print_shtab") and not action.dest.endswith(".help")
        and action.option_strings
    )  # fmt: skip
    unknown = re.search(r"unrecognized arguments: --?([\w.\-]+)", message)
    group = re.search(r"Group '([\w.]+)' does not accept (?:option|nested key) '([\w.]+)'", message)
    not_accepted = re.search(r"(?:Key|Option) '([\w.]+)' is not (?:expected|accepted)", message)
    bad = unknown.group(1) if unknown else None
    if group:
        bad = f"{group.group(1)}.{group.group(2)}"
    elif not_accepted:
        bad = not_accepted.group(1)
    if bad is not None:
        groups = sorted({key.split(".", 1)[0] for key in keys})
        section = bad.rsplit(".", 1)[0] if "." in bad else ""
        if section and section.split(".")[0] not in groups:
            bad, section = section.split(".")[0], ""  # the section itself is unknown
        siblings = [key for key in keys if "." in key and key.rsplit(".", 1)[0] == section] if section else []
        close = difflib.get_close_matches(bad, keys, n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        accepted = (
            f"the keys of {section!r} are {', '.join(key.rsplit('.', 1)[1] for key in siblings)}"
            if siblings
            else f"the top-level keys are {', '.join(groups)}"
        )
        return f"unknown key {bad!r}{hint}; {accepted}. `--help` describes them."
    typed = re.search(r'Parser key "([\w.]+)":', message)
    if typed:
        key = typed.group(1)
        given = re.search(r"(?:Given value|Got value): (.*)", message)
        expected = _type_of(parser, key)
        return (
            f"{key} got {given.group(1).strip() if given else 'a value'!s}, which is not {expected}."
            f"{_first_reason(message)}"
        )
    return message.splitlines()[0] if message else "bad arguments"


def _type_of(parser: ArgumentParser, key: str) -> str:
    for action in parser._actions:
        if action.dest == key:
            hint = getattr(action, "_typehint", None)
            if hint is not None:
                return (
                    re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", str(hint))
                    .replace("typing.", "")
                    .replace("NoneType", "None")
                )
    return "of the expected type"


def _first_reason(message: str) -> str:
    """A reason jsonargparse gave beyond the type (a class's own error), if any."""
    for line in message.splitlines()[1:]:
        line = line.strip(" -")
        if line and not line.startswith(("Expected", "Given", "Got", "Subtypes", "Errors", "Does not")):
            return f" ({line})"
    return ""


if __name__ == "__main__":
    from aimz_trainer.console import command

    sys.exit(command())
