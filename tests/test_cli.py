"""The ``aimz-trainer`` console script, driven in subprocesses as a user drives it: a config
printed, edited and fitted, the run continued from its own record, validated, tested and
predicted from; usage errors; the installed recipes from outside the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from aimz_trainer import open_store
from aimz_trainer.cli import build_parser, load_recipe, main, parse, split_launch_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = str(Path(__file__).with_name("cli_recipe.py"))
CONSOLE_SCRIPT = str(Path(sys.executable).with_name("aimz-trainer"))


def aimz_trainer(*args: str, cwd: str | os.PathLike[str] = ROOT, script: str = CONSOLE_SCRIPT, **env: str):
    return subprocess.run(
        [script, *args], cwd=cwd, capture_output=True, text=True, timeout=240, env={**os.environ, **env}
    )


def succeeded(completed: subprocess.CompletedProcess) -> str:
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def hparams(log_dir: Path) -> dict[str, object]:
    """The hyperparameters of a TensorBoard run, as the HParams tab reads them."""
    events = EventAccumulator(str(log_dir))  # the hparams are in the run itself
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {name: getattr(value, value.WhichOneof("kind")) for name, value in info.hparams.items()}


@pytest.mark.slow
def test_print_config_edit_fit_continue_validate_test_predict(tmp_path):
    # A config to start from: complete, with the recipe's own defaults.
    printed = yaml.safe_load(succeeded(aimz_trainer("fit", "--recipe", RECIPE, "--print_config", cwd=tmp_path)))
    assert printed["recipe"] == RECIPE
    assert printed["model"] == {"num_rows": 400, "learning_rate": 0.05}
    assert (printed["trainer"]["max_epochs"], printed["fit"]["batch_size"]) == (2, 100)
    assert printed["checkpoint"]["monitor"] == "val_loss" and printed["ckpt_path"] is None

    # Edited, then fitted from the file with an override on the command line.
    run_dir = tmp_path / "run"
    printed["model"]["num_rows"] = 300
    printed["fit"]["batch_size"] = 50
    printed["loggers"] = ["tensorboard", "csv"]
    printed["output_dir"] = str(run_dir)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(printed))
    out = succeeded(aimz_trainer("fit", "--config", "run.yaml", "--trainer.max_epochs", "3", cwd=tmp_path))
    assert "cli_recipe: 18 steps, final loss" in out  # 3 epochs of 300 / 50 rows
    assert f"  config: {run_dir / 'config.yaml'}" in out and f"  checkpoints: {run_dir / 'checkpoints'}" in out

    # The run's record, written before it trained: the resolved config, the command, the layout.
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert recorded == {**printed, "trainer": {**printed["trainer"], "max_epochs": 3}}
    launch = json.loads((run_dir / "run.json").read_text())["launches"][0]
    assert launch["command"] == ["aimz-trainer", "fit", "--config", "run.yaml", "--trainer.max_epochs", "3"]
    assert launch["versions"]["aimz-trainer"] and launch["versions"]["jax"]
    assert (launch["layout"]["process_count"], launch["layout"]["device_count"]) == (1, 1)
    # ... and the same hyperparameters in TensorBoard's HParams tab.
    recorded_hparams = hparams(run_dir / "logs")
    assert recorded_hparams["model.num_rows"] == 300 and recorded_hparams["trainer.max_epochs"] == 3
    assert recorded_hparams["recipe"] == RECIPE and recorded_hparams["checkpoint.monitor"] == "val_loss"

    # Continued from its own config: one more epoch, a second launch in the record.
    config = str(run_dir / "config.yaml")
    out = succeeded(aimz_trainer("fit", "--config", config, "--ckpt_path", "last", "--trainer.max_epochs", "4"))
    assert "cli_recipe: 24 steps, final loss" in out
    launches = json.loads((run_dir / "run.json").read_text())["launches"]
    assert [launch["command"][-1] for launch in launches] == ["3", "4"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["max_epochs"] == 4

    # The newest checkpoint reports what its fit logged at that step.
    logged = pd.read_csv(run_dir / "logs" / "metrics.csv")
    val_loss = logged[logged.metric == "val_loss"].value.iloc[-1]
    metrics = json.loads(succeeded(aimz_trainer("validate", "--config", config)).splitlines()[-1])
    assert sorted(metrics) == ["val_loss", "val_lpd"] and metrics["val_loss"] == pytest.approx(val_loss, rel=1e-5)
    metrics = json.loads(succeeded(aimz_trainer("test", "--config", config)).splitlines()[-1])
    assert sorted(metrics) == ["test_loss", "test_lpd"] and metrics["test_loss"] != pytest.approx(val_loss)

    out = succeeded(aimz_trainer("predict", "--config", config, "--predict.num_samples", "7"))
    assert f"draws from checkpoint {run_dir / 'checkpoints' / '24'} (step 24)" in out
    (store,) = (run_dir / "predictions").iterdir()
    assert open_store(store)["posterior_predictive"]["y"].shape == (1, 7, 300)


def test_usage_errors_exit_2_naming_what_to_fix(tmp_path):
    bad_key = aimz_trainer("fit", "--recipe", RECIPE, "--trainer.max_epoch", "3")
    assert bad_key.returncode == 2
    assert "unknown key 'trainer.max_epoch' (did you mean 'trainer.max_epochs'?)" in bad_key.stderr
    assert "the keys of 'trainer' are callbacks, check_val_every_n_epoch," in bad_key.stderr

    (tmp_path / "bad.yaml").write_text(f"recipe: {RECIPE}\nmodel:\n  num_rows: many\n")
    bad_type = aimz_trainer("fit", "--config", str(tmp_path / "bad.yaml"))
    assert bad_type.returncode == 2
    assert "model.num_rows got many, which is not int" in bad_type.stderr

    missing = aimz_trainer("fit", "--recipe", "no_such_recipe")
    assert missing.returncode == 2
    assert "no recipe 'no_such_recipe': give an installed recipe's name (bnn_binary," in missing.stderr
    for completed in (bad_key, bad_type, missing):
        assert "Traceback" not in completed.stderr and completed.stderr.startswith("aimz-trainer fit: error: ")


def test_a_failed_run_exits_1_with_its_message_and_the_traceback_only_with_debug(tmp_path):
    # Batches larger than the data: the fit refuses them once it has the data.
    args = ["fit", "--recipe", RECIPE, "--output_dir", str(tmp_path), "--fit.batch_size", "1000"]
    failed = aimz_trainer(*args)
    assert failed.returncode == 1
    assert failed.stderr.strip().splitlines()[-1] == (
        "aimz-trainer: ConfigurationError: batch_size must be between 1 and the number of rows (400); got 1000."
    )
    assert "Traceback" not in failed.stderr
    assert "Traceback" in aimz_trainer(*args, "--debug").stderr


def test_help_version_and_the_commands(capsys):
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert len(top.splitlines()) <= 30  # one screen
    for name in ("fit", "validate", "test", "predict", "run", "list", "--num_processes"):
        assert f"  {name}" in top
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("aimz-trainer ")
    with pytest.raises(SystemExit) as exited:
        main(["fit", "--recipe", RECIPE, "--help"])
    assert exited.value.code == 0
    fit_help = " ".join(capsys.readouterr().out.split())
    for option in ("--model.num_rows", "--trainer.max_epochs", "--fit.batch_size", "--print_config", "--ckpt_path"):
        assert option in fit_help
    assert "training rows (as many again for validation and for test)" in fit_help  # the settings' docstring


def test_durations_read_as_days_hours_minutes_seconds():
    parser = build_parser("fit", load_recipe(RECIPE).RECIPE, None)
    config = parse(parser, ["--trainer.max_time", "00:01:30:00", "--trainer.callbacks+=Timer"])
    assert config.trainer.max_time == timedelta(hours=1, minutes=30)  # not jsonargparse's 1 min 30 s
    assert "max_time: 00:01:30:00" in parser.dump(config)
    assert parse(parser, ["--trainer.max_time", "90"]).trainer.max_time == 90


def test_launch_options_are_split_off_and_bad_commands_are_usage_errors(capsys):
    assert split_launch_options(["fit", "--num-processes=2", "--local_devices", "3", "--x"])[1] == ["fit", "--x"]
    assert main(["fitt"]) == 2
    assert "unknown command 'fitt' (did you mean 'fit'?)" in capsys.readouterr().err
    assert main(["fit", "--num_processes", "two"]) == 2
    assert "--num_processes takes a positive integer; got 'two'" in capsys.readouterr().err


def test_list_names_the_installed_recipes(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in lines[:4]] == [
        [name, "fit", "--recipe"] for name in ("bnn_binary", "causal_effect", "custom_callback", "hierarchical")
    ]
    assert lines[0].endswith("Bayesian neural network for a binary outcome: the reference tutorial as a monitored run.")


def uv_binary() -> str | None:
    """uv, as ./dev finds it: ``uv run`` says where it is; else on PATH or in .tools/."""
    for candidate in (os.environ.get("UV"), shutil.which("uv"), os.path.join(ROOT, ".tools", "bin", "uv")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.mark.slow
def test_the_installed_wheel_lists_and_fits_its_recipes_from_any_directory(tmp_path):
    uv = uv_binary()
    if uv is None:
        pytest.skip("uv is needed to build the wheel (./dev installs it)")
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    build = [uv, "build", "--wheel", "--python", sys.executable, "--out-dir", str(tmp_path / "dist"), ROOT]
    subprocess.run(build, check=True, capture_output=True, env=env, timeout=240)
    (wheel,) = (tmp_path / "dist").glob("aimz_trainer-*.whl")
    # A fresh venv with the wheel alone; its dependencies are the project venv's (a .pth file
    # puts them on the path, the editable aimz_trainer of the project not among them): copying
    # the ~150 dependencies into the venv would take longer than this test's budget.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv)}))
    (site / "project_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    install = [uv, "pip", "install", "--no-deps", "--python", str(venv / "bin" / "python"), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, env=env, timeout=240)
    script = str(venv / "bin" / "aimz-trainer")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    listed = succeeded(aimz_trainer("list", cwd=elsewhere, script=script))
    assert f"(from {site / 'aimz_trainer' / 'recipes'};" in listed
    assert [line.split()[0] for line in listed.splitlines()[:4]] == [
        "bnn_binary", "causal_effect", "custom_callback", "hierarchical"
    ]  # fmt: skip
    fit = [
        "fit", "--recipe", "custom_callback", "--model.num_rows", "400", "--fit.batch_size", "100",
        "--trainer.max_epochs", "2", "--output_dir", "run",
    ]  # fmt: skip
    out = succeeded(aimz_trainer(*fit, cwd=elsewhere, script=script))
    assert "custom_callback: 2 epochs, final loss" in out
    recorded = yaml.safe_load((elsewhere / "run" / "config.yaml").read_text())
    assert recorded["recipe"] == "custom_callback"
    callback = recorded["trainer"]["callbacks"][0]["class_path"]
    assert callback == "aimz_trainer.recipes.custom_callback.PosteriorMeanLogger"
    assert (elsewhere / "run" / "logs" / "metrics.csv").is_file()


@pytest.mark.slow
@pytest.mark.multidevice
def test_num_processes_runs_one_run_of_two_processes(tmp_path):
    fit = [
        "fit", "--recipe", "custom_callback", "--num_processes", "2", "--local_devices", "2",
        "--trainer.max_epochs", "2", "--model.num_rows", "2000", "--output_dir", str(tmp_path),
    ]  # fmt: skip
    out = succeeded(aimz_trainer(*fit))
    # One summary (process 0's), one set of event files, one record of a 2-process run.
    assert out.count("custom_callback: 2 epochs, final loss") == 1
    assert "[process 1] custom_callback" not in out
    assert len(list((tmp_path / "logs").glob("events.out.tfevents.*"))) == 1
    layout = json.loads((tmp_path / "run.json").read_text())["launches"][0]["layout"]
    assert (layout["process_count"], layout["device_count"]) == (2, 4)


HASH_PROBE = """
import os
from pathlib import Path

import jax

from aimz_trainer import Trainer
from aimz_trainer.cli import load_recipe

bnn = load_recipe("bnn_binary", Path(os.environ["AIMZ_RECIPES"]))


def main(argv):
    X, y, _ = bnn.make_data(2000, 100, jax.random.key(0))
    svi = bnn.make_svi(bnn.make_model(2000, 100, 32, jax.random.key(0)))
    result = Trainer(max_epochs=2, enable_progress_bar=False).fit(svi, {"X": X, "y": y}, batch_size=500)
    print("hash seed", os.environ.get("PYTHONHASHSEED"), "final loss", repr(float(result.losses[-1])))
    return {}
"""


GC_PROBE = """
import gc
import numpyro


def main(options):
    # numpyro's objects, imported with the script, are frozen out of the collector's walks;
    # what the run makes after is not.
    made = [[]]
    print("frozen", gc.get_freeze_count() > 100_000, any(o is numpyro.sample for o in gc.get_objects()))
    print("run's own", any(o is made for o in gc.get_objects()), gc.isenabled())
    return {}
"""


def test_the_command_freezes_what_it_imported_before_the_run(tmp_path):
    script = tmp_path / "gc_probe.py"
    script.write_text(GC_PROBE)
    lines = succeeded(aimz_trainer("run", str(script))).splitlines()
    assert "frozen True False" in lines
    assert "run's own True True" in lines


@pytest.mark.slow
def test_two_runs_started_without_a_hash_seed_compute_the_same_loss(tmp_path):
    # The bnn step's float sums round differently under different hash seeds (9144.538 vs
    # 9144.539 after 8 steps under seeds 1 and 2): the command fixes the seed itself.
    recipe = tmp_path / "hash_probe.py"
    recipe.write_text(HASH_PROBE)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONHASHSEED"}
    env["AIMZ_RECIPES"] = os.path.join(ROOT, "recipes")
    outputs = []
    for launcher in ([CONSOLE_SCRIPT], [sys.executable, "-m", "aimz_trainer.cli"]):
        completed = subprocess.run(
            [*launcher, "run", str(recipe)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        outputs.append(next(line for line in completed.stdout.splitlines() if line.startswith("hash seed")))
    assert outputs[0].startswith("hash seed 0 final loss ")
    assert outputs[0] == outputs[1]
