"""FitPrograms: each program of a fit traced and compiled once, on the thread meant for it."""

from __future__ import annotations

import threading
from collections import Counter

import jax
import numpy as np
import pytest
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from optax import adam, inject_hyperparams

import aimz_trainer.trainer as trainer_module
from aimz_trainer import Trainer
from aimz_trainer.compile import FitPrograms
from aimz_trainer.step import learning_rate

from .conftest import linear_data, linear_model, linear_svi, local_data, local_model

TRACE = "/jax/core/compile/jaxpr_trace_duration"
COMPILE = "/jax/core/compile/backend_compile_duration"  # a persistent-cache read counts too
PROGRAMS = ("init_with_params", "chunk_with_outputs", "validate", "sample")


def fitted(*, validate: bool = True, per_row_latents: bool = False, val_batch_size: int | None = None, optim=None):
    """``(trainer, result)``: 1,050 rows in batches of 100: 11 steps an epoch, in chunks of 4,
    4 and 3 (a short last chunk), validated every epoch on 200 more, then 3 posterior draws; of
    the linear model, or of one with a latent per row; with Adam at 0.05, or ``optim``."""
    data = local_data(1250)[0] if per_row_latents else linear_data(1250)
    train = {key: value[:1050] for key, value in data.items()}
    val = {key: value[1050:] for key, value in data.items()} if validate else None
    model = local_model(1050) if per_row_latents else linear_model(1050)
    svi = SVI(model, AutoNormal(model), adam(0.05) if optim is None else optim, Trace_ELBO())
    trainer = Trainer(max_epochs=2, steps_per_chunk=4, rng_key=jax.random.key(0), enable_progress_bar=False)
    return trainer, trainer.fit(svi, train, batch_size=100, val_data=val, val_batch_size=val_batch_size, num_samples=3)


def fit(*, validate: bool = True):
    return fitted(validate=validate)[1]


def test_each_program_is_traced_and_compiled_once_the_chunk_and_validation_off_the_main_thread():
    events: list[tuple[str, str, str]] = []

    def listener(event: str, duration: float, **kwargs) -> None:
        name = str(kwargs.get("fun_name")).removeprefix("jit(").removesuffix(")")  # a compile says jit(<name>)
        if event in (TRACE, COMPILE) and name in PROGRAMS:
            events.append((event, name, threading.current_thread().name))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        result = fit()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert result.losses.shape == (22,)
    traces = Counter(name for event, name, _ in events if event == TRACE)
    compiles = {name: thread for event, name, thread in events if event == COMPILE}
    # The short last chunk of each epoch runs the same program: no trace or compile per length.
    assert traces == dict.fromkeys(PROGRAMS, 1)
    assert Counter(name for event, name, _ in events if event == COMPILE) == dict.fromkeys(PROGRAMS, 1)
    # init, the chunk and validation (traced before the first step) compile on the workers,
    # while this thread traces; the draws compile here when first asked for.
    for name in ("init_with_params", "chunk_with_outputs", "validate"):
        assert compiles[name].startswith("aimz-compile")
    assert compiles["sample"] == threading.main_thread().name


def test_validation_is_traced_with_the_shapes_of_the_parameters_init_returns(monkeypatch):
    seen = {}
    lower_validation, start = FitPrograms._lower_validation, FitPrograms.start

    def spy_lower_validation(self, validate, params, validation):
        seen["shapes"] = params
        return lower_validation(self, validate, params, validation)

    def spy_start(self, record):
        outputs = start(self, record)
        seen["params"] = outputs[1]
        return outputs

    monkeypatch.setattr(FitPrograms, "_lower_validation", spy_lower_validation)
    monkeypatch.setattr(FitPrograms, "start", spy_start)
    fit()
    as_traced = jax.tree.map(lambda x: (x.shape, x.dtype, x.weak_type), seen["shapes"])
    assert as_traced == jax.tree.map(lambda x: (x.shape, x.dtype, jax.typeof(x).weak_type), seen["params"])


def test_validation_leaves_the_training_bitwise_unchanged():
    validated, plain = fit(), fit(validate=False)
    np.testing.assert_array_equal(validated.losses, plain.losses)
    for name in plain.params:
        np.testing.assert_array_equal(validated.params[name], plain.params[name])


@pytest.mark.parametrize("placement", ["device", "host"])
def test_grain_starts_while_the_chunk_compiles_when_records_need_no_rows_from_it(placement, monkeypatch):
    order: list[str] = []
    open_loader = trainer_module.make_chunk_loader

    def spy_loader(source, host_arrays, **kwargs):
        order.append("loader")
        return open_loader(source, host_arrays, **kwargs)

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == TRACE and kwargs.get("fun_name") == "chunk_with_outputs":
            order.append("chunk traced")

    monkeypatch.setattr(trainer_module, "make_chunk_loader", spy_loader)
    data = linear_data(1000)
    trainer = Trainer(max_epochs=1, rng_key=jax.random.key(0), enable_progress_bar=False)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        result = trainer.fit(linear_svi(1000), data, batch_size=100, data_placement=placement)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    # On the devices a record holds row indices only: the programs trace from the source's own
    # record and Grain opens after. From the host, the first record's gathered rows come first.
    expected = ["chunk traced", "loader"] if placement == "device" else ["loader", "chunk traced"]
    assert order == expected
    assert result.losses.shape == (10,)


@pytest.fixture
def set_ups_while_lowered(monkeypatch):
    """``{"count": n}``: how many times the last ``FitPrograms.lower`` set an ``AutoNormal`` up."""
    set_ups, seen = [], {}
    set_up, lower = AutoNormal._setup_prototype, FitPrograms.lower

    def counted(self, *args, **kwargs):
        set_ups.append(self)
        return set_up(self, *args, **kwargs)

    def lower_counted(self, *args, **kwargs):
        set_ups.clear()
        shapes = lower(self, *args, **kwargs)
        seen["count"] = len(set_ups)
        return shapes

    monkeypatch.setattr(AutoNormal, "_setup_prototype", counted)
    monkeypatch.setattr(FitPrograms, "lower", lower_counted)
    return seen


def test_init_and_the_chunk_share_one_traced_set_up_of_the_guide(monkeypatch, set_ups_while_lowered):
    result = fit(validate=False)
    # Traced apart, init and the chunk each set the guide up (2).
    assert set_ups_while_lowered == {"count": 1}
    # The programs split out of one trace compute what each traced on its own computes.
    monkeypatch.setattr("aimz_trainer.compile.split_trace", lambda *args, **kwargs: None)
    apart = fit(validate=False)
    assert set_ups_while_lowered == {"count": 2}
    np.testing.assert_array_equal(result.losses, apart.losses)
    for name in result.params:
        np.testing.assert_array_equal(result.params[name], apart.params[name])


@pytest.fixture
def lowered_texts(monkeypatch):
    """The text of each program the test lowers and compiles, by the name its module has."""
    texts: dict[str, list[str]] = {}
    compile_lowered = jax.stages.Lowered.compile

    def spy(self, *args, **kwargs):
        text = self.as_text()
        texts.setdefault(text.split("@", 1)[1].split(" ", 1)[0], []).append(text)
        return compile_lowered(self, *args, **kwargs)

    monkeypatch.setattr(jax.stages.Lowered, "compile", spy)
    return texts


def test_init_is_one_program_for_every_learning_rate_the_optimizer_keeps_in_its_state(monkeypatch, lowered_texts):
    # optax.inject_hyperparams keeps the rate in the optimizer's state, which init returns: as a
    # constant of init's program, it would make the program's text (its compilation-cache key)
    # change with the rate. Left out and put in after init runs, it does not.
    runs = {rate: fitted(optim=inject_hyperparams(adam)(learning_rate=rate)) for rate in (0.05, 0.02)}
    inits, chunks = lowered_texts["jit_init_with_params"], lowered_texts["jit_chunk_with_outputs"]
    assert len(inits) == len(chunks) == 2 and inits[0] == inits[1] and chunks[0] == chunks[1]
    assert "0.0199999996" not in inits[1] and "2.000000e-02" not in inits[1]
    for rate, (trainer, result) in runs.items():
        assert learning_rate(trainer.state.svi_state.optim_state) == np.float32(rate)  # put in after init
        # ... and the fit computes what the same fit traced apart, with the rate in init, does.
        with monkeypatch.context() as apart:
            apart.setattr("aimz_trainer.compile.split_trace", lambda *args, **kwargs: None)
            _, traced_apart = fitted(optim=inject_hyperparams(adam)(learning_rate=rate))
        np.testing.assert_array_equal(result.losses, traced_apart.losses)
        for name in result.params:
            np.testing.assert_array_equal(result.params[name], traced_apart.params[name])
    assert not np.array_equal(runs[0.05][1].losses, runs[0.02][1].losses)


def validated(**options):
    """The last validation pass's metrics and the losses of :func:`fitted` with ``options``."""
    trainer, result = fitted(**options)
    return {name: value for name, value in trainer.callback_metrics.items() if name.startswith("val_")}, result.losses


@pytest.mark.parametrize("per_row_latents", [False, True], ids=["global-latents", "per-row-latents"])
def test_validation_shares_the_one_traced_set_up_and_validates_as_traced_apart(
    monkeypatch, set_ups_while_lowered, per_row_latents
):
    metrics, losses = validated(per_row_latents=per_row_latents)
    # Traced apart, init, the chunk and validation each set the guide up (3). Validation's
    # guide draws run the model on the set-up's batch for sites it does not return: JAX's
    # dead-code elimination drops that, or validation could not be split out.
    assert set_ups_while_lowered == {"count": 1}
    monkeypatch.setattr("aimz_trainer.compile.split_trace", lambda *args, **kwargs: None)
    apart_metrics, apart_losses = validated(per_row_latents=per_row_latents)
    assert set_ups_while_lowered == {"count": 3}
    # bitwise: floats from the same computation (a model with per-row latents has no val_loss)
    assert metrics == apart_metrics and set(metrics) == ({"val_lpd"} if per_row_latents else {"val_lpd", "val_loss"})
    np.testing.assert_array_equal(losses, apart_losses)


def test_validation_batches_of_other_shapes_set_the_guide_up_on_their_own(set_ups_while_lowered):
    """A set-up's structure follows its batch's shapes: 120 rows is not the chunk's 100."""
    metrics, _ = validated(val_batch_size=120)
    assert set_ups_while_lowered == {"count": 2}
    assert np.isfinite(metrics["val_loss"]) and np.isfinite(metrics["val_lpd"])


def test_a_model_with_a_callback_is_traced_apart_and_trains_as_numpyro_does(set_ups_while_lowered):
    """A callback in the model would run in both programs split out of one trace: no split."""
    model = linear_model(200)
    seen = []

    def with_callback(x, y=None):
        jax.debug.callback(lambda rows: seen.append(int(rows)), x.shape[0])
        model(x, y)

    data = linear_data(200)
    trainer = Trainer(max_epochs=1, rng_key=jax.random.key(0), enable_progress_bar=False)
    svi = SVI(with_callback, AutoNormal(with_callback), adam(0.05), Trace_ELBO())
    result = trainer.fit(svi, data, batch_size=50)
    # The trace that could not be split, then init's and the chunk's, each on its own.
    assert set_ups_while_lowered == {"count": 3}
    assert seen and set(seen) == {50}  # the callback ran, on batches of 50 rows
    plain = Trainer(max_epochs=1, rng_key=jax.random.key(0), enable_progress_bar=False).fit(
        linear_svi(200), data, batch_size=50
    )
    np.testing.assert_allclose(result.losses, plain.losses, rtol=1e-6)
