"""The MLflow flavor (aimz_trainer.mlflow) and MLFlowLogger, against a real local tracking store
(SQLite and artifacts in a temporary directory, no server): what is saved, logged and loaded,
read back with MLflow's own client; a model loaded in a fresh process predicts the same draws."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import cloudpickle
import jax
import mlflow
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from optax import adam

import aimz_trainer.mlflow
from aimz_trainer import (
    Callback,
    CSVLogger,
    FitPreempted,
    FitProgress,
    ImpactModel,
    MLFlowLogger,
    ModelCheckpoint,
    Trainer,
)

from .conftest import linear_data, linear_svi

NUM_ROWS, BATCH, EPOCHS, DRAWS = 1000, 100, 2, 20
STEPS = EPOCHS * NUM_ROWS // BATCH
ROWS = 7  # rows predicted
KEY = 11  # the seed of the predictions compared: the same key gives the same draws


def kernel(X, y=None):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", NUM_ROWS, subsample_size=len(X)):
        numpyro.sample("y", dist.Normal(w * X + b, 0.3), obs=y)


def new_model() -> ImpactModel:
    svi = SVI(kernel, AutoNormal(kernel), adam(0.05), Trace_ELBO())
    return ImpactModel(kernel, rng_key=jax.random.key(0), inference=svi)


def fit(model: ImpactModel) -> ImpactModel:
    data = linear_data(NUM_ROWS)
    return model.fit(data["x"], data["y"], num_samples=DRAWS, batch_size=BATCH, epochs=EPOCHS, progress=False)


@pytest.fixture(scope="module")
def X() -> np.ndarray:
    return linear_data(NUM_ROWS)["x"]


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """A local tracking store for the module; each test uses an experiment of its own."""
    root = tmp_path_factory.mktemp("mlflow")
    # The kernel is pickled by value, as one defined in a script is: a fresh process (and
    # MLflow's requirement inference) loads the model without importing this test module.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        # A SQLite store puts new experiments' artifacts in ./mlruns: keep them in the module's directory.
        patch.chdir(root)
        yield root
    mlflow.set_tracking_uri(previous)
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def experiment(tracking, request) -> str:
    """A new experiment (artifacts under the module's directory), the active one."""
    name = request.node.name
    experiment_id = mlflow.create_experiment(name, artifact_location=(tracking / "artifacts" / name).as_uri())
    mlflow.set_experiment(experiment_id=experiment_id)
    yield experiment_id
    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture(scope="module")
def fitted() -> ImpactModel:
    model = fit(new_model())
    yield model
    model.cleanup()


@pytest.fixture(scope="module")
def picklable(fitted) -> ImpactModel:
    """The fitted model, once ImpactModel pickles (cloudpickle) with its posterior and keys."""
    try:
        cloudpickle.dumps(fitted)
    except Exception as error:
        pytest.skip(f"ImpactModel does not pickle yet ({error}): the flavor stores models with cloudpickle.")
    return fitted


def draws(tree) -> np.ndarray:
    return tree["posterior_predictive"]["y"].values


def predicted(model: ImpactModel, X: np.ndarray, seed: int = KEY) -> np.ndarray:
    return draws(model.predict(X[:ROWS], rng_key=jax.random.key(seed), store="memory", progress=False))


# -- the optional dependency -------------------------------------------------------------------


def run_python(code: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=240, **kwargs
    )


def test_importing_aimz_trainer_does_not_import_mlflow():
    result = run_python("""
        import sys
        import aimz_trainer, aimz_trainer.callbacks
        from aimz_trainer import MLFlowLogger
        assert "mlflow" not in sys.modules, "mlflow imported"
    """)
    assert result.returncode == 0, result.stderr


def test_without_mlflow_the_errors_name_the_extra():
    result = run_python("""
        import sys
        sys.modules["mlflow"] = None  # as if it were not installed
        from aimz_trainer import MLFlowLogger
        for attempt in (lambda: __import__("aimz_trainer.mlflow"), MLFlowLogger):
            try:
                attempt()
            except ImportError as error:
                print(error)
            else:
                raise SystemExit("no ImportError")
    """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all("pip install 'aimz-trainer[mlflow]'" in line for line in lines), lines


# -- requirements ------------------------------------------------------------------------------


def test_default_requirements_pin_the_installed_versions():
    from importlib.metadata import version

    expected = [
        f"aimz-trainer=={version('aimz-trainer')}",
        f"jax=={jax.__version__}",
        f"numpyro=={numpyro.__version__}",
    ]
    assert aimz_trainer.mlflow.get_default_pip_requirements() == expected
    with_cloudpickle = aimz_trainer.mlflow.get_default_pip_requirements(include_cloudpickle=True)
    assert with_cloudpickle == [*expected, f"cloudpickle=={cloudpickle.__version__}"]
    conda = aimz_trainer.mlflow.get_default_conda_env()
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert set(expected) <= set(pip) and any(p.startswith("mlflow") for p in pip)


# -- save_model / load_model -------------------------------------------------------------------


def test_save_and_load_round_trip(picklable, X, tmp_path):
    extra = tmp_path / "notes.txt"
    extra.write_text("fitted on the linear problem")
    path = tmp_path / "model"
    key = np.asarray(jax.random.key_data(picklable.rng_key))
    aimz_trainer.mlflow.save_model(
        picklable,
        path,
        input_example=X[:5],
        extra_files=[str(extra)],
        pip_requirements=["aimz-trainer", "jax"],
        extra_pip_requirements=None,
        metadata={"purpose": "test"},
    )
    assert sorted(p.name for p in path.iterdir()) == [
        "MLmodel",
        "conda.yaml",
        "extra_files",
        "input_example.json",
        "model.pkl",
        "python_env.yaml",
        "requirements.txt",
        "serving_input_example.json",
    ]
    # The signature's prediction left the model's key as it was.
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(picklable.rng_key)), key)
    mlmodel = yaml.safe_load((path / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["aimz_trainer"]
    assert flavor["pickled_model"] == "model.pkl" and flavor["serialization_format"] == "cloudpickle"
    assert flavor["model_class"] == "aimz_trainer.impact_model.ImpactModel"
    assert flavor["extra_files"] == [{"path": "extra_files/notes.txt"}]
    assert (path / "extra_files" / "notes.txt").read_text() == "fitted on the linear problem"
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "aimz_trainer.mlflow"
    assert mlmodel["metadata"] == {"purpose": "test"}
    # The signature was inferred from the example by a prediction.
    inputs = json.loads(mlmodel["signature"]["inputs"])
    assert inputs == [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1]}}]
    assert json.loads((path / "input_example.json").read_text()) == X[:5].tolist()
    requirements = (path / "requirements.txt").read_text().splitlines()
    assert requirements[1:] == ["aimz-trainer", "jax"] and requirements[0].startswith("mlflow==")

    loaded = aimz_trainer.mlflow.load_model(path)
    assert isinstance(loaded, ImpactModel) and loaded.is_fitted()
    for site, value in picklable.posterior.items():
        np.testing.assert_array_equal(np.asarray(loaded.posterior[site]), np.asarray(value))
    np.testing.assert_array_equal(np.asarray(loaded.vi_result.losses), np.asarray(picklable.vi_result.losses))
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(loaded.rng_key)), key)
    np.testing.assert_array_equal(predicted(loaded, X), predicted(picklable, X))
    loaded.cleanup()


def test_save_refuses_a_non_empty_directory_and_other_objects(fitted, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(MlflowException, match="already exists and is not empty"):
        aimz_trainer.mlflow.save_model(fitted, tmp_path / "taken")
    with pytest.raises(TypeError, match="ImpactModel"):
        aimz_trainer.mlflow.save_model(object(), tmp_path / "other")


@pytest.mark.slow
def test_default_requirements_are_inferred_from_a_loaded_model(picklable, X, tmp_path):
    """Without pip_requirements, MLflow loads the model in a subprocess and records what it
    imports, with the defaults."""
    aimz_trainer.mlflow.save_model(picklable, tmp_path / "model", extra_pip_requirements=["extra-package==1.0"])
    requirements = (tmp_path / "model" / "requirements.txt").read_text().splitlines()
    names = {line.split("==")[0] for line in requirements}
    assert {"mlflow", "aimz-trainer", "jax", "numpyro", "cloudpickle", "extra-package"} <= names
    assert set(aimz_trainer.mlflow.get_default_pip_requirements(include_cloudpickle=True)) <= set(requirements)


# -- log_model, a fresh process, pyfunc ----------------------------------------------------------


@pytest.fixture(scope="module")
def logged(picklable, X, tracking):
    """One model logged for the tests that read it (a log with signature inference takes ~15 s)."""
    experiment_id = mlflow.create_experiment("logged", artifact_location=(tracking / "artifacts" / "logged").as_uri())
    with mlflow.start_run(experiment_id=experiment_id) as run:
        info = aimz_trainer.mlflow.log_model(
            picklable,
            name="model",
            input_example=X[:5],
            pip_requirements=["aimz-trainer", "jax", "numpyro"],
            extra_files=[__file__],
        )
    return info, run


@pytest.mark.slow
def test_a_logged_model_predicts_the_same_draws_in_a_fresh_process(picklable, logged, X, tmp_path):
    info, _ = logged
    np.save(tmp_path / "X.npy", X[:ROWS])
    result = run_python(
        f"""
        import jax
        import numpy as np
        import aimz_trainer.mlflow
        model = aimz_trainer.mlflow.load_model({info.model_uri!r})
        tree = model.predict(np.load("X.npy"), rng_key=jax.random.key({KEY}), progress=False)
        np.save("draws.npy", tree["posterior_predictive"]["y"].values)
        model.cleanup()
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "draws.npy"), predicted(picklable, X))


def test_log_model_records_signature_example_files_and_requirements(logged, X):
    info, run = logged
    assert info.run_id == run.info.run_id
    assert set(info.flavors) == {"aimz_trainer", "python_function"}
    inputs = json.loads(info.signature.to_dict()["inputs"])
    assert inputs == [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1]}}]
    assert info.saved_input_example_info["artifact_path"] == "input_example.json"
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    assert json.loads((local / "input_example.json").read_text()) == X[:5].tolist()
    assert (local / "extra_files" / Path(__file__).name).read_text() == Path(__file__).read_text()
    requirements = (local / "requirements.txt").read_text().splitlines()
    assert requirements[1:] == ["aimz-trainer", "jax", "numpyro"]
    assert yaml.safe_load((local / "MLmodel").read_text())["flavors"]["aimz_trainer"]["extra_files"] == [
        {"path": f"extra_files/{Path(__file__).name}"}
    ]


def test_pyfunc_predicts_the_model_s_draws(picklable, logged, X):
    info, _ = logged
    pyfunc_model = mlflow.pyfunc.load_model(info.model_uri)
    wrapper = pyfunc_model._model_impl
    assert isinstance(wrapper.get_raw_model(), ImpactModel)
    tree = pyfunc_model.predict(X[:ROWS])  # in memory, with a fresh key of the model's
    assert draws(tree).shape == (1, DRAWS, ROWS)
    # A seed draws with jax.random.key(seed): ImpactModel.predict(rng_key=...)'s draws.
    expected = predicted(picklable, X, seed=3)
    np.testing.assert_array_equal(draws(wrapper.predict(X[:ROWS], params={"seed": 3})), expected)
    # A dict of arrays (what a scoring server serializes); data as predict's keywords.
    as_dict = wrapper.predict({"X": X[:ROWS]}, params={"return_datatree": False, "seed": 3})
    assert list(as_dict) == ["y"]
    np.testing.assert_array_equal(as_dict["y"], expected)
    assert not np.array_equal(expected, predicted(picklable, X, seed=4))


# -- autolog -----------------------------------------------------------------------------------


@pytest.fixture
def autologging():
    yield aimz_trainer.mlflow.autolog
    aimz_trainer.mlflow.autolog(disable=True)


def run_of_last_fit(experiment_id: str):
    [run] = MlflowClient().search_runs([experiment_id])
    return MlflowClient().get_run(run.info.run_id)  # with its inputs


def test_autolog_logs_params_the_elbo_history_and_the_kernel_source(experiment, autologging):
    autologging(log_models=False)
    model = fit(new_model())
    run = run_of_last_fit(experiment)
    assert run.data.params == {
        "param_input": "X",
        "param_output": "y",
        "inference_method": "SVI",
        "optimizer": "_NumPyroOptim",  # an optax optimizer, as NumPyro wraps it
        "batch_size": str(BATCH),
        "epochs": str(EPOCHS),
        "shuffle": "True",
        "num_samples": str(DRAWS),
    }
    history = MlflowClient().get_metric_history(run.info.run_id, "elbo_loss")
    assert [point.step for point in history] == list(range(STEPS))
    np.testing.assert_array_equal([point.value for point in history], np.asarray(model.vi_result.losses))
    assert run.data.tags["mlflow.autologging"] == "aimz_trainer"
    artifacts = [f.path for f in MlflowClient().list_artifacts(run.info.run_id)]
    assert artifacts == ["model.py"]
    source = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="model.py")).read_text()
    assert source.startswith("def kernel(X, y=None):")
    [dataset_input] = run.inputs.dataset_inputs
    assert dataset_input.tags[0].value == "train"
    assert json.loads(dataset_input.dataset.profile) == {
        "features_shape": [NUM_ROWS],
        "features_size": NUM_ROWS,
        "features_nbytes": 4 * NUM_ROWS,
        "targets_shape": [NUM_ROWS],
        "targets_size": NUM_ROWS,
        "targets_nbytes": 4 * NUM_ROWS,
    }
    model.cleanup()


def test_autolog_logs_fit_on_batch(experiment, autologging):
    autologging(log_models=False, log_datasets=False)
    data = linear_data(NUM_ROWS)
    model = new_model().fit_on_batch(data["x"], data["y"], num_steps=20, num_samples=DRAWS, progress=False)
    run = run_of_last_fit(experiment)
    assert run.data.params["num_steps"] == "20" and run.data.params["num_samples"] == str(DRAWS)
    history = MlflowClient().get_metric_history(run.info.run_id, "elbo_loss")
    np.testing.assert_array_equal([point.value for point in history], np.asarray(model.vi_result.losses))
    assert [point.step for point in history] == list(range(20))
    model.cleanup()


def test_autolog_logs_scalar_trainer_options_not_data_or_callbacks(experiment, autologging, tmp_path):
    autologging(log_models=False, log_datasets=False)
    model = new_model()
    data = linear_data(NUM_ROWS)
    held_out = {"X": data["x"][:200], "y": data["y"][:200]}
    model.fit(
        data["x"], data["y"], num_samples=DRAWS, batch_size=BATCH, epochs=1, progress=False,
        log_every_n_steps=5, callbacks=[CSVLogger(tmp_path / "m.csv")], val_data=held_out,
    )  # fmt: skip
    params = run_of_last_fit(experiment).data.params
    assert params["log_every_n_steps"] == "5" and params["epochs"] == "1"
    assert not {"callbacks", "val_data", "X", "y", "progress"} & set(params)
    model.cleanup()


@pytest.mark.slow
def test_autolog_logs_the_fitted_model_with_example_and_signature(picklable, experiment, autologging, X):
    autologging(log_input_examples=True)
    model = fit(new_model())
    run = run_of_last_fit(experiment)
    [logged_model] = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
    assert logged_model.name == "model" and logged_model.source_run_id == run.info.run_id
    assert logged_model.params["num_samples"] == str(DRAWS) and logged_model.params["optimizer"] == "_NumPyroOptim"
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{logged_model.model_id}"))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["flavors"]["aimz_trainer"]["pickled_model"] == "model.pkl"
    assert json.loads((local / "input_example.json").read_text()) == X[:5].tolist()
    params = json.loads(mlmodel["signature"]["params"])
    assert [(p["name"], p["default"]) for p in params] == [
        ("progress", False),
        ("return_datatree", True),
        ("seed", None),
    ]
    loaded = aimz_trainer.mlflow.load_model(f"models:/{logged_model.model_id}")
    np.testing.assert_array_equal(predicted(loaded, X), predicted(model, X))
    assert len(run.inputs.dataset_inputs) == 1
    assert run.inputs.model_inputs[0].model_id == logged_model.model_id
    loaded.cleanup()
    model.cleanup()


# -- MLFlowLogger ------------------------------------------------------------------------------


EVERY = 5


def logged_fit(logger: MLFlowLogger, tmp_path: Path, *callbacks):
    csv_path = tmp_path / "metrics.csv"
    trainer = Trainer(
        max_epochs=EPOCHS,
        rng_key=jax.random.key(0),
        enable_progress_bar=False,
        log_every_n_steps=EVERY,
        callbacks=[logger, CSVLogger(csv_path), *callbacks],
    )
    result = trainer.fit(
        linear_svi(NUM_ROWS), linear_data(NUM_ROWS), batch_size=BATCH, val_data=linear_data(200, seed=1)
    )
    return trainer, result, csv_path


def history(run_id: str, name: str) -> dict[int, float]:
    points = MlflowClient().get_metric_history(run_id, name)
    assert len({p.step for p in points}) == len(points), f"{name}: one point per step"
    return {p.step: p.value for p in points}


def csv_metrics(path: Path) -> dict[str, dict[int, float]]:
    import csv

    metrics: dict[str, dict[int, float]] = {}
    with path.open(newline="") as file:
        for row in csv.DictReader(file):
            metrics.setdefault(row["metric"], {})[int(row["step"])] = float(row["value"])
    return metrics


class CountingClient:
    """Counts MlflowClient.log_batch calls."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = MlflowClient.log_batch

        def log_batch(client, *args, **kwargs):
            self.calls += 1
            return original(client, *args, **kwargs)

        monkeypatch.setattr(MlflowClient, "log_batch", log_batch)


def test_the_logger_writes_what_the_fit_logs(tracking, experiment, tmp_path, monkeypatch):
    counter = CountingClient(monkeypatch)
    logger = MLFlowLogger(
        experiment_name="logger", run_name="first", tags={"team": "impact"}, hparams={"learning_rate": 0.05}
    )
    hooks = HookCounter()
    trainer, result, csv_path = logged_fit(logger, tmp_path, hooks)
    run = MlflowClient().get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "first" and run.data.tags["team"] == "impact"
    assert run.data.params == {
        "max_epochs": str(EPOCHS),
        "batch_size": str(BATCH),
        "steps_per_epoch": str(NUM_ROWS // BATCH),
        "log_every_n_steps": str(EVERY),
        "num_devices": str(trainer.mesh.size),
        "learning_rate": "0.05",
    }
    expected = csv_metrics(csv_path)
    assert set(run.data.metrics) == set(expected)
    for name, values in expected.items():
        logged = history(logger.run_id, name)
        assert sorted(logged) == sorted(values), name
        np.testing.assert_allclose([logged[s] for s in sorted(values)], [values[s] for s in sorted(values)], rtol=1e-6)
    train_loss = history(logger.run_id, "train_loss")
    assert sorted(train_loss) == [s for s in range(STEPS) if (s + 1) % EVERY == 0]
    np.testing.assert_allclose(list(train_loss.values()), result.losses[sorted(train_loss)], rtol=1e-6)
    # Batched: one call for the params and at most one per hook (a chunk, a validation, an epoch
    # end) and at close, not one per step or metric.
    assert counter.calls <= 1 + hooks.calls + 1 < sum(len(v) for v in expected.values())


class HookCounter(Callback):
    def __init__(self) -> None:
        self.calls = 0

    def on_train_chunk_end(self, fit, progress, losses, steps):
        self.calls += 1

    def on_validation_end(self, fit, progress):
        self.calls += 1

    def on_train_epoch_end(self, fit, progress):
        self.calls += 1


def test_a_failed_fit_marks_the_run_failed_and_keeps_its_rows(tracking, experiment, tmp_path):
    class Boom(Callback):
        def on_train_epoch_end(self, fit, progress):
            raise RuntimeError("boom")

    logger = MLFlowLogger(experiment_name="failing")
    with pytest.raises(RuntimeError, match="boom"):
        logged_fit(logger, tmp_path, Boom())
    run = MlflowClient().get_run(logger.run_id)
    assert run.info.status == "FAILED"
    assert sorted(history(logger.run_id, "train_loss")) == [4, 9]


def test_a_preempted_fit_marks_the_run_killed(tracking, experiment, tmp_path):
    class Preempt(Callback):
        def on_train_epoch_end(self, fit, progress):
            signal.raise_signal(signal.SIGTERM)  # stops the fit here, as a scheduler's notice

    logger = MLFlowLogger(experiment_name="preempted")
    with pytest.raises(FitPreempted):
        logged_fit(logger, tmp_path, Preempt())
    assert MlflowClient().get_run(logger.run_id).info.status == "KILLED"


def test_a_resumed_fit_drops_the_points_from_its_resume_step(tracking, experiment, tmp_path):
    logger = MLFlowLogger(experiment_name="resume", run_name="resumable")
    logged_fit(logger, tmp_path)
    first = logger.run_id
    before = {name: history(first, name) for name in MlflowClient().get_run(first).data.metrics}

    resumed = MLFlowLogger(run_id=first)
    resumed.open(FakeFit(), 10)
    resumed.write(14, 1, {"train_loss": -1.0})
    resumed.write(19, 1, {"train_loss": -2.0, "val_loss": -3.0})
    resumed.close()

    second = resumed.run_id
    assert second != first
    run = MlflowClient().get_run(second)
    assert run.data.tags["aimz_trainer.resumed_from"] == first and run.info.run_name == "resumable"
    assert run.info.status == "FINISHED"
    assert run.data.params == MlflowClient().get_run(first).data.params
    for name, values in before.items():
        kept = {s: v for s, v in values.items() if s < 10}
        new = {14: -1.0, 19: -2.0} if name == "train_loss" else {19: -3.0} if name == "val_loss" else {}
        assert history(second, name) == pytest.approx(kept | new), name
    # The earlier run is left as it was.
    assert {name: history(first, name) for name in before} == before


def test_a_resume_before_any_later_point_continues_the_same_run(tracking, experiment):
    logger = MLFlowLogger(experiment_name="append")
    logger.open(FakeFit(), 0)
    logger.write(4, 0, {"train_loss": 1.0})
    logger.close()
    run_id = logger.run_id
    logger.open(FakeFit(), 5)  # the same logger resumes at step 5: nothing to drop
    logger.write(9, 0, {"train_loss": 2.0})
    logger.close()
    assert logger.run_id == run_id
    assert history(run_id, "train_loss") == {4: 1.0, 9: 2.0}
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"


def test_log_model_uploads_the_checkpoints(tracking, experiment, tmp_path):
    logger = MLFlowLogger(experiment_name="checkpoints", log_model=True)
    checkpoint = ModelCheckpoint(tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1, async_save=False)
    logged_fit(logger, tmp_path, checkpoint)
    artifacts = [f.path for f in MlflowClient().list_artifacts(logger.run_id, "checkpoints/ckpt")]
    steps = sorted(int(p.rsplit("/", 1)[1]) for p in artifacts)
    assert steps == [NUM_ROWS // BATCH, STEPS]
    files = {f.path for f in MlflowClient().list_artifacts(logger.run_id, f"checkpoints/ckpt/{STEPS}/state")}
    assert f"checkpoints/ckpt/{STEPS}/state/arrays.npz" in files


def test_only_process_0_logs(tracking, experiment, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda *args, **kwargs: 1)
    logger = MLFlowLogger(experiment_name="process_1")
    assert not logger.is_writer
    fit_progress = FitProgress(step=10, epoch=0, metrics={"train_loss": 1.0})
    logger.on_train_epoch_start(None, fit_progress)
    logger.on_train_chunk_end(None, fit_progress, np.ones(10, np.float32), range(10))
    logger.on_train_epoch_end(None, fit_progress)
    assert logger.run_id is None
    assert MlflowClient().get_experiment_by_name("process_1") is None


class FakeFit:
    """Enough of a FitContext for a logger opened outside a fit."""

    max_epochs, max_steps, log_every_n_steps, plan = EPOCHS, None, EVERY, None
    settings = types.SimpleNamespace(min_epochs=None, min_steps=None)
    checkpoint_directories = ()

    class mesh:
        size = 1
