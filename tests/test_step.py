"""The compiled pieces: chunks equal single updates, and no tracer leaks into the user's SVI."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from aimz_trainer.step import make_finish, make_init, make_train_chunk

from .conftest import linear_svi


def chunk_input(indices: np.ndarray) -> dict[str, jax.Array]:
    return {"indices": jnp.asarray(indices)}


def test_chunk_of_k_steps_equals_k_numpyro_updates():
    svi = linear_svi(200)
    data = {"x": jnp.linspace(-1, 1, 200), "y": jnp.linspace(-2, 3, 200)}
    indices = np.random.default_rng(0).permutation(200)[:100].reshape(5, 20)
    key = jax.random.key(3)

    state = jax.jit(make_init(svi))(key, data, chunk_input(indices))
    chunked, losses = jax.jit(make_train_chunk(svi))(state, data, chunk_input(indices))

    # The same five steps, one NumPyro update at a time (eagerly, as a user would).
    svi.init(key, x=data["x"][indices[0]], y=data["y"][indices[0]])
    single = state.svi_state
    expected = []
    for batch in indices:
        single, loss = svi.update(single, x=data["x"][batch], y=data["y"][batch])
        expected.append(loss)

    np.testing.assert_allclose(losses, np.array(expected), rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        chunked.svi_state.optim_state[1],
        single.optim_state[1],
    )
    assert bool(chunked.finite)


def test_compiled_functions_leave_svi_and_guide_untouched():
    svi = linear_svi(100)
    guide_before, svi_before = dict(vars(svi.guide)), dict(vars(svi))
    data = {"x": jnp.ones(100), "y": jnp.ones(100)}
    indices = chunk_input(np.arange(40).reshape(2, 20))

    state = jax.jit(make_init(svi))(jax.random.key(0), data, indices)
    state, _ = jax.jit(make_train_chunk(svi))(state, data, indices)
    params, posterior = jax.jit(make_finish(svi, 7))(state, jax.random.key(1), data, indices)

    assert vars(svi.guide) == guide_before and vars(svi) == svi_before
    assert svi.guide.prototype_trace is None
    assert posterior["w"].shape == (7,) and posterior["mu"].shape == (7, 20)
    assert set(params) == {"w_auto_loc", "w_auto_scale", "b_auto_loc", "b_auto_scale"}
    # Eager NumPyro use afterwards still works (a leaked tracer would raise here).
    svi.init(jax.random.key(0), x=data["x"][:20], y=data["y"][:20])
    draws = svi.guide.sample_posterior(jax.random.key(2), params, sample_shape=(3,))
    assert draws["w"].shape == (3,)


def test_non_finite_loss_freezes_the_state():
    svi = linear_svi(100)
    x = np.ones(100, dtype=np.float32)
    x[45] = np.nan  # the third batch of 20 rows holds the NaN
    data = {"x": jnp.asarray(x), "y": jnp.ones(100)}
    indices = chunk_input(np.arange(100).reshape(5, 20))
    state = jax.jit(make_init(svi))(jax.random.key(0), data, indices)
    chunk = jax.jit(make_train_chunk(svi))
    frozen, losses = chunk(state, data, indices)
    two_steps, _ = chunk(state, data, chunk_input(np.arange(40).reshape(2, 20)))

    assert np.isfinite(losses[:2]).all() and not np.isfinite(losses[2])
    assert not bool(frozen.finite)
    jax.tree.map(np.testing.assert_array_equal, frozen.svi_state.optim_state, two_steps.svi_state.optim_state)
