"""One trace of several functions, each later one fed by the first, split into one function each.

A fit's init, its training chunk and its validation all set the SVI up (the model, the guide,
the init strategy's search) inside their traces; traced apart, that set-up is traced once per
program. Traced as one function, init and then the others fed with what init returned, it is
traced once, and the equations each part's outputs need are then taken out of that one trace:
the first part's from its inputs, each later part's from the value handed to it and the inputs
it may read. Where a later part would read anything else of the trace (a value the set-up
drew), that part is not split out: the caller traces it apart, as it was.

A part can also leave out the outputs its trace gives as literals (:meth:`Part.without_literal_outputs`):
a program that returned them would hold their values as constants, so its text, and its key in
the compilation cache, would change with them. An optimizer that keeps its hyperparameters in
its state (``optax.inject_hyperparams``) returns them from init as literals: left out of the
program and put in after it runs, another learning rate reads the same compiled init back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, JaxprEqn, Literal, Var, jaxpr_as_fun
from jax.interpreters.partial_eval import dce_jaxpr

__all__ = ["HandOver", "Part", "split_trace"]

HandOver = Callable[[Any], Any]


class Part:
    """One part of a split trace, called as the function it stands for: ``part(*args)``
    evaluates the traced equations its outputs need (``__name__`` is what ``jax.jit`` names its
    program)."""

    def __init__(self, name: str, closed: ClosedJaxpr, out_tree: Any) -> None:
        self.__name__ = name
        self._closed = closed
        self._out_tree = out_tree

    def __call__(self, *args: Any) -> Any:
        return jax.tree.unflatten(self._out_tree, jaxpr_as_fun(self._closed)(*jax.tree.leaves(args)))

    def without_literal_outputs(
        self,
    ) -> tuple[Callable[..., list[Any]], Callable[[Sequence[Any], Callable[[np.ndarray], Any]], Any]]:
        """``(computed, complete)``: ``computed(*args)`` returns the part's output leaves that its
        equations compute, leaving out those the trace gives as literals of a fixed dtype (a
        weakly typed one, a Python number's, stays in); ``complete(leaves, make)`` returns the
        part's outputs from those leaves, with ``make(value)`` in the place of each literal
        (``value`` a NumPy array of its dtype): an array, or its shape for lowering what comes
        next.

        Example:
            >>> import jax.numpy as jnp
            >>> def joint(hand_over, x):
            ...     return (x * 2, jnp.float32(0.5)), hand_over(x) + 1
            >>> first, _ = split_trace(joint, [jnp.ones(2)], reads=[[0], []])
            >>> computed, complete = first.without_literal_outputs()
            >>> leaves = computed(jnp.ones(2))
            >>> len(leaves), complete(leaves, float)[1]
            (1, 0.5)
        """
        jaxpr = self._closed.jaxpr
        apart = [
            isinstance(var, Literal)
            and not var.aval.weak_type
            and not jax.dtypes.issubdtype(var.aval.dtype, jax.dtypes.extended)  # a key's, say: no NumPy value
            for var in jaxpr.outvars
        ]
        kept = [var for var, out in zip(jaxpr.outvars, apart, strict=True) if not out]
        fun = jaxpr_as_fun(ClosedJaxpr(jaxpr.replace(outvars=kept), self._closed.consts))

        def computed(*args: Any) -> list[Any]:
            return fun(*jax.tree.leaves(args))

        def complete(leaves: Sequence[Any], make: Callable[[np.ndarray], Any]) -> Any:
            given = iter(leaves)
            outputs = [
                make(np.asarray(var.val, var.aval.dtype)) if out else next(given)
                for var, out in zip(jaxpr.outvars, apart, strict=True)
            ]
            return jax.tree.unflatten(self._out_tree, outputs)

        computed.__name__ = self.__name__
        return computed, complete


def split_trace(
    joint: Callable[..., tuple[Any, ...]],
    args: Sequence[Any],
    reads: Sequence[Sequence[int]],
    names: Sequence[str] | None = None,
) -> tuple[Part | None, ...] | None:
    """Trace ``joint(hand_over, *args) -> (first_out, *later_outs)`` once and split it into
    one function per part.

    ``joint`` computes ``first_out`` from the arguments at the positions ``reads[0]`` and, for
    each later part ``k`` (from 1) in turn, passes one value ``v`` through its ``k``-th call of
    ``hand_over(v)`` (which returns ``v`` unchanged) and computes ``later_outs[k - 1]`` from what
    that returned and the arguments at the positions ``reads[k]``.

    Returns ``(first, *later)``, each a :class:`Part`: ``first(*[args[i] for i in reads[0]]) ->
    first_out`` and ``later[k - 1](v, *[args[i] for i in reads[k]]) -> later_outs[k - 1]``, named ``names``
    (what ``jax.jit`` names their programs; ``part0``, ``part1``, ... by default), each
    evaluating only the traced equations its outputs need (in the order they were traced);
    they take arguments of the traced shapes. A part is ``None`` where its outputs need
    anything else of the trace (another argument, a value computed before the hand-over but not
    handed over). Returns ``None`` where the trace has effects (a callback would run in several
    parts).

    Example:
        >>> import jax.numpy as jnp
        >>> def joint(hand_over, scale, x):
        ...     y = jnp.exp(scale) * x
        ...     return y, hand_over(y) + x, hand_over(y) * scale
        >>> args = (jnp.float32(0.0), jnp.ones(2))
        >>> first, plus_x, times_scale = split_trace(joint, args, reads=[[0, 1], [1], []])
        >>> first(*args).tolist(), plus_x(jnp.full(2, 5.0), jnp.ones(2)).tolist()
        ([1.0, 1.0], [6.0, 6.0])
        >>> times_scale is None  # it reads scale, which it was not given
        True
    """
    later_args = reads[1:]
    names = [f"part{index}" for index in range(len(reads))] if names is None else list(names)
    if len(names) != len(reads):
        raise ValueError(f"{len(reads)} parts need as many names; got {len(names)}")
    handed: list[list[Any]] = []

    def hand_over(value: Any) -> Any:
        if len(handed) == len(later_args):
            raise ValueError(f"joint called hand_over more than once per later part ({len(later_args)})")
        leaves, tree = jax.tree.flatten(value)
        handed.append(jax.lax.optimization_barrier(leaves))  # fresh variables: where a later part starts
        return jax.tree.unflatten(tree, handed[-1])

    def traced(*args: Any) -> tuple[Any, list[list[Any]]]:
        outs = tuple(joint(hand_over, *args))
        if len(handed) != len(later_args) or len(outs) != len(later_args) + 1:
            raise ValueError(
                f"joint called hand_over {len(handed)} times and returned {len(outs)} outputs; "
                f"{len(later_args)} later parts need one call each, and one output per part"
            )
        return outs, handed

    traced.__name__ = getattr(joint, "__name__", "joint")  # what JAX's logs call the trace
    closed, (out_shapes, handed_shapes) = jax.make_jaxpr(traced, return_shape=True)(*args)
    jaxpr = closed.jaxpr
    if jaxpr.effects:
        return None
    outvars = _grouped(jaxpr.outvars, [*out_shapes, *handed_shapes])
    part_outvars, handed_vars = outvars[: len(out_shapes)], outvars[len(out_shapes) :]
    arg_vars = _grouped(jaxpr.invars, args)
    part_invars = [
        [var for i in reads[0] for var in arg_vars[i]],
        *(
            [*handed_vars[k], *(var for i in positions for var in arg_vars[i])]
            for k, positions in enumerate(later_args)
        ),
    ]

    def as_part(index: int) -> Part | None:
        part = _part(jaxpr, part_invars[index], part_outvars[index])
        if part is None:
            return None
        return Part(names[index], ClosedJaxpr(part, closed.consts), jax.tree.structure(out_shapes[index]))

    return tuple(as_part(index) for index in range(len(out_shapes)))


def _grouped(variables: Sequence[Any], trees: Sequence[Any]) -> list[list[Any]]:
    """``variables`` cut into consecutive groups, one per tree of ``trees``, as many as its leaves."""
    groups, start = [], 0
    for tree in trees:
        count = len(jax.tree.leaves(tree))
        groups.append(list(variables[start : start + count]))
        start += count
    return groups


def _part(jaxpr: Jaxpr, invars: Sequence[Var], outvars: Sequence[Any]) -> Jaxpr | None:
    """``jaxpr`` with ``invars`` as its inputs, ``outvars`` as its outputs and the equations
    these need, in their order; ``None`` where they need a variable neither an input, a
    constant nor computed by an equation from these."""
    # JAX's dead-code elimination first: it also drops what loops and calls compute for
    # outputs of theirs that these do not need (a guide's postprocessing runs the whole model
    # on the set-up's batch to return the latent sites alone).
    live, _ = dce_jaxpr(jaxpr.replace(outvars=list(outvars)), used_outputs=True)
    producers = {id(var): eqn for eqn in live.eqns for var in eqn.outvars}
    given = {id(var) for var in (*invars, *live.constvars)}
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
    eqns = [eqn for eqn in live.eqns if id(eqn) in needed]
    return jaxpr.replace(invars=list(invars), outvars=list(outvars), eqns=eqns)
