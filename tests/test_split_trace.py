"""split_trace: one trace of two functions split into one program each, or no split where the
second would read anything but what it was handed and the arguments it may read."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aimz_trainer.split_trace import split_trace


def draw_then_scale(hand_over, key, x):
    """A first part that draws from ``key`` and a second that only scales what it is handed."""
    noise = jax.random.normal(key, x.shape)
    total = jnp.sum(x + noise)
    scaled = jax.lax.fori_loop(0, 3, lambda _, v: v * 2.0 + jnp.sin(x), hand_over(x + noise))
    return (total, noise), {"scaled": scaled, "shifted": scaled - x}


ARGS = (jax.random.key(3), jnp.linspace(-1.0, 1.0, 5))


def test_each_part_computes_what_the_joint_function_computes():
    key, x = ARGS
    first, second = split_trace(draw_then_scale, ARGS, second_args=[1])
    (total, noise), second_out = jax.jit(lambda key, x: draw_then_scale(lambda v: v, key, x))(key, x)
    got_total, got_noise = jax.jit(first)(key, x)
    np.testing.assert_array_equal(got_total, total)
    np.testing.assert_array_equal(got_noise, noise)
    got = jax.jit(second)(x + noise, x)
    assert sorted(got) == ["scaled", "shifted"]
    np.testing.assert_array_equal(got["scaled"], second_out["scaled"])
    np.testing.assert_array_equal(got["shifted"], second_out["shifted"])


def test_the_second_part_runs_on_any_value_handed_to_it():
    _, second = split_trace(draw_then_scale, ARGS, second_args=[1])
    x = ARGS[1]
    handed = jnp.arange(5.0)
    expected = handed
    for _ in range(3):
        expected = expected * 2.0 + jnp.sin(x)
    np.testing.assert_allclose(second(handed, x)["scaled"], expected, rtol=1e-6)


def test_the_joint_function_is_traced_once():
    calls = []

    def counted(hand_over, key, x):
        calls.append(1)
        return draw_then_scale(hand_over, key, x)

    first, second = split_trace(counted, ARGS, second_args=[1])
    jax.jit(first).lower(*ARGS)
    jax.jit(second).lower(ARGS[1], ARGS[1])
    assert len(calls) == 1


def test_each_part_keeps_only_the_equations_its_outputs_need():
    first, second = split_trace(draw_then_scale, ARGS, second_args=[1])
    first_jaxpr = jax.make_jaxpr(first)(*ARGS)
    second_jaxpr = jax.make_jaxpr(second)(ARGS[1], ARGS[1])
    first_ops = {eqn.primitive.name for eqn in first_jaxpr.eqns}
    second_ops = {eqn.primitive.name for eqn in second_jaxpr.eqns}
    assert "scan" not in first_ops  # the loop is the second part's
    assert "random_bits" not in str(second_jaxpr) and "threefry" not in str(second_jaxpr)
    assert "scan" in second_ops
    assert "optimization_barrier" not in first_ops | second_ops


@pytest.mark.parametrize(
    "joint",
    [
        # the second part reads an argument it was not given
        lambda hand_over, key, x: (x, hand_over(x) + jax.random.normal(key, x.shape)),
        # the second part reads a value of the first that was not handed over
        lambda hand_over, key, x: ((), hand_over(x) + jax.random.normal(key, x.shape)),
        # a callback: it would run in both parts
        lambda hand_over, key, x: (jax.debug.print("{}", x) or x, hand_over(x) * 2.0),
    ],
    ids=["other-argument", "value-not-handed-over", "effects"],
)
def test_no_split_where_the_second_part_needs_more_than_it_is_given(joint):
    assert split_trace(joint, ARGS, second_args=[1]) is None


def test_hand_over_is_called_exactly_once():
    with pytest.raises(ValueError, match="did not call hand_over"):
        split_trace(lambda hand_over, key, x: (x, x), ARGS, second_args=[1])
    with pytest.raises(ValueError, match="more than once"):
        split_trace(lambda hand_over, key, x: (hand_over(x), hand_over(x)), ARGS, second_args=[1])


def test_the_parts_carry_the_names_their_programs_get():
    first, second = split_trace(draw_then_scale, ARGS, second_args=[1], names=("init", "chunk"))
    assert "jit_init" in jax.jit(first).lower(*ARGS).as_text()[:2000]
    assert "jit_chunk" in jax.jit(second).lower(ARGS[1], ARGS[1]).as_text()[:2000]


def test_the_joint_trace_carries_the_joint_functions_name():
    names = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_trace_duration":
            names.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        split_trace(draw_then_scale, ARGS, second_args=[1])
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert "draw_then_scale" in names
