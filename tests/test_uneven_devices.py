"""Batches that do not split evenly over the devices: padded, the padding masked out of the
ELBO, every value a one-device fit's.

In this process (one device), records padded as on 3 devices run through the compiled pieces
beside unpadded ones: the masking and the plate scale alone decide the values, whatever the
device count. In subprocesses with 3 and 1 forced CPU devices (``tests/uneven_worker.py``), the
Trainer's losses equal NumPyro's own ``SVI.update`` on the same batches, and the Predictor's
draws equal one device's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from optax import adam

from aimz_trainer.data import ChunkSource, ValidationSource, leading_batch
from aimz_trainer.errors import ConfigurationError
from aimz_trainer.plan import FitPlan
from aimz_trainer.plates import RowPadding, check_paddable, model_layout
from aimz_trainer.sharding import padded_batch_size
from aimz_trainer.step import make_init, make_params, make_posterior_sampler, make_train_chunk, make_validation_step

from .conftest import linear_data, linear_svi, local_data, local_model

NUM_ROWS, BATCH, STEPS, DEVICES = 64, 10, 4, 3  # 7 steps per epoch, the last one completed
PADDED = padded_batch_size(BATCH, DEVICES)  # 12


def fit_plan(devices: int) -> FitPlan:
    return FitPlan.create(
        NUM_ROWS, BATCH, drop_last=False, max_epochs=2, max_steps=None, steps_per_chunk=STEPS, devices=devices
    )


def chunk_source(devices: int, *, process_index: int = 0, process_count: int = 1) -> ChunkSource:
    return ChunkSource(
        fit_plan(devices), seed=[5], shuffle=True, process_index=process_index, process_count=process_count
    )


class TestPaddedRecords:
    def test_padding_columns_repeat_each_batchs_first_row(self):
        even, padded = chunk_source(1), chunk_source(DEVICES)
        assert fit_plan(DEVICES).padded_batch_size == PADDED and fit_plan(1).padded_batch_size == BATCH
        assert len(padded) == len(even)
        for index in range(len(even)):
            real, indices = even[index]["indices"], padded[index]["indices"]
            assert indices.shape == (STEPS, PADDED)
            np.testing.assert_array_equal(indices[:, :BATCH], real)  # the unpadded batches, unchanged
            np.testing.assert_array_equal(indices[:, BATCH:], np.repeat(real[:, :1], PADDED - BATCH, axis=1))

    def test_processes_split_the_padded_columns(self):
        whole = chunk_source(4)  # 10 rows on 4 devices: 12 columns, 6 per process
        parts = [chunk_source(4, process_index=i, process_count=2) for i in range(2)]
        for index in range(len(whole)):
            pieces = [part[index]["indices"] for part in parts]
            assert all(piece.shape == (STEPS, 6) for piece in pieces)
            np.testing.assert_array_equal(np.concatenate(pieces, axis=1), whole[index]["indices"])

    def test_validation_padding_has_weight_zero(self):
        source = ValidationSource(20, 8, process_index=0, process_count=1, padded_size=9)
        last = source[2]  # rows 16..19, then 0..3 again (weight 0), then the padding column
        np.testing.assert_array_equal(last["indices"], [[16, 17, 18, 19, 0, 1, 2, 3, 16]])
        np.testing.assert_array_equal(last["weights"], [[1, 1, 1, 1, 0, 0, 0, 0, 0]])
        assert source[0]["indices"][0, -1] == 0 and source[0]["weights"][0, -1] == 0
        draw = leading_batch(20, 8, None, process_index=0, process_count=1, padded_size=9)
        np.testing.assert_array_equal(draw["indices"], [[0, 1, 2, 3, 4, 5, 6, 7, 0]])


def fixed_plate_model(x, y=None):
    """Global latents; the rows in a plate that is not subsampled (scale 1): masked only."""
    w = numpyro.sample("w", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", len(x)):
        numpyro.sample("y", dist.Normal(w * x, 0.5), obs=y)


def nested_model(x, y=None):
    """The rows' plate at dim -2, a plate of 3 outputs inside it: the mask has shape (rows, 1)."""
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    with numpyro.plate("data", NUM_ROWS, subsample_size=len(x), dim=-2), numpyro.plate("out", 3, dim=-1):
        numpyro.sample("y", dist.Normal(w * x[:, None], 0.5), obs=y)


def problem(kind: str) -> tuple[SVI, dict[str, jax.Array]]:
    if kind == "linear":
        return linear_svi(NUM_ROWS), linear_data(NUM_ROWS)
    if kind == "local":
        model = local_model(NUM_ROWS)
        return SVI(model, AutoNormal(model), adam(0.05), Trace_ELBO()), local_data(NUM_ROWS)[0]
    data = linear_data(NUM_ROWS)
    if kind == "nested":
        data = {"x": data["x"], "y": data["y"][:, None] * np.array([1.0, -1.0, 0.5], np.float32)}
    model = fixed_plate_model if kind == "fixed" else nested_model
    return SVI(model, AutoNormal(model), adam(0.05), Trace_ELBO()), data


def fit(kind: str, devices: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Two epochs of compiled chunks over records padded as on ``devices`` devices (run here,
    on one): the losses and the final parameters."""
    svi, data = problem(kind)
    data = {key: jnp.asarray(value) for key, value in data.items()}
    layout = model_layout(svi.model, data, batch_rows=BATCH)
    padding = RowPadding.of(layout, BATCH)
    source, plan = chunk_source(devices), fit_plan(devices)
    state = jax.jit(make_init(svi, layout.row_plates, padding=padding))(jax.random.key(1), data, source[0])
    chunk = jax.jit(make_train_chunk(svi, layout.row_plates, padding=padding))
    losses = []
    for index, planned in enumerate(plan.chunks):
        state, chunk_losses, _ = chunk(state, data, source[index])
        losses.append(np.asarray(chunk_losses)[: planned.num_steps])
    return np.concatenate(losses), jax.device_get(svi.optim.get_params(state.svi_state.optim_state))


class TestMaskedSteps:
    @pytest.mark.parametrize("kind", ["linear", "local", "fixed", "nested"])
    def test_padded_batches_train_like_unpadded_ones(self, kind):
        """Global and per-row latents, a plate that is not subsampled, the rows at dim -2."""
        losses, params = fit(kind, DEVICES)
        expected_losses, expected_params = fit(kind, 1)
        assert losses.shape == (14,) and np.isfinite(losses).all()
        np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
        assert params.keys() == expected_params.keys()
        for name, value in params.items():
            assert value.shape == expected_params[name].shape  # per-row parameters: one per row, not column
            np.testing.assert_allclose(value, expected_params[name], rtol=1e-5, atol=1e-6)

    def test_unmasked_padding_would_change_the_loss(self):
        """The padding rows are real rows counted twice: without the mask the ELBO differs."""
        svi, data = problem("linear")
        data = {key: jnp.asarray(value) for key, value in data.items()}
        layout = model_layout(svi.model, data, batch_rows=BATCH)
        record = chunk_source(DEVICES)[0]
        init = jax.jit(make_init(svi, layout.row_plates))(jax.random.key(1), data, chunk_source(1)[0])
        masked = make_train_chunk(svi, layout.row_plates, padding=RowPadding.of(layout, BATCH))
        _, with_mask, _ = jax.jit(masked)(init, data, record)
        _, without, _ = jax.jit(make_train_chunk(svi, layout.row_plates))(init, data, record)
        assert not np.allclose(with_mask, without, rtol=1e-3)

    def test_no_padding_compiles_nothing_more(self):
        """When the batch divides, the chunk's program is the one built without padding."""
        svi, data = problem("local")
        data = {key: jnp.asarray(value) for key, value in data.items()}
        layout = model_layout(svi.model, data, batch_rows=BATCH)
        record = chunk_source(1)[0]
        state = jax.jit(make_init(svi, layout.row_plates))(jax.random.key(1), data, record)
        plain = jax.make_jaxpr(make_train_chunk(svi, layout.row_plates))(state, data, record)
        padded = make_train_chunk(svi, layout.row_plates, padding=RowPadding.of(layout, BATCH))
        assert str(jax.make_jaxpr(padded)(state, data, record)) == str(plain)

    @pytest.mark.parametrize("kind", ["linear", "local"])
    def test_validation_and_draws_equal_unpadded_ones(self, kind):
        svi, data = problem(kind)
        data = {key: jnp.asarray(value) for key, value in data.items()}
        layout = model_layout(svi.model, data, batch_rows=BATCH)
        state = jax.jit(make_init(svi, layout.row_plates))(jax.random.key(1), data, chunk_source(1)[0]).svi_state
        val_rows, val_batch = 20, 8
        padding = RowPadding.of(layout, val_batch)
        step = jax.jit(make_validation_step(svi, 4, NUM_ROWS, layout, padding=padding))
        params = jax.jit(make_params(svi, layout.row_plates))(state, data, chunk_source(1)[0])
        even = ValidationSource(val_rows, val_batch, process_index=0, process_count=1)
        padded = ValidationSource(val_rows, val_batch, process_index=0, process_count=1, padded_size=9)
        for index in range(len(even)):
            key = jax.random.key(index)
            expected, actual = step(params, key, data, even[index]), step(params, key, data, padded[index])
            assert actual.keys() == expected.keys() == {"lpd_sum", "weight_sum", *["loss"] * (kind == "linear")}
            for name in expected:
                np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5)
        sampler = jax.jit(make_posterior_sampler(svi, 5, layout, padding=RowPadding.of(layout, BATCH)))
        draws = [
            sampler(state, jax.random.key(9), data, leading_batch(NUM_ROWS, BATCH, None, **options))
            for options in ({"process_index": 0, "process_count": 1}, {"process_index": 0, "process_count": 1,
                                                                       "padded_size": PADDED})
        ]  # fmt: skip
        for name, value in draws[0].items():
            np.testing.assert_array_equal(draws[1][name], value)


def unplated_model(x, y=None):
    w = numpyro.sample("w", dist.Normal())
    numpyro.sample("y", dist.Normal(w * x, 1.0).to_event(1), obs=y)


def unindexed_local_model(x, y=None):
    with numpyro.plate("data", len(x)):
        z = numpyro.sample("z", dist.Normal())
        numpyro.sample("y", dist.Normal(z, 1.0), obs=y)


class TestWhatPaddingCannotDo:
    def test_a_site_over_the_rows_outside_every_plate(self):
        layout = model_layout(unplated_model, linear_data(NUM_ROWS), batch_rows=BATCH)
        assert layout.unplated_row_sites == ("y",)
        with pytest.raises(ConfigurationError, match=r"site\(s\) \['y'\] follow the batch's rows outside every plate"):
            check_paddable(layout, BATCH, DEVICES, NUM_ROWS)
        with pytest.raises(ConfigurationError, match="pick a val_batch_size that splits evenly: 9 or 12"):
            check_paddable(layout, BATCH, DEVICES, name="val_batch_size")
        check_paddable(layout, 12, DEVICES, NUM_ROWS)  # no padding: nothing to mask

    def test_per_row_latents_of_a_plate_that_is_not_subsampled(self):
        layout = model_layout(unindexed_local_model, linear_data(NUM_ROWS), batch_rows=NUM_ROWS)
        with pytest.raises(ConfigurationError, match=r"guide parameters would have 66 entries.*splits evenly: 63\.$"):
            check_paddable(layout, NUM_ROWS, DEVICES, NUM_ROWS)
        with pytest.raises(ConfigurationError, match="or fit on fewer devices"):
            check_paddable(layout, 2, 3, 2)

    def test_models_padding_serves_pass(self):
        for model in (linear_svi(NUM_ROWS).model, local_model(NUM_ROWS), fixed_plate_model):
            layout = model_layout(model, linear_data(NUM_ROWS), batch_rows=BATCH)
            assert layout.unplated_row_sites == ()
            check_paddable(layout, BATCH, DEVICES, NUM_ROWS)


# -- 3 forced CPU devices against 1 and against NumPyro ----------------------------------------


def run_workers(mode: str, *device_counts: int) -> list[dict]:
    """The worker's results with each of ``device_counts`` forced CPU devices, the processes run
    side by side (most of each is single-threaded start-up and tracing)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    processes = []
    for count in device_counts:
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}", "JAX_PLATFORMS": "cpu"}
        command = [sys.executable, "-m", "tests.uneven_worker", mode]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        processes.append(subprocess.Popen(command, cwd=root, env=env, text=True, **pipes))
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


@pytest.fixture(scope="module")
def fits() -> dict[int, dict]:
    return dict(zip((3, 1), run_workers("fit", 3, 1), strict=True))


@pytest.mark.slow
@pytest.mark.multidevice
class TestThreeDevices:
    @pytest.mark.parametrize("kind", ["linear", "local"])
    def test_fit_equals_numpyro_and_one_device(self, fits, kind):
        three, one = fits[3][kind], fits[1][kind]
        assert (three["devices"], three["padded_batch"], one["devices"], one["padded_batch"]) == (3, 102, 1, 100)
        assert len(three["losses"]) == 22  # 11 steps per epoch (1030 rows), the last batch completed
        # NumPyro's SVI.update on the same unpadded batches, on one device.
        np.testing.assert_allclose(three["losses"], three["numpyro_losses"], rtol=2e-5)
        np.testing.assert_allclose(three["losses"], one["losses"], rtol=2e-5)
        for name, value in three["numpyro_params"].items():
            np.testing.assert_allclose(three["params"][name], value, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(three["params"][name], one["params"][name], rtol=1e-4, atol=1e-6)
        # Validation batches of 40 rows (42 columns on 3 devices; the last one wraps around).
        assert len(three["validation"]) == len(one["validation"]) == 2
        for mine, theirs in zip(three["validation"], one["validation"], strict=True):
            assert mine.keys() == theirs.keys() == {"val_lpd", *["val_loss"] * (kind == "linear")}
            for name in mine:
                np.testing.assert_allclose(mine[name], theirs[name], rtol=2e-5)
        for name, value in one["posterior"].items():
            np.testing.assert_allclose(three["posterior"][name], value, rtol=1e-4, atol=1e-6)

    def test_impact_model_fits_with_a_batch_the_devices_do_not_divide(self, fits):
        three, one = fits[3]["impact_model"], fits[1]["impact_model"]
        assert len(three["losses"]) == 22
        np.testing.assert_allclose(three["losses"], one["losses"], rtol=2e-5)
        np.testing.assert_allclose(three["w"], one["w"], rtol=1e-4, atol=1e-6)

    def test_what_padding_cannot_do_is_refused(self, fits):
        refused = fits[3]["refused"]
        assert "batch_size=100 does not split evenly over 3 devices" in refused["batch_size"]
        assert "pick a batch_size that splits evenly: 99 or 102" in refused["batch_size"]
        assert "val_batch_size=40 does not split evenly over 3 devices" in refused["val_batch_size"]

    def test_predictions_equal_one_devices(self):
        three, one = run_workers("predict", 3, 1)
        assert (three["devices"], one["devices"]) == (3, 1)
        for name in ("y", "mu", "log_likelihood", "in_sample_y", "two_rows_y"):
            np.testing.assert_array_equal(three[name], one[name])  # dyadic inputs: exact
        np.testing.assert_allclose(three["prior_y"], one["prior_y"], rtol=1e-6, atol=1e-6)
        assert np.shape(three["y"]) == (1, 6, 37) and np.shape(three["two_rows_y"]) == (1, 6, 2)
