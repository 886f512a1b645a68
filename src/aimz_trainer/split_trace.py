"""One trace of two functions, the second fed by the first, split into one function each.

A fit's init and its training chunk both set the SVI up (the model, the guide, the init
strategy's search) inside their traces; traced apart, that set-up is traced twice. Traced as
one function, ``second(first(...))``, it is traced once, and the equations each part's outputs
need are then taken out of that one trace: the first part's from its inputs, the second's from
the value handed over and the inputs it may read. Where the second part would read anything
else of the first (a value the set-up drew), the parts are not split: the caller traces them
apart, as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend.core import ClosedJaxpr, Jaxpr, JaxprEqn, Literal, Var, jaxpr_as_fun

__all__ = ["HandOver", "split_trace"]

HandOver = Callable[[Any], Any]


def split_trace(
    joint: Callable[..., tuple[Any, Any]],
    args: Sequence[Any],
    second_args: Sequence[int],
    names: tuple[str, str] = ("first", "second"),
) -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    """Trace ``joint(hand_over, *args) -> (first_out, second_out)`` once and split it in two.

    ``joint`` computes ``first_out``, passes one value ``v`` through ``hand_over(v)`` (which
    returns it unchanged; called exactly once) and computes ``second_out`` from what that
    returned and the arguments at the positions ``second_args``.

    Returns ``(first, second)``: ``first(*args) -> first_out`` and ``second(v, *[args[i] for i
    in second_args]) -> second_out``, named ``names`` (what ``jax.jit`` names their programs),
    each evaluating only the traced equations its outputs need (in the order they were traced);
    both take arguments of the traced shapes. Returns ``None`` where ``second_out`` needs
    anything else of the trace (another argument, a value computed before the hand-over but not
    handed over) or the trace has effects (a callback would run in both parts).

    Example:
        >>> import jax.numpy as jnp
        >>> def joint(hand_over, scale, x):
        ...     y = jnp.exp(scale) * x
        ...     return y, hand_over(y) + x
        >>> first, second = split_trace(joint, (jnp.float32(0.0), jnp.ones(2)), second_args=[1])
        >>> first(jnp.float32(0.0), jnp.ones(2)).tolist(), second(jnp.full(2, 5.0), jnp.ones(2)).tolist()
        ([1.0, 1.0], [6.0, 6.0])
        >>> split_trace(lambda hand_over, a, b: (a, hand_over(a) + b), (1.0, 2.0), second_args=[]) is None
        True
    """
    handed: list[Any] = []

    def hand_over(value: Any) -> Any:
        if handed:
            raise ValueError("joint called hand_over more than once")
        leaves, tree = jax.tree.flatten(value)
        handed.append(jax.lax.optimization_barrier(leaves))  # fresh variables: where the second part starts
        return jax.tree.unflatten(tree, handed[0])

    def traced(*args: Any) -> tuple[Any, Any, Any]:
        first_out, second_out = joint(hand_over, *args)
        if not handed:
            raise ValueError("joint did not call hand_over")
        return first_out, second_out, handed[0]

    traced.__name__ = getattr(joint, "__name__", "joint")  # what JAX's logs call the trace
    closed, (first_shapes, second_shapes, _) = jax.make_jaxpr(traced, return_shape=True)(*args)
    jaxpr = closed.jaxpr
    if jaxpr.effects:
        return None
    first_count, second_count = len(jax.tree.leaves(first_shapes)), len(jax.tree.leaves(second_shapes))
    first_outvars = jaxpr.outvars[:first_count]
    second_outvars = jaxpr.outvars[first_count : first_count + second_count]
    handed_vars = jaxpr.outvars[first_count + second_count :]
    arg_vars, start = [], 0
    for arg in args:
        count = len(jax.tree.leaves(arg))
        arg_vars.append(jaxpr.invars[start : start + count])
        start += count
    second_invars = [*handed_vars, *(var for i in second_args for var in arg_vars[i])]
    first_part = _part(jaxpr, jaxpr.invars, first_outvars)
    second_part = _part(jaxpr, second_invars, second_outvars)
    if first_part is None or second_part is None:
        return None
    first_fun = jaxpr_as_fun(ClosedJaxpr(first_part, closed.consts))
    second_fun = jaxpr_as_fun(ClosedJaxpr(second_part, closed.consts))
    first_tree, second_tree = jax.tree.structure(first_shapes), jax.tree.structure(second_shapes)

    def first(*args: Any) -> Any:
        return jax.tree.unflatten(first_tree, first_fun(*jax.tree.leaves(args)))

    def second(handed: Any, *args: Any) -> Any:
        return jax.tree.unflatten(second_tree, second_fun(*jax.tree.leaves((handed, args))))

    first.__name__, second.__name__ = names
    return first, second


def _part(jaxpr: Jaxpr, invars: Sequence[Var], outvars: Sequence[Any]) -> Jaxpr | None:
    """``jaxpr`` with ``invars`` as its inputs, ``outvars`` as its outputs and the equations
    these need, in their order; ``None`` where they need a variable neither an input, a
    constant nor computed by an equation from these."""
    producers = {id(var): eqn for eqn in jaxpr.eqns for var in eqn.outvars}
    given = {id(var) for var in (*invars, *jaxpr.constvars)}
    needed: set[int] = set()
    pending = list(outvars)
    while pending:  # a loop, not recursion: a set-up's chains of equations run thousands deep
        var = pending.pop()
        if isinstance(var, Literal) or id(var) in given:
            continue
        eqn: JaxprEqn | None = producers.get(id(var))
        if eqn is None:
            return None
        if id(eqn) not in needed:
            needed.add(id(eqn))
            pending.extend(eqn.invars)
    eqns = [eqn for eqn in jaxpr.eqns if id(eqn) in needed]
    return jaxpr.replace(invars=list(invars), outvars=list(outvars), eqns=eqns)
