"""The README's "Gradient clipping, accumulation and precision": each example runs, as written
there, through ``Trainer.fit`` on the linear model of ``tests/conftest.py``, and what the
section claims is checked on real fits: clipping bounds the update by the learning rate times
the clip norm; accumulation changes the parameters every k-th step only, as NumPyro's own SVI
does with the same transformation, and NumPyro refuses the ``optax.MultiSteps`` object itself;
64-bit mode (a global flag: in a subprocess) gives float64 parameters, losses and draws;
bfloat16 data are refused with the cast to use, and the model that casts to bfloat16 itself
keeps float32 parameters and optimizer state."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

from aimz_trainer import DataError, Trainer
from aimz_trainer.callbacks import LambdaCallback

from .conftest import TRUE_INTERCEPT, linear_data, linear_model

ROOT = Path(__file__).resolve().parents[1]
SECTION = "### Gradient clipping, accumulation and precision"
NUM_ROWS, BATCH = 1000, 100
STEPS = 10 * NUM_ROWS // BATCH  # the examples' max_epochs=10


def section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n{SECTION}\n")
    return text[start : text.index("\n## ", start)]


def code_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", section(), re.DOTALL)


def example(marker: str) -> str:
    """The section's one ``python`` code block holding ``marker``, after the imports of the
    section's blocks (a reader runs them in order; the examples share the first one's)."""
    blocks = code_blocks()
    [code] = [block for block in blocks if marker in block]
    imports = [line for block in blocks for line in block.splitlines() if line.startswith(("import ", "from "))]
    return "\n".join(imports) + "\n" + code


def run_example(marker: str) -> dict[str, Any]:
    """Run the example with ``model`` and ``train`` bound to the linear regression; its names."""
    namespace: dict[str, Any] = {"model": linear_model(NUM_ROWS), "train": linear_data(NUM_ROWS)}
    exec(compile(example(marker), "README.md", "exec"), namespace)  # our own README's code
    return namespace


def unconstrained(svi: SVI, svi_state) -> dict[str, np.ndarray]:
    """The parameters the optimizer moves (unconstrained), on the host."""
    return {name: np.asarray(value) for name, value in svi.optim.get_params(svi_state.optim_state).items()}


def fit_recording_params(svi: SVI, data, **trainer_arguments) -> tuple[list[dict[str, np.ndarray]], Trainer, Any]:
    """Fit one step per chunk. Returns the unconstrained parameters before the first step and
    after each, the trainer, and ``(initial SVIState, FitResult)``."""
    seen: list[dict[str, np.ndarray]] = []
    initial = []

    def start(fit, progress) -> None:
        initial.append(fit.svi_state)
        seen.append(unconstrained(svi, fit.svi_state))

    record = LambdaCallback(
        on_fit_start=start,
        on_train_chunk_end=lambda fit, progress, losses, steps: seen.append(unconstrained(svi, fit.svi_state)),
    )
    trainer = Trainer(
        steps_per_chunk=1, rng_key=jax.random.key(0), enable_progress_bar=False, callbacks=[record], **trainer_arguments
    )
    result = trainer.fit(svi, data, batch_size=BATCH, shuffle=False)
    return seen, trainer, (initial[0], result)


def global_norm(tree: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in tree.values())))


# -- clipping ----------------------------------------------------------------------------------


def test_the_clipping_example_fits():
    result = run_example("clip_by_global_norm")["result"]
    assert result.losses.shape == (STEPS,) and np.isfinite(result.losses).all()
    assert result.losses[-10:].mean() < result.losses[:10].mean()


def test_clipping_bounds_the_update_by_the_learning_rate_times_the_clip_norm():
    learning_rate, clip = 1e-3, 1.0
    data = linear_data(NUM_ROWS)
    data["y"] = data["y"] + 1000.0  # far from what the prior starts at: a gradient norm of millions
    model = linear_model(NUM_ROWS)

    def first_step(optimizer) -> tuple[dict[str, np.ndarray], float]:
        svi = SVI(model, AutoNormal(model), optimizer, Trace_ELBO())
        (before, after), trainer, _ = fit_recording_params(svi, data, max_steps=1, step_metrics=["grad_norm"])
        return {name: after[name] - before[name] for name in before}, trainer.callback_metrics["grad_norm"]

    clipped, grad_norm = first_step(optax.chain(optax.clip_by_global_norm(clip), optax.sgd(learning_rate)))
    plain, plain_grad_norm = first_step(optax.sgd(learning_rate))
    # The same start, batch and ELBO draw: the same gradient, thousands of times the clip norm.
    assert grad_norm == plain_grad_norm > 1e4 * clip
    assert global_norm(plain) == pytest.approx(learning_rate * grad_norm, rel=1e-4)
    # Clipped: the step is the learning rate times the clip norm, in the gradient's direction,
    # up to the rounding of float32 parameters near 1 (an ulp: 1e-7, of a step of 1e-3).
    assert global_norm(clipped) == pytest.approx(learning_rate * clip, rel=1e-3)
    for name in plain:
        np.testing.assert_allclose(clipped[name], plain[name] * clip / grad_norm, rtol=1e-3, atol=2.5e-7)


# -- accumulation ------------------------------------------------------------------------------


def test_numpyro_refuses_the_multisteps_object_itself():
    model = linear_model(NUM_ROWS)
    multi_steps = optax.MultiSteps(optax.adam(1e-3), every_k_schedule=4)
    with pytest.raises(TypeError, match=r"optax\.GradientTransformation\. Got <class '.*MultiSteps'>"):
        SVI(model, AutoNormal(model), multi_steps, Trace_ELBO())
    assert "Got <class '...MultiSteps'>`, raised by `SVI(...)`" in section().replace("\n", " ")  # as quoted
    SVI(model, AutoNormal(model), multi_steps.gradient_transformation(), Trace_ELBO())  # taken


def test_the_accumulation_example_fits():
    result = run_example("MultiSteps")["result"]
    assert result.losses.shape == (STEPS,) and np.isfinite(result.losses).all()


def test_accumulation_changes_the_parameters_every_k_steps_as_numpyro_svi_does():
    k, num_steps = 4, 12
    model = linear_model(NUM_ROWS)
    data = linear_data(NUM_ROWS)

    def make_svi() -> SVI:
        optimizer = optax.MultiSteps(optax.adam(0.05), every_k_schedule=k).gradient_transformation()
        return SVI(model, AutoNormal(model), optimizer, Trace_ELBO())

    svi = make_svi()
    seen, _, (initial_state, result) = fit_recording_params(svi, data, max_steps=num_steps)
    assert len(seen) == num_steps + 1
    for step in range(1, num_steps + 1):
        same = all(np.array_equal(seen[step][name], seen[step - 1][name]) for name in seen[0])
        assert same == (step % k != 0), step  # unchanged within an accumulation, moved at its end
    # The inner Adam took one step per k batches.
    multi_steps_state = result.state.optim_state[1][1]
    assert int(multi_steps_state.gradient_step) == num_steps // k
    assert int(multi_steps_state.inner_opt_state[0].count) == num_steps // k

    # NumPyro's own SVI with the same transformation, from the fit's initial state, on the same
    # batches (shuffle=False: rows in order, 10 batches an epoch).
    reference = make_svi()
    arrays = {name: jnp.asarray(value) for name, value in data.items()}
    rows = [slice((i % 10) * BATCH, (i % 10 + 1) * BATCH) for i in range(num_steps)]
    batches = [{name: value[r] for name, value in arrays.items()} for r in rows]
    reference.init(jax.random.key(1), **batches[0])  # sets the guide up; the state is the fit's
    update = jax.jit(reference.update)
    state = initial_state
    losses = []
    for step, batch in enumerate(batches, start=1):
        state, loss = update(state, **batch)
        losses.append(float(loss))
        expected = unconstrained(reference, state)
        for name in expected:
            np.testing.assert_array_equal(seen[step][name], expected[name], err_msg=f"{name} after step {step}")
    # The parameters are bitwise NumPyro's; the reported losses to float32 rounding: NumPyro sums
    # the ELBO's per-site terms in the order of a set of site names (it follows this process's hash
    # seed), the trainer in name order (step.independent_of_hash_seed).
    np.testing.assert_allclose(result.losses, np.float32(losses), rtol=1e-6)


# -- precision ---------------------------------------------------------------------------------


def test_float32_by_default_whatever_the_data():
    model = linear_model(NUM_ROWS)
    data64 = {name: value.astype(np.float64) for name, value in linear_data(NUM_ROWS).items()}
    svi = SVI(model, AutoNormal(model), optax.adam(0.05), Trace_ELBO())
    result = Trainer(max_steps=5, enable_progress_bar=False).fit(svi, data64, batch_size=BATCH, num_samples=3)
    assert {value.dtype for value in result.params.values()} == {np.dtype(np.float32)}
    assert result.losses.dtype == np.float32 and result.posterior["w"].dtype == np.float32


X64_SCRIPT = """
import json
import jax
import optax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from aimz_trainer import Trainer
from tests.conftest import linear_data, linear_model

model, train = linear_model({rows}), linear_data({rows})
{example}
posterior = Trainer(max_steps=1, enable_progress_bar=False).fit(svi, train64, batch_size=100, num_samples=3).posterior
print(json.dumps({{
    "params": sorted({{str(value.dtype) for value in result.params.values()}}),
    "optimizer_state": sorted({{str(leaf.dtype) for leaf in jax.tree.leaves(result.state.optim_state)}}),
    "losses": str(result.losses.dtype),
    "posterior": sorted({{str(value.dtype) for value in posterior.values()}}),
    "finite": bool((abs(result.losses) < float("inf")).all()),
}}))
"""


def test_the_float64_example_gives_float64_parameters_losses_and_draws():
    """64-bit mode is global to a process: the example runs in one of its own."""
    script = X64_SCRIPT.format(rows=NUM_ROWS, example=example("jax_enable_x64"))
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    completed = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    dtypes = json.loads(completed.stdout.strip().splitlines()[-1])
    assert dtypes["params"] == dtypes["posterior"] == ["float64"]
    assert dtypes["losses"] == "float64" and dtypes["finite"]
    assert {dtype for dtype in dtypes["optimizer_state"] if dtype.startswith("float")} == {"float64"}  # and counters
    assert not jax.config.jax_enable_x64  # this process is untouched


def test_bfloat16_data_are_refused_naming_the_cast():
    model = linear_model(NUM_ROWS)
    svi = SVI(model, AutoNormal(model), optax.adam(1e-3), Trace_ELBO())
    train = linear_data(NUM_ROWS)
    bfloat16 = {name: value.astype(jnp.bfloat16) for name, value in train.items()}
    trainer = Trainer(max_steps=1, enable_progress_bar=False)
    with pytest.raises(DataError, match=r"train_data\['x'\] has dtype bfloat16; .*\.astype\(np\.float32\)"):
        trainer.fit(svi, bfloat16, batch_size=BATCH)
    with pytest.raises(DataError, match=r"val_data\['x'\] has dtype bfloat16"):
        trainer.fit(svi, train, batch_size=BATCH, val_data={name: jnp.asarray(v) for name, v in bfloat16.items()})


def test_the_bfloat16_example_keeps_float32_parameters_and_state_and_fits_as_float32_does():
    namespace = run_example("jnp.bfloat16")
    result = namespace["result"]
    assert {value.dtype for value in result.params.values()} == {np.dtype(np.float32)}
    floats = {
        leaf.dtype for leaf in jax.tree.leaves(result.state.optim_state) if jnp.issubdtype(leaf.dtype, jnp.floating)
    }
    assert floats == {np.dtype(np.float32)}
    assert result.losses.dtype == np.float32 and np.isfinite(result.losses).all()

    # The same model without the casts, from the same key: the same fit up to bfloat16's
    # rounding of the product (8 bits of mantissa), which did take place.
    model = linear_model(NUM_ROWS)
    svi = SVI(model, AutoNormal(model), optax.adam(1e-3), Trace_ELBO())
    reference = Trainer(max_epochs=10, rng_key=jax.random.key(0)).fit(svi, namespace["train"], batch_size=BATCH)
    assert not np.array_equal(result.losses, reference.losses)
    np.testing.assert_allclose(result.losses, reference.losses, rtol=2e-2)
    for name, value in reference.params.items():
        np.testing.assert_allclose(result.params[name], value, rtol=1e-2, atol=1e-3, err_msg=name)
    assert abs(float(result.params["b_auto_loc"]) - TRUE_INTERCEPT) < 5  # a real fit, not NaN
