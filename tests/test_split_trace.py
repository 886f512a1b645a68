"""split_trace: one trace of several functions split into one program each, or no split of a
later part that would read anything but what it was handed and the arguments it may read."""

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
    first, second = split_trace(draw_then_scale, ARGS, reads=[[0, 1], [1]])
    (total, noise), second_out = jax.jit(lambda key, x: draw_then_scale(lambda v: v, key, x))(key, x)
    got_total, got_noise = jax.jit(first)(key, x)
    np.testing.assert_array_equal(got_total, total)
    np.testing.assert_array_equal(got_noise, noise)
    got = jax.jit(second)(x + noise, x)
    assert sorted(got) == ["scaled", "shifted"]
    np.testing.assert_array_equal(got["scaled"], second_out["scaled"])
    np.testing.assert_array_equal(got["shifted"], second_out["shifted"])


def test_the_second_part_runs_on_any_value_handed_to_it():
    _, second = split_trace(draw_then_scale, ARGS, reads=[[0, 1], [1]])
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

    first, second = split_trace(counted, ARGS, reads=[[0, 1], [1]])
    jax.jit(first).lower(*ARGS)
    jax.jit(second).lower(ARGS[1], ARGS[1])
    assert len(calls) == 1


def test_each_part_keeps_only_the_equations_its_outputs_need():
    first, second = split_trace(draw_then_scale, ARGS, reads=[[0, 1], [1]])
    first_jaxpr = jax.make_jaxpr(first)(*ARGS)
    second_jaxpr = jax.make_jaxpr(second)(ARGS[1], ARGS[1])
    first_ops = {eqn.primitive.name for eqn in first_jaxpr.eqns}
    second_ops = {eqn.primitive.name for eqn in second_jaxpr.eqns}
    assert "scan" not in first_ops  # the loop is the second part's
    assert "random_bits" not in str(second_jaxpr) and "threefry" not in str(second_jaxpr)
    assert "scan" in second_ops
    assert "optimization_barrier" not in first_ops | second_ops


def reads_another_argument(hand_over, key, x):
    return x, hand_over(x) + jax.random.normal(key, x.shape)


def reads_a_value_not_handed_over(hand_over, key, x):
    noise = jax.random.normal(key, x.shape)
    return x * 2.0, hand_over(x) + noise


def with_callback(hand_over, key, x):  # it would run in both parts
    return jax.debug.print("{}", x) or x, hand_over(x) * 2.0


@pytest.mark.parametrize("joint", [reads_another_argument, reads_a_value_not_handed_over, with_callback])
def test_no_split_where_the_second_part_needs_more_than_it_is_given(joint):
    parts = split_trace(joint, ARGS, reads=[[0, 1], [1]])
    if joint.__name__ == "with_callback":
        assert parts is None
    else:  # the first part reads its own arguments only: it is split out all the same
        first, second = parts
        assert second is None
        np.testing.assert_array_equal(jax.jit(first)(*ARGS), jax.jit(lambda *a: joint(lambda v: v, *a)[0])(*ARGS))


def test_hand_over_is_called_once_per_later_part():
    with pytest.raises(ValueError, match="called hand_over 0 times"):
        split_trace(lambda hand_over, key, x: (x, x), ARGS, reads=[[0, 1], [1]])
    with pytest.raises(ValueError, match="more than once per later part"):
        split_trace(lambda hand_over, key, x: (hand_over(x), hand_over(x)), ARGS, reads=[[0, 1], [1]])
    with pytest.raises(ValueError, match="3 parts need as many names"):
        split_trace(draw_then_scale, ARGS, reads=[[0, 1], [1], [0]], names=("a", "b"))


def test_each_later_part_reads_what_it_was_handed_and_its_own_arguments():
    def three_parts(hand_over, key, x, y):
        noise = jax.random.normal(key, x.shape)
        first = x + noise
        return first, hand_over(first) * y, jnp.sum(hand_over(noise) - x), hand_over(first) + noise

    args = (*ARGS, jnp.float32(3.0))
    first, times_y, summed, unsplit = split_trace(three_parts, args, reads=[[0, 1], [2], [1], []])
    assert unsplit is None  # it reads noise, which was handed to another part, not to it
    key, x, y = args
    np.testing.assert_array_equal(
        jax.jit(first)(key, x), jax.jit(lambda key, x: x + jax.random.normal(key, x.shape))(key, x)
    )
    handed = jnp.arange(5.0)
    np.testing.assert_array_equal(times_y(handed, y), handed * y)
    np.testing.assert_array_equal(summed(handed, x), jnp.sum(handed - x))
    # each part's program holds its own equations only: no draw outside the first
    assert "random_bits" not in str(jax.make_jaxpr(times_y)(handed, y))
    assert "random_bits" not in str(jax.make_jaxpr(summed)(handed, x))


def test_the_parts_carry_the_names_their_programs_get():
    first, second = split_trace(draw_then_scale, ARGS, reads=[[0, 1], [1]], names=("init", "chunk"))
    assert "jit_init" in jax.jit(first).lower(*ARGS).as_text()[:2000]
    assert "jit_chunk" in jax.jit(second).lower(ARGS[1], ARGS[1]).as_text()[:2000]


def test_the_joint_trace_carries_the_joint_functions_name():
    names = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_trace_duration":
            names.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        split_trace(draw_then_scale, ARGS, reads=[[0, 1], [1]])
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert "draw_then_scale" in names


def test_a_part_splits_where_only_a_loop_output_it_does_not_use_reads_other_values():
    """Dead code inside loops goes first: a guide's draws run the whole model on the set-up's
    batch inside a loop, for sites validation does not return."""

    def joint(hand_over, key, x):
        noise = jax.random.normal(key, x.shape)
        final, unused = jax.lax.scan(lambda carry, _: (carry * 2.0, carry + noise), hand_over(x), length=3)
        return (noise, unused), final

    first, doubled = split_trace(joint, ARGS, reads=[[0, 1], []])
    handed = jnp.arange(5.0)
    np.testing.assert_array_equal(doubled(handed), handed * 8.0)
    assert "random_bits" not in str(jax.make_jaxpr(doubled)(handed))
    noise, unused = jax.jit(first)(*ARGS)
    np.testing.assert_array_equal(unused[0], ARGS[1] + noise)  # the first part keeps what it returns


def with_settings(rate):
    """A first part that returns, beside what it computes, settings as literals: ``rate`` and a
    count of a fixed dtype, and a Python number (weakly typed)."""

    def joint(hand_over, x):
        state = {"x": x * 2.0, "rate": jnp.float32(rate), "count": jnp.zeros((), jnp.int32), "weak": 0}
        return state, hand_over(state["x"]) + 1.0

    return joint


def test_a_part_leaves_its_literal_outputs_out_of_its_program_and_puts_them_back():
    x = jnp.arange(3.0)
    texts, outputs = [], []
    for rate in (0.05, 0.02):
        first, _ = split_trace(with_settings(rate), [x], reads=[[0], []])
        computed, complete = first.without_literal_outputs()
        texts.append(jax.jit(computed).lower(x).as_text())
        leaves = jax.jit(computed)(x)
        assert len(leaves) == 2  # x * 2 and the weakly typed 0: the others are not the program's
        outputs.append(complete(leaves, jnp.asarray))
        assert jax.tree.structure(outputs[-1]) == jax.tree.structure(first(x))
    assert texts[0] == texts[1]  # one program (one cache key) for both rates
    for rate, state in zip((0.05, 0.02), outputs, strict=True):
        np.testing.assert_array_equal(state["x"], x * 2.0)
        assert state["rate"].dtype == jnp.float32 and state["rate"] == np.float32(rate)
        assert state["count"].dtype == jnp.int32 and state["count"] == 0
        assert state["weak"] == 0 and jax.typeof(state["weak"]).weak_type


def test_shapes_in_the_place_of_the_literals_lower_what_comes_next():
    x = jnp.arange(3.0)
    first, _ = split_trace(with_settings(0.05), [x], reads=[[0], []])
    computed, complete = first.without_literal_outputs()
    shapes = complete(jax.jit(computed).lower(x).out_info, lambda value: jax.ShapeDtypeStruct(value.shape, value.dtype))
    assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes) == jax.tree.map(
        lambda v: (v.shape, v.dtype), jax.eval_shape(first, x)
    )
