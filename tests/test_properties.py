"""Property tests of the public entry points' arguments (issue 16): every bad value hypothesis
finds for an argument, the other arguments valid, is refused with one of the library's errors
(never a TypeError or ValueError from deep inside) whose message names the argument (or the
path given), and leaves every file and directory that existed before as it was: bytes and
modification times. Bad values are refused before anything compiles: an example takes
milliseconds.

The files are a module's workspace: a fit's checkpoint and metrics, a prediction store written
by ``Predictor.predict``, an interrupted store, a damaged checkpoint and unrelated files.
"""

from __future__ import annotations

import hashlib
import inspect
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.sharding import Mesh

from aimz_trainer import (
    AimzTrainerError,
    Callback,
    CSVLogger,
    EarlyStopping,
    ImpactModel,
    ModelCheckpoint,
    PosteriorSampler,
    Predictor,
    TensorBoardLogger,
    Trainer,
    estimate_effect,
    load_checkpoint,
    make_mesh,
    open_store,
    verify_store,
)
from aimz_trainer.store import ArraySpec, ZarrStore

from .conftest import linear_data, linear_model, linear_svi

NUM_ROWS = 32
BATCH_SIZE = 8  # 4 steps per epoch
DATA = linear_data(NUM_ROWS)
SITES = ("b", "mu", "w", "y")  # of linear_model: latent b and w, deterministic mu, observed y
MODEL = linear_model(NUM_ROWS)
SVI_ = linear_svi(NUM_ROWS)
PREDICTION_METHODS = ("predict", "log_likelihood", "sample_prior_predictive")  # of Predictor

# Every bad value is refused before anything compiles, in milliseconds.
examples = settings(max_examples=10, deadline=None)


# -- strategies: one per kind of argument --------------------------------------------------------


def not_counts(minimum: int) -> st.SearchStrategy[Any]:
    """Anything but an int of at least ``minimum``: smaller ints (NumPy's too), floats (whole
    ones, NaN, infinities), bools, strings, arrays of a count. ``None`` is the caller's to add:
    some counts take it."""
    return st.one_of(
        st.integers(max_value=minimum - 1),
        st.integers(min_value=-(2**63), max_value=minimum - 1).map(np.int64),
        st.floats(),
        st.booleans(),
        st.text(max_size=3),
        st.integers(minimum, minimum + 9).map(lambda count: np.array([count])),
    )


def not_keys() -> st.SearchStrategy[Any]:
    """Anything but one typed key or one legacy ``uint32[2]`` key: seeds, batches of keys (typed
    and legacy), key data of another dtype or shape, strings, floats."""
    return st.one_of(
        st.integers(),
        st.floats(),
        st.text(max_size=3),
        st.integers(1, 3).map(lambda count: jax.random.split(jax.random.key(0), count)),
        st.integers(2, 3).map(lambda count: jax.random.split(jax.random.PRNGKey(0), count)),
        hnp.arrays(st.sampled_from([np.int32, np.float32, np.uint8]), st.sampled_from([(), (2,), (4,)])),
        hnp.arrays(np.uint32, st.sampled_from([(), (1,), (3,), (2, 2)])),
    )


def not_choices(*accepted: str) -> st.SearchStrategy[Any]:
    """Anything but one of the ``accepted`` strings: other strings (an accepted one upper-cased
    among them), ints, None, an array of the accepted strings."""
    return st.one_of(
        st.text(max_size=6).filter(lambda text: text not in accepted),
        st.sampled_from(accepted).map(str.upper),
        st.integers(),
        st.none(),
        st.just(np.array(accepted)),
    )


def not_bools() -> st.SearchStrategy[Any]:
    """Anything but True or False: ints (0 and 1 too), NumPy bools, strings, floats, None."""
    return st.one_of(st.integers(), st.just(np.True_), st.text(max_size=3), st.floats(), st.none())


def not_devices() -> st.SearchStrategy[Any]:
    """Anything but None, a count of the devices there are, or a collection of distinct devices."""
    device = jax.devices()[0]
    return st.one_of(
        st.integers(max_value=0),
        st.integers(min_value=jax.device_count() + 1),
        st.floats(),
        st.booleans(),
        st.text(max_size=3),
        st.just([]),
        st.lists(st.integers(), min_size=1, max_size=2),
        st.just([device, device]),
    )


def not_data_meshes() -> st.SearchStrategy[Any]:
    """Anything but a mesh of the single axis 'data': ints, strings, a mesh of another axis."""
    return st.one_of(st.integers(), st.text(max_size=3), st.just(Mesh(np.asarray(jax.devices()), ("rows",))))


def impossible_path_strings() -> st.SearchStrategy[str]:
    """Strings no file system takes as a path: the empty one, and those holding a NUL."""
    return st.one_of(st.just(""), st.text(max_size=4).map(lambda text: text + "\x00"))


def not_paths() -> st.SearchStrategy[Any]:
    """Values that name no path: :func:`impossible_path_strings`, numbers, None, bytes, lists."""
    return st.one_of(
        impossible_path_strings(),
        st.integers(),
        st.floats(),
        st.none(),
        st.binary(max_size=4),
        st.lists(st.text(max_size=3), max_size=2),
    )


def not_number_arrays(length: int) -> st.SearchStrategy[np.ndarray]:
    """Arrays of ``length`` strings, objects, complex numbers or dates."""
    return st.sampled_from(["U3", object, np.complex64, "datetime64[s]"]).map(lambda dtype: np.zeros(length, dtype))


def bad_columns(num_rows: int) -> st.SearchStrategy[Any]:
    """Values that are no column of ``num_rows`` observations: :func:`not_number_arrays`, scalars,
    ragged nested lists."""
    return st.one_of(
        not_number_arrays(num_rows),
        st.one_of(st.floats(), st.integers(), st.just(np.float32(1.0)), st.just(np.zeros(()))),
        st.just([[0.0]] * (num_rows - 1) + [[0.0, 1.0]]),
    )


def one_argument(names: Sequence[str], values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """``{name: value}``: one of the arguments ``names`` and a value for it."""
    return st.tuples(st.sampled_from(names), values).map(lambda pair: {pair[0]: pair[1]})


class BadData(NamedTuple):
    """A value of a data argument and the entry its error names (``None``: the mapping itself)."""

    data: Any
    entry: str | None

    def names(self, argument: str) -> tuple[str]:
        return (argument if self.entry is None else f"{argument}[{self.entry!r}]",)


def bad_data(valid: Mapping[str, np.ndarray]) -> st.SearchStrategy[BadData]:
    """``valid`` broken one way: not a mapping, empty, a key that is no keyword name, one
    column that is no column, columns of different lengths, no rows at all."""
    num_rows = len(next(iter(valid.values())))
    column = st.sampled_from(sorted(valid))
    return st.one_of(
        st.one_of(st.none(), st.integers(), st.text(max_size=3), st.just(list(valid.values()))).map(
            lambda data: BadData(data, None)
        ),
        st.just(BadData({}, None)),
        st.one_of(st.integers(), st.text(max_size=4).filter(lambda key: not key.isidentifier())).map(
            lambda key: BadData({**valid, key: valid[next(iter(valid))]}, None)
        ),
        st.tuples(column, bad_columns(num_rows)).map(lambda pair: BadData({**valid, pair[0]: pair[1]}, pair[0])),
        st.tuples(column, st.integers(1, 2 * num_rows).filter(lambda rows: rows != num_rows)).map(
            lambda pair: BadData({**valid, pair[0]: np.resize(valid[pair[0]], pair[1])}, None)
        ),
        st.just(BadData({key: value[:0] for key, value in valid.items()}, None)),
    )


# Left out: a y of two columns, which the model only conditions on: fit blames the guide ("the guide
# does not fit the model"), log_likelihood raises NumPy's ValueError, the other predictions accept it.
def data_the_model_does_not_take() -> st.SearchStrategy[BadData]:
    """``DATA`` with a key that is none of ``linear_model``'s parameters, or with an ``x`` of two
    columns, which the model cannot broadcast with its draws."""
    return st.one_of(
        st.from_regex(r"[a-z]\w{0,5}", fullmatch=True)
        .filter(lambda key: key not in DATA)
        .map(lambda key: BadData({**DATA, key: DATA["x"]}, None)),
        st.just(BadData({**DATA, "x": np.stack([DATA["x"]] * 2, axis=1)}, None)),
    )


# -- the properties ------------------------------------------------------------------------------


def assert_refused(call: Callable[[], object], *names: str) -> None:
    """``call()`` raises one of the library's errors, and its message contains one of ``names``."""
    with pytest.raises(AimzTrainerError) as caught:
        call()
    message = str(caught.value)
    assert any(name in message for name in names), f"the message names none of {names}: {message}"


def snapshot(root: Path) -> dict[str, tuple[int, str | None]]:
    """Every entry under ``root`` (``root`` too): its modification time, a file's digest."""
    return {
        str(path.relative_to(root)): (
            path.stat().st_mtime_ns,
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None,
        )
        for path in [root, *root.rglob("*")]
    }


def assert_refused_leaving(root: Path, call: Callable[[], object], *names: str) -> None:
    """:func:`assert_refused`, and nothing under ``root`` was created, changed or removed."""
    before = snapshot(root)
    assert_refused(call, *names)
    assert snapshot(root) == before


def quoted(path: Any) -> str:
    """How an error names a path it was given."""
    return repr(str(path))


# -- the workspace ---------------------------------------------------------------------------------


class Workspace(NamedTuple):
    """The module's files (under ``root``), the objects that wrote them, and wrong places."""

    root: Path
    checkpoints: Path  # a fit's ModelCheckpoint directory, one checkpoint at step 4
    predictions: Path  # a complete store written by Predictor.predict, and an unrelated file
    store: Path
    interrupted: Path  # an interrupted store of another computation, named like predict's
    trainer: Trainer  # the fitted trainer
    posterior: dict[str, Any]
    writers: list[Callback]  # ModelCheckpoint, CSVLogger and TensorBoardLogger of the fit's files
    not_stores: tuple[Path, ...]
    not_checkpoints: tuple[Path, ...]
    not_directories: tuple[Path, ...]  # where no directory can be created

    def __repr__(self) -> str:  # what hypothesis prints of a failing example
        return f"Workspace({str(self.root)!r})"

    def fit(self, trainer_arguments: Mapping[str, Any] | None = None, **fit_arguments: Any) -> Any:
        """A fit of the workspace's writers with valid arguments, but for those given."""
        trainer = Trainer(
            **{"max_epochs": 3, "callbacks": self.writers, "enable_progress_bar": False, **(trainer_arguments or {})}
        )
        return trainer.fit(**{"svi": SVI_, "train_data": DATA, "batch_size": BATCH_SIZE, **fit_arguments})

    def predictor(self, **arguments: Any) -> Predictor:
        return Predictor(**{"model": MODEL, "posterior": self.posterior, "rows_per_key": BATCH_SIZE, **arguments})


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("workspace")
    checkpoints, metrics, events = root / "checkpoints", root / "metrics.csv", root / "events"
    trainer = Trainer(
        max_epochs=1,
        rng_key=jax.random.key(0),
        callbacks=[ModelCheckpoint(checkpoints), CSVLogger(metrics), TensorBoardLogger(events)],
        enable_progress_bar=False,
    )
    result = trainer.fit(SVI_, DATA, batch_size=BATCH_SIZE, num_samples=4)
    predictions = root / "predictions"
    Predictor(MODEL, result.posterior, rows_per_key=BATCH_SIZE).predict(DATA, output_dir=predictions)
    (store,) = predictions.iterdir()
    (predictions / "notes.txt").write_text("not a store")
    interrupted = root / "interrupted" / "predict-20000101T000000000000"
    spec = ArraySpec("posterior_predictive", "y", (1, 4, NUM_ROWS), np.dtype(np.float32), ("chain", "draw", "obs"), 2)
    ZarrStore(interrupted, [spec], batch_size=BATCH_SIZE).abort()
    damaged = root / "damaged"
    shutil.copytree(checkpoints, damaged)
    (damaged / "4" / "state" / "arrays.npz").unlink()
    (root / "empty").mkdir()
    notes = root / "notes.txt"
    notes.write_text("not a checkpoint")
    # Constructed before any snapshot: they create and probe their directories.
    writers = [ModelCheckpoint(checkpoints), CSVLogger(metrics), TensorBoardLogger(events)]
    return Workspace(
        root=root,
        checkpoints=checkpoints,
        predictions=predictions,
        store=store,
        interrupted=interrupted,
        trainer=trainer,
        posterior=result.posterior,
        writers=writers,
        not_stores=(root / "missing", notes, root / "empty", checkpoints, interrupted, store / "posterior", root),
        not_checkpoints=(root / "missing", notes, root / "empty", store, damaged / "4", damaged, root),
        not_directories=(notes, notes / "below", store / "zarr.json" / "below"),
    )


# -- Trainer ---------------------------------------------------------------------------------------


@examples
@given(
    argument=st.sampled_from(
        ["max_epochs", "max_steps", "log_every_n_steps", "check_val_every_n_epoch", "steps_per_chunk"]
    ),
    value=not_counts(1),
)
def test_trainer_refuses_a_count_that_is_not_a_positive_int(argument, value):
    assert_refused(lambda: Trainer(**{"max_epochs": 1, argument: value}), argument)


@examples
@given(
    value=st.one_of(
        st.integers(max_value=0),
        st.floats().filter(lambda fraction: not 0 < fraction <= 1),
        st.booleans(),
        st.text(max_size=3),
    )
)
def test_trainer_refuses_a_val_check_interval_that_is_no_step_count_or_fraction(value):
    assert_refused(lambda: Trainer(max_epochs=1, val_check_interval=value), "val_check_interval")


@examples
@given(value=not_choices("raise", "warn"))
def test_trainer_refuses_an_unknown_nonfinite_loss_mode(value):
    assert_refused(lambda: Trainer(max_epochs=1, nonfinite_loss=value), "nonfinite_loss")


@examples
@given(value=not_devices())
def test_every_entry_point_taking_devices_refuses_what_names_no_devices(value):
    assert_refused(lambda: make_mesh(value), "devices")
    assert_refused(lambda: Trainer(max_epochs=1, devices=value), "devices")
    assert_refused(lambda: ImpactModel(MODEL, jax.random.key(0), SVI_, param_input="x", devices=value), "devices")


@examples
@given(value=not_bools())
def test_trainer_refuses_an_enable_progress_bar_that_is_not_a_bool(value):
    assert_refused(lambda: Trainer(max_epochs=1, enable_progress_bar=value), "enable_progress_bar")


@examples
@given(value=not_data_meshes())
def test_trainer_refuses_a_mesh_that_is_no_data_mesh(value):
    assert_refused(lambda: Trainer(max_epochs=1, mesh=value), "mesh")


@examples
@given(value=not_keys())
def test_every_entry_point_taking_a_key_refuses_what_is_not_one_key(value):
    assert_refused(lambda: Trainer(max_epochs=1, rng_key=value), "rng_key")
    assert_refused(lambda: Predictor(MODEL, {"w": np.ones(4)}, rng_key=value), "rng_key")
    assert_refused(lambda: ImpactModel(MODEL, value, SVI_, param_input="x"), "rng_key")


@examples
@given(
    value=st.lists(
        st.one_of(st.integers(), st.text(max_size=3), st.just(ModelCheckpoint), st.just(lambda: None)), min_size=1
    )
)
def test_trainer_and_impact_model_refuse_callbacks_that_are_not_callbacks(value):
    assert_refused(lambda: Trainer(max_epochs=1, callbacks=value), "callbacks")
    im = ImpactModel(MODEL, jax.random.key(0), SVI_, param_input="x")
    assert_refused(lambda: im.fit(DATA["x"], DATA["y"], callbacks=value, progress=False), "callbacks")


@examples
@given(value=st.one_of(st.integers(), st.floats(), st.just(EarlyStopping("val_loss"))))
def test_trainer_and_impact_model_refuse_callbacks_that_are_no_sequence(value):
    assert_refused(lambda: Trainer(max_epochs=1, callbacks=value), "callbacks")
    im = ImpactModel(MODEL, jax.random.key(0), SVI_, param_input="x")
    assert_refused(lambda: im.fit(DATA["x"], DATA["y"], callbacks=value, progress=False), "callbacks")


# -- Trainer.fit: nothing is written, not even by the fit's loggers and checkpoints ------------------


@examples
@given(value=st.one_of(st.none(), st.integers(), st.text(max_size=3), st.just(MODEL)))
def test_fit_refuses_an_svi_that_is_not_one(workspace, value):
    assert_refused_leaving(workspace.root, lambda: workspace.fit(svi=value), "svi")


@examples
@given(bad=st.one_of(bad_data(DATA), data_the_model_does_not_take()))
def test_fit_refuses_train_data_that_are_no_data_of_the_model(workspace, bad):
    assert_refused_leaving(workspace.root, lambda: workspace.fit(train_data=bad.data), *bad.names("train_data"))


@examples
@given(value=st.one_of(not_counts(1), st.none(), st.integers(min_value=NUM_ROWS + 1)))
def test_fit_refuses_a_batch_size_that_is_no_count_of_the_rows(workspace, value):
    assert_refused_leaving(workspace.root, lambda: workspace.fit(batch_size=value), "batch_size")


@examples
@given(
    bad=st.one_of(
        bad_data(DATA).filter(lambda bad: bad.data is not None),  # None: no validation
        st.just(BadData({"x": DATA["x"]}, None)),  # other keys than train_data's
        st.just(BadData({**DATA, "x": np.zeros((NUM_ROWS, 2), np.float32)}, "x")),  # other rows
    )
)
def test_fit_refuses_val_data_that_are_no_held_out_rows_of_the_data(workspace, bad):
    assert_refused_leaving(workspace.root, lambda: workspace.fit(val_data=bad.data), *bad.names("val_data"))


@examples
@given(argument=st.sampled_from(["val_batch_size", "val_num_samples"]), value=not_counts(1))
def test_fit_refuses_a_validation_count_that_is_not_a_positive_int(workspace, argument, value):
    assert_refused_leaving(workspace.root, lambda: workspace.fit(val_data=DATA, **{argument: value}), argument)


@examples
@given(argument=st.sampled_from(["shuffle", "drop_last"]), value=not_bools())
def test_fit_refuses_a_flag_that_is_not_a_bool(workspace, argument, value):
    assert_refused_leaving(workspace.root, lambda: workspace.fit(**{argument: value}), argument)


@examples
@given(value=st.one_of(not_counts(0), st.none()))
def test_fit_refuses_a_num_samples_that_is_no_count(workspace, value):
    assert_refused_leaving(workspace.root, lambda: workspace.fit(num_samples=value), "num_samples")


@examples
@given(value=not_choices("auto", "device", "host"))
def test_fit_refuses_an_unknown_data_placement(workspace, value):
    assert_refused_leaving(workspace.root, lambda: workspace.fit(data_placement=value), "data_placement")


@examples
@given(data=st.data())
def test_fit_refuses_a_ckpt_path_that_is_no_checkpoint(workspace, data):
    value = data.draw(
        st.one_of(
            st.floats(),
            st.booleans(),
            st.binary(max_size=3),
            st.lists(st.integers(), max_size=2),
            st.just(np.array([1, 2])),
            impossible_path_strings(),
            st.sampled_from(workspace.not_checkpoints),
        )
    )
    assert_refused_leaving(workspace.root, lambda: workspace.fit(ckpt_path=value), "ckpt_path", quoted(value))


@examples
@given(step=st.one_of(st.integers().filter(lambda step: step != 4), st.just("last")))
def test_fit_refuses_a_ckpt_path_step_its_model_checkpoint_does_not_hold(workspace, step):
    if step != "last":  # "last" with nothing saved yet starts the fit (test_checkpoint.py)
        empty = Trainer(max_epochs=3, callbacks=[ModelCheckpoint(workspace.root / "empty")], enable_progress_bar=False)
        assert_refused_leaving(
            workspace.root, lambda: empty.fit(SVI_, DATA, batch_size=BATCH_SIZE, ckpt_path=step), "ckpt_path"
        )
    without = Trainer(max_epochs=3, enable_progress_bar=False)
    assert_refused_leaving(
        workspace.root, lambda: without.fit(SVI_, DATA, batch_size=BATCH_SIZE, ckpt_path=step), "ckpt_path"
    )
    if step != "last":
        assert_refused_leaving(workspace.root, lambda: workspace.fit(ckpt_path=step), "ckpt_path")


@examples
@given(
    mismatch=st.sampled_from(
        [
            ({}, {"batch_size": 16}, "batch_size"),
            ({}, {"batch_size": 4}, "batch_size"),
            ({}, {"shuffle": False}, "shuffle"),
            ({}, {"drop_last": True}, "drop_last"),
            ({"max_epochs": 1}, {}, "max_epochs"),
            ({"max_steps": 3}, {}, "max_steps"),
            ({"log_every_n_steps": 3}, {}, "log_every_n_steps"),
        ]
    ),
    ckpt_path=st.sampled_from(["last", 4, "checkpoints", "checkpoints/4"]),
)
def test_fit_refuses_to_resume_a_checkpoint_of_another_fit_naming_what_differs(workspace, mismatch, ckpt_path):
    trainer_arguments, fit_arguments, differing = mismatch
    if ckpt_path not in ("last", 4):
        ckpt_path = workspace.root / ckpt_path
    assert_refused_leaving(
        workspace.root, lambda: workspace.fit(trainer_arguments, ckpt_path=ckpt_path, **fit_arguments), differing
    )


# -- Trainer.sample_posterior -----------------------------------------------------------------------


@examples
@given(num_samples=st.one_of(not_counts(1), st.none()), rng_key=not_keys())
def test_sample_posterior_refuses_a_bad_count_or_key(workspace, num_samples, rng_key):
    assert_refused(lambda: workspace.trainer.sample_posterior(num_samples), "num_samples")
    assert_refused(lambda: workspace.trainer.sample_posterior(4, rng_key), "rng_key")


# -- Predictor ------------------------------------------------------------------------------------


@examples
@given(
    arguments=st.one_of(
        one_argument(["model"], st.one_of(st.none(), st.integers(), st.text(max_size=3))),
        one_argument(["mesh"], not_data_meshes()),
        one_argument(
            ["posterior"],
            st.one_of(
                st.integers(),
                st.text(max_size=3),
                st.just([np.ones(4)]),
                st.just({}),
                st.just({"w": np.float32(1.0), "b": np.ones(4)}),  # no draw axis
                st.just({"w": np.ones(4), "b": np.ones(5)}),  # other draw counts
            ),
        ),
        one_argument(["draws_per_chunk", "rows_per_key", "rows_per_tile"], not_counts(1)),
        one_argument(["rows_per_tile"], st.integers(1, 100).filter(lambda rows: rows % BATCH_SIZE)),
        one_argument(["compress_floats", "check_finite"], not_bools()),
        one_argument(["guide"], st.just(SVI_.guide)),  # without params
        one_argument(["params"], st.just({"w_auto_loc": np.zeros(())})),  # without a guide
        st.fixed_dictionaries({"guide": st.one_of(st.integers(), st.text(max_size=3)), "params": st.just({})}),
        st.fixed_dictionaries({"guide": st.just(SVI_.guide), "params": st.one_of(st.integers(), st.text(max_size=3))}),
        one_argument(["static_kwargs"], st.one_of(st.integers(), st.text(max_size=3), st.just([1]))),
    )
)
def test_predictor_refuses_bad_arguments(workspace, arguments):
    assert_refused(lambda: workspace.predictor(**arguments), *arguments)


@examples
@given(site=st.sampled_from(["w", "b"]), draws=not_number_arrays(4))
def test_predictor_refuses_posterior_draws_that_are_no_numbers(workspace, site, draws):
    posterior = {**workspace.posterior, site: draws}
    assert_refused(lambda: workspace.predictor(posterior=posterior), f"posterior[{site!r}]")


@examples
@given(bad=st.one_of(bad_data(DATA), data_the_model_does_not_take()), method=st.sampled_from(PREDICTION_METHODS))
def test_predictions_refuse_data_that_are_no_data_of_the_model(workspace, bad, method):
    call = getattr(workspace.predictor(), method)
    assert_refused_leaving(workspace.root, lambda: call(bad.data, output_dir=workspace.predictions), *bad.names("data"))


# The Predictor checks every data array before it runs the model: observed values (y) too, which
# predictions copy to observed_data.
@examples
@given(
    method=st.sampled_from(PREDICTION_METHODS),
    column=st.sampled_from(sorted(DATA)),
    row=st.integers(0, NUM_ROWS - 1),
    value=st.sampled_from([np.nan, np.inf, -np.inf]),
)
def test_predictions_refuse_data_holding_nan_or_infinity(workspace, method, column, row, value):
    data = {**DATA, column: DATA[column].copy()}
    data[column][row] = value
    call = getattr(workspace.predictor(), method)
    assert_refused_leaving(workspace.root, lambda: call(data, output_dir=workspace.predictions), f"data[{column!r}]")


@examples
@given(site=st.sampled_from(["w", "b"]), draw=st.integers(0, 3), value=st.sampled_from([np.nan, np.inf]))
def test_predict_refuses_a_posterior_holding_nan_or_infinity(workspace, site, draw, value):
    posterior = {name: np.array(draws) for name, draws in workspace.posterior.items()}
    posterior[site][draw] = value
    predictor = workspace.predictor(posterior=posterior)
    assert_refused_leaving(
        workspace.root, lambda: predictor.predict(DATA, output_dir=workspace.predictions), f"posterior[{site!r}]"
    )


@examples
@given(
    change=st.tuples(
        st.sampled_from([(), ("w",), ("b",), ("w", "b")]),
        st.lists(st.text(max_size=4).filter(lambda name: name not in SITES), max_size=2, unique=True),
    ).filter(any)
)
def test_predict_refuses_a_posterior_that_is_not_of_the_models_latent_sites(workspace, change):
    dropped, extra = change
    posterior = {name: draws for name, draws in workspace.posterior.items() if name not in dropped}
    posterior.update({name: workspace.posterior["w"] for name in extra})
    call = lambda: workspace.predictor(posterior=posterior).predict(DATA, output_dir=workspace.predictions)  # noqa: E731
    assert_refused_leaving(workspace.root, call, "posterior")


@examples
@given(value=st.one_of(not_counts(1), st.none()), method=st.sampled_from(PREDICTION_METHODS))
def test_predictions_refuse_a_batch_size_that_is_not_a_positive_int(workspace, value, method):
    call = getattr(workspace.predictor(), method)
    assert_refused_leaving(
        workspace.root, lambda: call(DATA, batch_size=value, output_dir=workspace.predictions), "batch_size"
    )


@examples
@given(value=not_counts(1))
def test_sample_prior_predictive_refuses_a_num_samples_that_is_not_a_positive_int(workspace, value):
    predictor = workspace.predictor()
    assert_refused_leaving(
        workspace.root,
        lambda: predictor.sample_prior_predictive(DATA, num_samples=value, output_dir=workspace.predictions),
        "num_samples",
    )
    im = ImpactModel(MODEL, jax.random.key(0), SVI_, param_input="x")
    assert_refused_leaving(
        workspace.root,
        lambda: im.sample_prior_predictive(DATA["x"], num_samples=value, output_dir=workspace.predictions),
        "num_samples",
    )


@examples
@given(
    intervention=st.one_of(
        st.dictionaries(st.text(max_size=4).filter(lambda name: name not in SITES), st.floats(), min_size=1),
        st.just({"mu": 1.0}),  # a deterministic site
        st.tuples(
            st.sampled_from(["w", "b", "y"]),
            st.sampled_from([(2,), (NUM_ROWS + 1,), (2, NUM_ROWS), (NUM_ROWS, 1)]),
        ).map(lambda pair: {pair[0]: np.zeros(pair[1], np.float32)}),
        st.tuples(st.sampled_from(["w", "b"]), st.sampled_from([np.nan, np.inf])).map(lambda pair: {pair[0]: pair[1]}),
        st.tuples(
            st.sampled_from(["w", "b", "y"]), st.one_of(st.text(max_size=3), st.none(), st.binary(max_size=2))
        ).map(lambda pair: {pair[0]: pair[1]}),  # no numbers
    )
)
def test_predict_refuses_an_intervention_that_is_not_numbers_of_a_sample_sites_shape(workspace, intervention):
    predictor = workspace.predictor()
    assert_refused_leaving(
        workspace.root,
        lambda: predictor.predict(DATA, intervention=intervention, output_dir=workspace.predictions),
        "intervention",
    )


@examples
@given(
    return_sites=st.one_of(
        st.text(max_size=4).filter(lambda name: name not in SITES),
        st.lists(st.text(max_size=4).filter(lambda name: name not in SITES), min_size=1, max_size=2),
        st.sampled_from(["w", ["y", "b"]]),  # posterior draws, not predictions
    )
)
def test_predict_refuses_return_sites_that_are_not_predicted_sites(workspace, return_sites):
    predictor = workspace.predictor()
    assert_refused_leaving(
        workspace.root,
        lambda: predictor.predict(DATA, return_sites=return_sites, output_dir=workspace.predictions),
        "return_sites",
    )


# None is no bad value for output_dir: the store goes to a scratch directory.
@examples
@given(data=st.data(), method=st.sampled_from(PREDICTION_METHODS))
def test_predictions_refuse_arguments_of_another_kind(workspace, data, method):
    call = getattr(workspace.predictor(), method)
    regular_files = sorted(path for path in workspace.root.rglob("*") if path.is_file())
    bad_values = {
        "output_dir": st.one_of(
            not_paths().filter(lambda path: path is not None),
            st.sampled_from(regular_files),
            st.sampled_from(regular_files).map(lambda path: path / "below"),
        ),
        "intervention": st.one_of(st.integers(), st.text(max_size=3), st.just([("w", 1.0)])),
        "return_sites": st.one_of(st.integers(), st.floats(), st.just([5])),
        "in_sample": not_bools(),
        "resume": not_bools(),
        "progress": not_bools(),
    }
    taken = inspect.signature(call).parameters
    arguments = data.draw(
        st.one_of(*(one_argument([name], values) for name, values in bad_values.items() if name in taken))
    )
    call_arguments = {"output_dir": workspace.predictions, **arguments}
    assert_refused_leaving(workspace.root, lambda: call(DATA, **call_arguments), *arguments)


@pytest.mark.parametrize("output_dir", ["predictions", "interrupted"])  # complete stores; another's store
def test_predict_refuses_to_resume_where_no_store_of_its_own_was_interrupted(workspace, output_dir):
    predictor = workspace.predictor()
    call = lambda: predictor.predict(DATA, resume=True, output_dir=workspace.root / output_dir)  # noqa: E731
    assert_refused_leaving(workspace.root, call, "resume")


@examples
@given(data=st.data())
def test_estimate_effect_refuses_what_are_not_two_predictions_of_one_site(workspace, data):
    tree = open_store(workspace.store)
    other_rows = tree.isel(data=slice(1, None))
    out_of_sample = xr.DataTree.from_dict({"predictions": tree["posterior_predictive"].to_dataset()})
    not_trees = st.one_of(
        st.none(), st.integers(), st.text(max_size=3), st.just(xr.DataTree()), st.just(tree["posterior"])
    )
    arguments = data.draw(
        st.one_of(
            one_argument(
                ["baseline", "intervened"], st.one_of(not_trees, st.sampled_from([other_rows, out_of_sample]))
            ),
            one_argument(
                ["site"],
                st.one_of(
                    st.none(),
                    st.integers(),
                    st.just(["y"]),
                    st.text(max_size=3).filter(lambda site: site not in SITES),
                    st.just("w"),
                ),
            ),
            one_argument(
                ["ci"],
                st.one_of(
                    st.floats().filter(lambda ci: not 0 < ci <= 1), st.booleans(), st.text(max_size=3), st.none()
                ),
            ),
        )
    )
    assert_refused(
        lambda: estimate_effect(**{"baseline": tree, "intervened": tree, "site": "y", **arguments}), *arguments
    )


# -- ImpactModel ----------------------------------------------------------------------------------


# Left out: an inference that is no SVI (inference=5): ImpactModel raises a plain TypeError for it on purpose.
@examples
@given(
    arguments=st.one_of(
        one_argument(["kernel"], st.one_of(st.none(), st.integers(), st.text(max_size=3))),
        one_argument(
            ["param_input", "param_output"],
            st.one_of(
                st.text(max_size=3).filter(lambda name: name not in ("x", "y")),
                st.lists(st.sampled_from(["x", "y"]), min_size=1, max_size=2),  # names, not a name
                st.integers(),
            ),
        ),
    )
)
def test_impact_model_refuses_a_kernel_or_parameter_names_it_does_not_have(arguments):
    valid = {"kernel": MODEL, "rng_key": jax.random.key(0), "inference": SVI_, "param_input": "x"}
    assert_refused(lambda: ImpactModel(**{**valid, **arguments}), *arguments)


FIT_ARGUMENTS = {
    name for method in (ImpactModel.fit, Trainer.__init__, Trainer.fit) for name in inspect.signature(method).parameters
}


@examples
@given(
    arguments=st.one_of(
        one_argument(["X", "y"], bad_columns(NUM_ROWS)),
        one_argument(["num_samples"], st.one_of(not_counts(0), st.none())),
        one_argument(["batch_size"], st.one_of(not_counts(1), st.integers(min_value=NUM_ROWS + 1))),
        one_argument(["epochs"], st.one_of(not_counts(1), st.none())),
        st.dictionaries(
            st.from_regex(r"[a-z]\w{0,8}", fullmatch=True).filter(lambda name: name not in FIT_ARGUMENTS),
            st.integers(),
            min_size=1,
            max_size=2,
        ),
    )
)
def test_impact_model_fit_refuses_bad_arguments_writing_nothing(workspace, arguments):
    im = ImpactModel(MODEL, jax.random.key(0), SVI_, param_input="x")
    fit_arguments = {"X": DATA["x"], "y": DATA["y"], "progress": False, "callbacks": workspace.writers, **arguments}
    # The rows are the Trainer's train_data (or X / y, checked first); keyword arguments the fit
    # does not take are named.
    names = ["train_data" if name in ("X", "y") else name for name in arguments]
    names += [repr(name) for name in arguments] + [f"fit: {name} " for name in arguments]
    assert_refused_leaving(workspace.root, lambda: im.fit(**fit_arguments), *names)


# -- callbacks ------------------------------------------------------------------------------------


@examples
@given(
    arguments=st.one_of(
        one_argument(["every_n_epochs", "every_n_train_steps"], not_counts(0)),
        one_argument(["mode"], not_choices("min", "max")),
        one_argument(["save_last", "async_save"], not_bools()),
        one_argument(["save_top_k"], st.one_of(st.integers(max_value=-2), st.just(0), st.floats(), st.booleans())),
        one_argument(["monitor"], st.one_of(st.just(""), st.integers(), st.just(["val_loss"]))),
        one_argument(["dirpath"], not_paths()),
    )
)
def test_model_checkpoint_refuses_bad_arguments_creating_nothing(workspace, arguments):
    call = lambda: ModelCheckpoint(**{"dirpath": workspace.root / "new", **arguments})  # noqa: E731
    assert_refused_leaving(workspace.root, call, *arguments)


@examples
@given(data=st.data())
def test_writers_refuse_a_directory_they_cannot_create_creating_nothing(workspace, data):
    path = data.draw(st.sampled_from(workspace.not_directories))
    assert_refused_leaving(workspace.root, lambda: ModelCheckpoint(path), "dirpath")
    assert_refused_leaving(workspace.root, lambda: TensorBoardLogger(path), "log_dir")
    assert_refused_leaving(workspace.root, lambda: CSVLogger(path / "metrics.csv"), "path")


@examples
@given(value=not_paths())
def test_loggers_refuse_what_is_no_path_creating_nothing(workspace, value):
    assert_refused_leaving(workspace.root, lambda: CSVLogger(value), "path")
    assert_refused_leaving(workspace.root, lambda: TensorBoardLogger(value), "log_dir")


def test_csv_logger_refuses_a_directory(workspace):
    assert_refused_leaving(workspace.root, lambda: CSVLogger(workspace.checkpoints), "path")


@examples
@given(
    arguments=st.one_of(
        one_argument(
            ["hparams"],
            st.one_of(
                st.integers(),
                st.text(max_size=3),
                st.just([("learning_rate", 0.1)]),
                st.dictionaries(st.integers(), st.floats(), min_size=1),
                st.dictionaries(
                    st.text(max_size=3),
                    st.one_of(st.none(), st.lists(st.integers(), max_size=2), st.just(np.zeros(2))),
                    min_size=1,
                ),
            ),
        ),
        one_argument(["log_histograms"], not_bools()),
    )
)
def test_tensorboard_logger_refuses_bad_hparams_or_flags_creating_nothing(workspace, arguments):
    assert_refused_leaving(workspace.root, lambda: TensorBoardLogger(workspace.root / "new", **arguments), *arguments)


@examples
@given(
    arguments=st.one_of(
        one_argument(["monitor"], st.one_of(st.just(""), st.integers(), st.none(), st.just(["val_loss"]))),
        one_argument(["mode"], not_choices("min", "max")),
        one_argument(["patience"], not_counts(0)),
        one_argument(
            ["min_delta"],
            st.one_of(
                st.floats(max_value=0, exclude_max=True),
                st.sampled_from([np.nan, np.inf]),
                st.booleans(),
                st.text(max_size=3),
                st.none(),
            ),
        ),
        one_argument(
            ["stopping_threshold", "divergence_threshold"],
            st.one_of(st.just(np.nan), st.booleans(), st.text(max_size=3), st.just([1.0])),
        ),
        one_argument(["check_finite", "strict"], not_bools()),
        one_argument(["check_on_train_epoch_end"], not_bools().filter(lambda flag: flag is not None)),
    )
)
def test_early_stopping_refuses_bad_arguments(arguments):
    assert_refused(lambda: EarlyStopping(**{"monitor": "val_loss", **arguments}), *arguments)


@examples
@given(
    arguments=st.one_of(
        one_argument(["num_samples"], st.one_of(not_counts(1), st.none())),
        one_argument(["every_n_epochs"], not_counts(1)),
    )
)
def test_posterior_sampler_refuses_counts_that_are_not_positive_ints(arguments):
    assert_refused(lambda: PosteriorSampler(**{"num_samples": 4, **arguments}), *arguments)


# -- stores and checkpoints on disk ---------------------------------------------------------------


@pytest.mark.parametrize("read", [open_store, verify_store])
@examples
@given(data=st.data())
def test_store_readers_refuse_what_is_no_complete_store_changing_nothing(workspace, read, data):
    path = data.draw(st.one_of(not_paths(), st.sampled_from(workspace.not_stores)))
    assert_refused_leaving(workspace.root, lambda: read(path), quoted(path))


@examples
@given(data=st.data())
def test_load_checkpoint_refuses_what_is_no_checkpoint_changing_nothing(workspace, data):
    path = data.draw(st.one_of(impossible_path_strings(), st.sampled_from(workspace.not_checkpoints)))
    assert_refused_leaving(workspace.root, lambda: load_checkpoint(path), quoted(path))


@examples
@given(value=not_paths().filter(lambda value: not isinstance(value, str)))
def test_load_checkpoint_refuses_what_is_no_path_changing_nothing(workspace, value):
    assert_refused_leaving(workspace.root, lambda: load_checkpoint(value), "path")
