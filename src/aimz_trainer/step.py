"""Pure factories for the compiled pieces of SVI training.

Each factory returns a plain function meant for :func:`jax.jit`: state in, state out, nothing
kept on an object. The functions take the training data (``device_data``, possibly empty) and
a *record* from the data pipeline: ``indices`` stacks the dataset row indices of K per-step
batches, and ``rows`` the rows themselves when the host gathered them (empty when the data
live on the devices and the step gathers them); :func:`batch_from` turns these into the
model's keyword arguments, so every compiled function shares one notion of "a batch". The row
indices also go into the model's row plates (:func:`aimz_trainer.plates.at_rows`), so that
per-row latent sites line up with their rows.

A record's batches may be padded for the devices (:mod:`aimz_trainer.data`): given a
:class:`~aimz_trainer.plates.RowPadding`, the training chunk and the validation loss run
under :func:`~aimz_trainer.plates.padding_masked`, and ``init`` and the posterior draws,
which run once, take the real rows alone, so that every value is the unpadded batch's.

NumPyro's guides and ``SVI.init`` store what they learn about the model (the guide's
prototype trace, ``svi.constrain_fn``) on the objects themselves. Set up inside a trace, those
attributes would hold tracers that escape it (an ``UnexpectedTracerError`` later). Every
function here therefore runs inside :func:`traced_svi`, which sets them up afresh under the
current trace and then puts the objects back exactly as the user handed them over: the user's
``svi`` and guide never hold a tracer, and set-up costs one trace instead of hundreds of eager
compilations. A guide that code outside the library reads after a fit (``arviz.from_numpyro_svi``
calls ``guide.sample_posterior``) must be set up on concrete values as ``SVI.init`` leaves it:
:func:`set_up_guide` does that, once, computing NumPyro's set-up in one compiled program and
leaving its values where a set-up on values leaves them (still a compile, so a fit does not do it
unasked). Set up under a trace, a guide keeps its sites in the model's order, as a set-up on
values does (:class:`_LocsInModelOrder`): a fit's parameters and a guide set up afterwards agree
on where each site sits in an ``AutoContinuous`` guide's latent vector.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import ClosedJaxpr, Jaxpr, JaxprEqn, Literal, jaxpr_as_fun
from jax.scipy.special import logsumexp
from numpyro import handlers
from numpyro.infer import SVI
from numpyro.infer.autoguide import AutoGuide
from numpyro.infer.svi import SVIState
from numpyro.infer.util import log_likelihood

from aimz_trainer.errors import ConfigurationError
from aimz_trainer.plates import ModelLayout, RowPadding, at_rows, on_rows, padding_masked, split_arrays

__all__ = [
    "BUILT_IN_STEP_METRICS",
    "StepMetric",
    "StepView",
    "TrainState",
    "batch_from",
    "first_batch",
    "grad_norm",
    "gradients_recorded",
    "guide_draw",
    "guide_on_rows",
    "learning_rate",
    "make_init",
    "make_params",
    "make_posterior_sampler",
    "make_train_chunk",
    "make_validation_step",
    "model_kwargs",
    "param_norm",
    "pointwise_lpd",
    "restored_after",
    "sample_posterior",
    "set_up_guide",
    "step_metric_functions",
    "traced_svi",
]

Batch = dict[str, jax.Array]
Record = Mapping[str, Any]


class TrainState(NamedTuple):
    """What the compiled training chunk carries from step to step.

    Attributes:
        svi_state: NumPyro's ``SVIState`` (optimizer state, mutable state, rng key).
        finite: ``True`` while every loss so far was finite. Once a loss is not, the update of
            that step is discarded and the state stays frozen, so the last good state survives.
    """

    svi_state: SVIState
    finite: jax.Array


def batch_from(device_data: Mapping[str, jax.Array], rows: Mapping[str, jax.Array], indices: jax.Array) -> Batch:
    """The model's keyword arguments for one step: with device-resident data, the rows at
    ``indices`` gathered here, on the device; otherwise ``rows`` already is the batch."""
    if device_data:
        return {key: array[indices] for key, array in device_data.items()}
    return dict(rows)


@contextlib.contextmanager
def traced_svi(
    svi: SVI,
    batch: Batch,
    indices: jax.Array,
    row_plates: tuple[str, ...],
    rng_key: jax.Array | None = None,
) -> Iterator[SVIState]:
    """Inside a trace: set up ``svi`` and its guide for ``batch`` (whose dataset rows are
    ``indices``), then restore them on exit.

    Yields the ``SVIState`` of ``svi.init(rng_key, **batch)``: the guide draws its initial
    values from ``rng_key`` while it sets itself up, so this is the one init of a fit. Callers
    that only need the set-up leave ``rng_key`` out (the state is then compiled away).

    Nested in a set-up of the same ``svi`` (a compiled function whose parts each set it up:
    the training chunk and its parameters), it reuses that one, unless it asks for an init
    from another ``rng_key``: tracing the set-up (the model, the guide, the init strategy's
    loop) is most of the time a fit takes to trace.
    """
    outer = _active_set_ups.get().get(id(svi))
    if outer is not None and (rng_key is None or rng_key is outer[1]):
        yield outer[0]
        return
    with restored_after(svi):
        svi.loss = independent_of_hash_seed(svi.loss)
        with at_rows(row_plates, indices):  # only the init: the caller chooses the rows of the rest
            state = svi.init(jax.random.key(0) if rng_key is None else rng_key, **batch)
        token = _active_set_ups.set({**_active_set_ups.get(), id(svi): (state, rng_key)})
        try:
            yield state
        finally:
            _active_set_ups.reset(token)


# The set-ups traced_svi has open, {id(svi): (its state, its rng_key)}: those of the trace in progress.
_active_set_ups: contextvars.ContextVar[Mapping[int, tuple[SVIState, jax.Array | None]]] = contextvars.ContextVar(
    "_active_set_ups", default=types.MappingProxyType({})
)


def independent_of_hash_seed(elbo: Any) -> Any:
    """A copy of ``elbo`` whose traced program does not depend on ``PYTHONHASHSEED``, when it has
    per-site terms (``Trace_ELBO``, ``TraceMeanField_ELBO``: ``sum_sites=True``); else ``elbo``
    itself.

    NumPyro computes the per-site terms, and sums them, in the order of a ``set`` of site names,
    which follows Python's string hash: with it changed the order of the operations in the traced
    program (so its persistent compilation-cache key) and the order of the sum (so the loss's
    last bits). The copy takes NumPyro's own terms (``sum_sites=False``), traced
    :func:`in_dependency_order`, and sums them in the order of the sites' names: the same
    program, and the same losses, in every process.

    Example:
        >>> import numpyro, numpyro.distributions as dist
        >>> from numpyro.infer import Trace_ELBO
        >>> def model():
        ...     numpyro.sample("b", dist.Normal(0.0, 1.0), obs=1.0)
        ...     numpyro.sample("a", dist.Normal(0.0, 2.0), obs=0.0)
        >>> elbo = independent_of_hash_seed(Trace_ELBO())
        >>> round(float(elbo.loss(jax.random.key(0), {}, model, lambda: None)), 4)
        3.031
    """
    if getattr(elbo, "sum_sites", None) is not True:
        return elbo
    ordered = copy.copy(elbo)
    ordered.sum_sites = False
    per_site = in_dependency_order(ordered.loss_with_mutable_state)

    def loss_with_mutable_state(*args: Any, **kwargs: Any) -> dict[str, Any]:
        result = per_site(*args, **kwargs)
        terms = result["loss"]
        return {**result, "loss": sum((terms[name] for name in sorted(terms)), start=jnp.array(0.0))}

    ordered.loss_with_mutable_state = loss_with_mutable_state  # an instance attribute: ``loss`` calls it
    return ordered


def in_dependency_order(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, whose operations are traced in an order set by what its outputs depend on, not by
    the order in which its Python code ran them.

    ``fn`` is traced to a jaxpr (its array arguments as inputs; the others, and what it closes
    over, as constants), whose equations are then replayed depth first from its outputs, in
    their pytree order (dict keys sorted): two runs of ``fn`` that compute the same values by the
    same operations in another order (a loop over a ``set``) trace the same program. Operations
    no output needs are left out; a jaxpr with effects (callbacks, prints) is run as traced.

    Example:
        >>> def sine_first(x):
        ...     a, b = jnp.sin(x), jnp.cos(x)
        ...     return a + b
        >>> def cosine_first(x):
        ...     b, a = jnp.cos(x), jnp.sin(x)
        ...     return a + b
        >>> program = lambda fn: str(jax.make_jaxpr(fn)(1.0))
        >>> program(sine_first) == program(cosine_first)
        False
        >>> program(in_dependency_order(sine_first)) == program(in_dependency_order(cosine_first))
        True
    """

    def traced(*args: Any, **kwargs: Any) -> Any:
        leaves, tree = jax.tree.flatten((args, kwargs))
        positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array | np.ndarray | np.generic)]

        def with_arrays(*arrays: Any) -> Any:
            filled = list(leaves)
            for position, array in zip(positions, arrays, strict=True):
                filled[position] = array
            args, kwargs = jax.tree.unflatten(tree, filled)
            return fn(*args, **kwargs)

        arrays = [leaves[i] for i in positions]
        closed, shapes = jax.make_jaxpr(with_arrays, return_shape=True)(*arrays)
        if closed.jaxpr.effects:
            return with_arrays(*arrays)
        replayed = ClosedJaxpr(closed.jaxpr.replace(eqns=depth_first_from_outputs(closed.jaxpr)), closed.consts)
        return jax.tree.unflatten(jax.tree.structure(shapes), jaxpr_as_fun(replayed)(*arrays))

    return traced


def depth_first_from_outputs(jaxpr: Jaxpr) -> list[JaxprEqn]:
    """The equations ``jaxpr``'s outputs need, each after those it reads, in the order of a
    depth-first walk from the outputs (in order) through each equation's inputs (in order)."""
    producers = {id(var): eqn for eqn in jaxpr.eqns for var in eqn.outvars}
    ordered: list[JaxprEqn] = []
    placed: set[int] = set()
    pending = [(var, False) for var in reversed(jaxpr.outvars)]
    while pending:  # a loop, not recursion: an ELBO's chains of equations run thousands deep
        var, inputs_placed = pending.pop()
        eqn = None if isinstance(var, Literal) else producers.get(id(var))
        if eqn is None or id(eqn) in placed:
            continue
        if inputs_placed:
            placed.add(id(eqn))
            ordered.append(eqn)
        else:
            pending.append((var, True))
            pending.extend((read, False) for read in reversed(eqn.invars))
    return ordered


class _LocsInModelOrder:
    """Mixed into an ``AutoGuide``'s class while it is set up under a trace: the initial values
    its set-up stores (``_init_locs``) are kept in the model's order of its sites.

    Set up under a trace, NumPyro finds them sorted by name (a pytree out of a loop); set up on
    values, in the model's order. An ``AutoContinuous`` guide ravels them in that order into its
    one latent vector (``_init_latent``, ``_unpack_latent``): set up under a trace it would lay
    the sites out by name, so a fit's ``auto_loc`` would not be read right by the same guide set
    up on values (``guide.sample_posterior`` would give ``b``'s values as ``w``'s); and an
    ``AutoNormal`` draws its sites in this order from one key. The order is set where the set-up
    stores the values, before anything reads them."""

    __slots__ = ()  # the guide's own layout: its class can be swapped for this one and back

    @property
    def _init_locs(self) -> Any:
        return vars(self)["_init_locs"]

    @_init_locs.setter
    def _init_locs(self, locs: Any) -> None:
        prototype = vars(self).get("prototype_trace")
        if isinstance(locs, dict) and prototype is not None:
            locs = {name: locs[name] for name in prototype if name in locs}
        vars(self)["_init_locs"] = locs


@functools.cache
def _with_locs_in_model_order(cls: type) -> type:
    names = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__slots__": ()}
    return type(cls.__name__, (cls, _LocsInModelOrder), names)  # the guide's layout first: swappable


@contextlib.contextmanager
def restored_after(obj: SVI | Callable[..., Any]) -> Iterator[None]:
    """Inside: an ``SVI`` or a guide (and every guide inside it) as if never set up, so an
    ``AutoGuide`` sets itself up afresh under the current trace, from its key and rows, whatever
    was set up before (:func:`set_up_guide`); on exit, put back exactly as it was: what they set
    up on themselves inside a trace holds tracers."""
    parts = _stateful_parts(obj)
    saved = [(part, type(part), dict(vars(part))) for part in parts]
    for part in parts:
        if isinstance(part, AutoGuide):
            part.prototype_trace = None  # what an AutoGuide checks before it sets itself up
            part.__class__ = _with_locs_in_model_order(type(part))
    try:
        yield
    finally:
        for part, cls, attributes in saved:
            if type(part) is not cls:  # an AutoGuide's, swapped above
                part.__class__ = cls
            vars(part).clear()
            vars(part).update(attributes)


@contextlib.contextmanager
def guide_on_rows(guide: Callable[..., Any], rows: jax.Array) -> Iterator[Callable[..., Any]]:
    """Inside a trace: ``guide`` with every subsampled plate on ``rows``
    (:func:`~aimz_trainer.plates.on_rows`), its own plates and those of the model run that sets
    up an ``AutoGuide``'s prototype alike; the guide is put back as it was on exit."""
    with restored_after(guide):
        for part in _stateful_parts(guide):
            if isinstance(part, AutoGuide):
                part.model = on_rows(part.model, rows)
        yield on_rows(guide, rows)


def _stateful_parts(obj: Any) -> list[Any]:
    """``obj`` (an ``SVI`` or a guide), the guide, and every guide inside an ``AutoGuideList``."""
    parts = [obj] if isinstance(obj, SVI) else []
    pending = [obj.guide if isinstance(obj, SVI) else obj]
    while pending:
        guide = pending.pop()
        if hasattr(guide, "__dict__"):
            parts.append(guide)
        pending.extend(getattr(guide, "_guides", ()))
    return parts


def set_up_guide(guide: Callable[..., Any], rng_key: jax.Array, kwargs: Mapping[str, Any]) -> None:
    """Set an ``AutoGuide`` up on ``kwargs`` (the model's inputs, a batch of host arrays) as
    ``SVI.init`` leaves it: outside any trace, so what it keeps holds concrete values and
    ``guide.sample_posterior`` (what ``arviz.from_numpyro_svi`` calls), ``median`` and
    ``quantiles`` work after a fit. A guide set up already, or not an ``AutoGuide`` (nothing to
    set up), is left as it is; the compiled functions of a fit or a prediction set the guide up
    afresh inside their trace either way (:func:`restored_after`).

    Example:
        >>> import numpy as np, numpyro, numpyro.distributions as dist
        >>> from numpyro.infer.autoguide import AutoNormal
        >>> def model(x):
        ...     numpyro.sample("w", dist.Normal())
        >>> guide = AutoNormal(model)
        >>> set_up_guide(guide, jax.random.key(0), {"x": np.zeros(3)})
        >>> sorted(guide.sample_posterior(jax.random.key(1), {"w_auto_loc": 0.0, "w_auto_scale": 1.0}))
        ['w']
    """
    if not isinstance(guide, AutoGuide) or guide.prototype_trace is not None:
        return
    state = _set_up_compiled(guide, rng_key, kwargs)
    if state is None:
        handlers.seed(guide, rng_key)(**kwargs)  # an AutoGuide sets itself up on its first call
        return
    for part, attributes in zip(_stateful_parts(guide), state, strict=True):
        vars(part).update(attributes)


def _set_up_compiled(guide: AutoGuide, rng_key: jax.Array, kwargs: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """What setting ``guide`` up on ``kwargs`` leaves on it and on every guide inside it (their
    attributes), computed by one compiled program instead of op by op (each operation of
    NumPyro's set-up compiled on its first use: seconds on a CPU). Every value the set-up
    computes is an output of the program, put back where the set-up left it (containers,
    objects, closures); where it keeps an input itself, the input array is put back, as a set-up
    on values keeps it. The arrays of ``kwargs`` are the program's arguments (its compilation,
    and its cache entry, serve any data of their shapes), the rest pass as they are. ``None``
    where that cannot be done: the set-up does not trace (Python control flow on values), or a
    computed value stays out of reach."""
    parts = _stateful_parts(guide)
    arrays, static = split_arrays(kwargs)
    traced: list[tuple[list[dict[str, Any]], list[Any], dict[int, Any]]] = []

    def set_up(key: jax.Array, inputs: dict[str, jax.Array]) -> list[jax.Array]:
        with restored_after(guide):  # the guide itself is left as it was, not set up
            handlers.seed(guide, key)(**inputs, **static)
            attributes = [dict(vars(part)) for part in parts]
        given = {id(inputs[name]): arrays[name] for name in inputs}
        tracers = [node for node in _reachable(attributes) if _is_tracer(node) and id(node) not in given]
        traced.append((attributes, tracers, given))
        return tracers

    try:
        values = jax.jit(set_up)(rng_key, arrays)
        ((attributes, tracers, given),) = traced
        concrete = {**given, **{id(tracer): value for tracer, value in zip(tracers, values, strict=True)}}
        state = _substituted(attributes, concrete, {})
    except Exception:  # a set-up that only runs on values, or a structure that cannot be rebuilt
        return None
    return None if any(_is_tracer(node) for node in _reachable(state)) else state


def _is_tracer(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


_ATOMS = (str, bytes, int, float, complex, bool, type(None), np.ndarray, np.generic, type, types.ModuleType)


def _children(node: Any) -> list[Any]:
    """What ``node`` holds: a container's items, an object's attributes (``__dict__`` and
    ``__slots__``), a ``functools.partial``'s function and arguments, a function's closure and
    defaults (not its module's globals), a bound method's function and object."""
    if isinstance(node, dict):
        return [*node.keys(), *node.values()]
    if isinstance(node, list | tuple | set | frozenset):
        return list(node)
    if isinstance(node, functools.partial):
        return [node.func, node.args, node.keywords]
    if isinstance(node, types.FunctionType):
        return [
            *(cell.cell_contents for cell in node.__closure__ or () if _cell_is_set(cell)),
            node.__defaults__,
            node.__kwdefaults__,
        ]
    if isinstance(node, types.MethodType):
        return [node.__func__, node.__self__]
    held = list(vars(node).values()) if hasattr(node, "__dict__") else []
    return held + [getattr(node, name) for name in _slots(node) if hasattr(node, name)]


def _slots(node: Any) -> list[str]:
    return [name for cls in type(node).__mro__ for name in getattr(cls, "__slots__", ()) if name != "__dict__"]


def _cell_is_set(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 -- an empty cell raises
    except ValueError:
        return False
    return True


def _reachable(root: Any) -> Iterator[Any]:
    """Every object reachable from ``root`` through :func:`_children`, each once."""
    pending, seen = [root], set()
    while pending:
        node = pending.pop()
        if isinstance(node, _ATOMS) or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        if not isinstance(node, jax.Array):
            pending.extend(_children(node))


def _substituted(node: Any, concrete: Mapping[int, Any], memo: dict[int, Any]) -> Any:
    """``node`` with every tracer in ``concrete`` replaced by its value, where :func:`_children`
    reaches it: mutable holders changed in place, tuples and partials rebuilt."""
    if _is_tracer(node):
        return concrete.get(id(node), node)
    if isinstance(node, (*_ATOMS, jax.Array)) or id(node) in memo:
        return memo.get(id(node), node)
    memo[id(node)] = node

    def sub(value: Any) -> Any:
        return _substituted(value, concrete, memo)

    if isinstance(node, dict):
        for key, value in list(node.items()):
            if (new := sub(value)) is not value:
                node[key] = new
    elif isinstance(node, list):
        node[:] = [sub(value) for value in node]
    elif isinstance(node, tuple):
        items = [sub(value) for value in node]
        if any(new is not old for new, old in zip(items, node, strict=True)):
            memo[id(node)] = type(node)._make(items) if hasattr(node, "_make") else type(node)(items)
    elif isinstance(node, functools.partial):
        func, args, keywords = sub(node.func), sub(node.args), sub(node.keywords)
        node.__setstate__((func, args, keywords, vars(node) or None))
    elif isinstance(node, types.FunctionType):
        for cell in node.__closure__ or ():
            if _cell_is_set(cell) and (new := sub(cell.cell_contents)) is not cell.cell_contents:
                cell.cell_contents = new
        node.__defaults__, node.__kwdefaults__ = sub(node.__defaults__), sub(node.__kwdefaults__)
    elif isinstance(node, types.MethodType):
        sub(node.__self__)
    else:
        if hasattr(node, "__dict__"):
            sub(vars(node))
        for name in _slots(node):
            if hasattr(node, name) and (new := sub(getattr(node, name))) is not getattr(node, name):
                object.__setattr__(node, name, new)
    return memo[id(node)]


def model_kwargs(svi: SVI, batch: Batch) -> dict[str, Any]:
    """A batch plus the ``SVI``'s static keyword arguments: what the model and guide take."""
    return {**batch, **svi.static_kwargs}


def first_batch(
    device_data: Mapping[str, jax.Array], record: Record, padding: RowPadding | None = None
) -> tuple[Batch, jax.Array]:
    """The batch of a record's first step and its dataset row indices (the prototype batch
    every traced function uses); with ``padding``, its real rows only."""
    indices = record["indices"][0]
    batch = batch_from(device_data, jax.tree.map(lambda leaf: leaf[0], record["rows"]), indices)
    if padding is not None and padding.rows < indices.shape[0]:
        return {key: value[: padding.rows] for key, value in batch.items()}, indices[: padding.rows]
    return batch, indices


def make_init(
    svi: SVI, row_plates: tuple[str, ...], *, padding: RowPadding | None = None
) -> Callable[[jax.Array, Mapping[str, jax.Array], Record], TrainState]:
    """``init(rng_key, device_data, record) -> TrainState`` from the record's first batch (its
    real rows: a guide's initial per-row values repeat those of the batch it is set up on)."""

    def init(rng_key: jax.Array, device_data: Mapping[str, jax.Array], record: Record) -> TrainState:
        with traced_svi(svi, *first_batch(device_data, record, padding), row_plates, rng_key) as svi_state:
            return TrainState(svi_state, jnp.asarray(True))

    return init


class StepView(NamedTuple):
    """What a per-step metric sees of one SVI update (all traced values, inside the chunk).

    Attributes:
        loss: the step's ELBO loss.
        grads: the gradient of the loss in the optimizer's (unconstrained) parameters.
        params: those parameters before the update, where the gradient was taken.
        svi_state: the ``SVIState`` after the update.
    """

    loss: jax.Array
    grads: Any
    params: Any
    svi_state: SVIState


StepMetric = Callable[[StepView], jax.Array]
"""A per-step metric: a pure function of a :class:`StepView` returning one scalar."""


def grad_norm(view: StepView) -> jax.Array:
    """The global (L2) norm of the step's gradient over every parameter."""
    import optax  # at the first trace, not at import: a fit may not ask for it

    return optax.tree.norm(view.grads)


def param_norm(view: StepView) -> jax.Array:
    """The global (L2) norm of the unconstrained parameters the step's gradient was taken at."""
    import optax  # at the first trace, not at import: a fit may not ask for it

    return optax.tree.norm(view.params)


BUILT_IN_STEP_METRICS: dict[str, StepMetric] = {"grad_norm": grad_norm, "param_norm": param_norm}


def step_metric_functions(step_metrics: Any) -> dict[str, StepMetric]:
    """``step_metrics`` as name -> function: built-in names looked up, a mapping checked."""
    if isinstance(step_metrics, Mapping):
        for name, fn in step_metrics.items():
            if not isinstance(name, str) or not name or not callable(fn):
                raise ConfigurationError(
                    f"step_metrics must map metric names to functions of a StepView; got {name!r}: {fn!r}."
                )
        return dict(step_metrics)
    if isinstance(step_metrics, str) or not isinstance(step_metrics, Sequence):
        raise ConfigurationError(
            f"step_metrics must be a list of names from {sorted(BUILT_IN_STEP_METRICS)} or a mapping of names to "
            f"functions; got {step_metrics!r}."
        )
    unknown = [name for name in step_metrics if name not in BUILT_IN_STEP_METRICS]
    if unknown:
        raise ConfigurationError(
            f"step_metrics {unknown} are not built in; the built-in ones are {sorted(BUILT_IN_STEP_METRICS)} "
            "(pass a mapping of names to functions for your own)."
        )
    return {name: BUILT_IN_STEP_METRICS[name] for name in step_metrics}


@contextlib.contextmanager
def gradients_recorded(svi: SVI) -> Iterator[dict[str, Any]]:
    """Inside a trace: ``svi`` with its optimizer's ``update`` recording the gradient and the
    parameters it receives (keys ``"grads"`` and ``"params"`` of the yielded dict) on their way
    through. ``SVI.update`` stays NumPyro's own: the gradient it computes is read, not
    recomputed. An optimizer that updates without gradients (``Minimize``) records nothing."""
    optim = svi.optim
    recorded: dict[str, Any] = {}
    recording = copy.copy(optim)

    def update(grads: Any, state: Any, *args: Any, **kwargs: Any) -> Any:
        recorded.update(grads=grads, params=optim.get_params(state))
        return optim.update(grads, state, *args, **kwargs)

    recording.update = update  # an instance attribute: ``eval_and_update`` calls ``self.update``
    svi.optim = recording
    try:
        yield recorded
    finally:
        svi.optim = optim


def learning_rate(optim_state: Any) -> jax.Array | None:
    """The learning rate held in an ``optax.inject_hyperparams`` state, if there is one."""
    for node in jax.tree.leaves(optim_state, is_leaf=lambda x: hasattr(x, "hyperparams")):
        hyperparams = getattr(node, "hyperparams", None)
        if isinstance(hyperparams, Mapping) and "learning_rate" in hyperparams:
            return hyperparams["learning_rate"]
    return None


def make_train_chunk(
    svi: SVI,
    row_plates: tuple[str, ...],
    step_metrics: Mapping[str, StepMetric] | None = None,
    *,
    padding: RowPadding | None = None,
) -> Callable[[TrainState, Mapping[str, jax.Array], Record], tuple[TrainState, jax.Array, dict[str, jax.Array]]]:
    """``chunk(state, device_data, record) -> (state, losses, metrics)``: SVI updates in one
    ``lax.scan`` over the record's K stacked batches, of which the first ``record["num_steps"]``
    are real; the others skip the update (their loss is NaN), so one compiled function serves
    every chunk length. The K losses come back together, and so do the K values of each of
    ``step_metrics`` (name -> :data:`StepMetric`; NaN for the skipped steps). Each batch's row
    indices go into ``row_plates``; with ``padding``, the columns past its ``rows`` are masked
    out (:func:`~aimz_trainer.plates.padding_masked`).
    """
    step_metrics = dict(step_metrics or {})
    dtype = jnp.result_type(float)

    def train_chunk(
        state: TrainState, device_data: Mapping[str, jax.Array], record: Record
    ) -> tuple[TrainState, jax.Array, dict[str, jax.Array]]:
        def update(svi_state: SVIState, batch: Batch, indices: jax.Array) -> tuple[SVIState, jax.Array, Any]:
            masked = padding_masked(padding, indices.shape[0])
            with at_rows(row_plates, indices), masked, gradients_recorded(svi) as recorded:
                updated, loss = svi.update(svi_state, **batch)
            if step_metrics and not recorded:
                raise ConfigurationError(
                    f"step_metrics {sorted(step_metrics)} need the gradient of each step, and the optimizer "
                    f"{type(svi.optim).__name__} updates without one; use an optax or numpyro.optim optimizer."
                )
            view = StepView(loss, recorded.get("grads"), recorded.get("params"), updated)
            return updated, loss, {name: jnp.asarray(fn(view), dtype) for name, fn in step_metrics.items()}

        def skip(svi_state: SVIState, batch: Batch, indices: jax.Array) -> tuple[SVIState, jax.Array, Any]:
            nan = jnp.asarray(jnp.nan, dtype)
            return svi_state, nan, {name: nan for name in step_metrics}

        def step(carry: TrainState, inputs: tuple[jax.Array, Any, jax.Array]) -> tuple[TrainState, Any]:
            position, rows, indices = inputs
            real = position < record["num_steps"]
            batch = batch_from(device_data, rows, indices)
            updated, loss, metrics = lax.cond(real, update, skip, carry.svi_state, batch, indices)
            finite = carry.finite & (jnp.isfinite(loss) | ~real)
            svi_state = lax.cond(finite, lambda: updated, lambda: carry.svi_state)
            return TrainState(svi_state, finite), (loss, metrics)

        positions = jnp.arange(record["indices"].shape[0])
        with traced_svi(svi, *first_batch(device_data, record), row_plates):
            state, (losses, metrics) = lax.scan(step, state, (positions, record["rows"], record["indices"]))
        return state, losses, metrics

    return train_chunk


def make_params(
    svi: SVI, row_plates: tuple[str, ...]
) -> Callable[[SVIState, Mapping[str, jax.Array], Record], dict[str, jax.Array]]:
    """``params(svi_state, device_data, record)``: the constrained variational parameters."""

    def params(svi_state: SVIState, device_data: Mapping[str, jax.Array], record: Record) -> dict[str, jax.Array]:
        with traced_svi(svi, *first_batch(device_data, record), row_plates):
            return svi.get_params(svi_state)

    return params


def guide_draw(
    guide: Callable[..., Any], rng_key: jax.Array, params: Mapping[str, jax.Array], batch: Mapping[str, Any]
) -> dict[str, jax.Array]:
    """One draw of every latent site of ``guide`` run on ``batch`` with ``params`` (constrained,
    as ``svi.get_params`` gives them; latent values in ``params`` are kept, not drawn). Under
    :func:`~aimz_trainer.plates.at_rows`, per-row sites are drawn for the batch's rows only;
    works for any guide, hand-written ones included."""
    conditioned = handlers.seed(handlers.substitute(guide, data=params), rng_key)
    trace = handlers.trace(conditioned).get_trace(**batch)
    return {name: site["value"] for name, site in trace.items() if site["type"] == "sample" and not site["is_observed"]}


def sample_posterior(
    svi: SVI,
    rng_key: jax.Array,
    params: dict[str, jax.Array],
    batch: Batch,
    num_samples: int,
    layout: ModelLayout,
    *,
    draws_per_chunk: int = 100,
) -> dict[str, jax.Array]:
    """``num_samples`` draws of the model's global sites from the guide, ``draws_per_chunk`` at
    a time (vectorised within a chunk, sequential across chunks) so memory stays bounded. Call
    under :func:`traced_svi`, with ``batch``'s rows in the row plates (:func:`at_rows`).

    The draws hold the global latent sites and the global deterministic sites. Per-row sites
    are left out: a per-row latent has one value per row of the whole data (a million rows x a
    thousand draws would not fit in memory) and is drawn row by row where it is needed (the
    Predictor), and a per-row deterministic site would hold the values of one batch only.

    A model with global latents only, under an ``AutoGuide``, is drawn by the guide's own
    ``sample_posterior``; otherwise the guide itself is run on ``batch`` (any guide, a
    hand-written one too) and the model computes the deterministic sites from its draw."""
    keys = jax.random.split(rng_key, num_samples)
    kwargs = model_kwargs(svi, batch)
    kept = {*layout.global_sites, *layout.global_deterministic}

    def draw(key: jax.Array) -> dict[str, jax.Array]:
        if isinstance(svi.guide, AutoGuide) and not layout.local_sites:
            values = svi.guide.sample_posterior(key, params, **kwargs)
        else:
            guide_key, model_key = jax.random.split(key)
            values = guide_draw(svi.guide, guide_key, params, kwargs)
            values = {name: value for name, value in values.items() if name in layout.global_sites}
            if layout.global_deterministic:
                model = handlers.seed(handlers.substitute(svi.model, data=values), model_key)
                trace = handlers.trace(model).get_trace(**kwargs)
                values.update({name: trace[name]["value"] for name in layout.global_deterministic})
        return {name: value for name, value in values.items() if name in kept}

    return lax.map(draw, keys, batch_size=min(draws_per_chunk, num_samples))


def make_posterior_sampler(
    svi: SVI, num_samples: int, layout: ModelLayout, *, padding: RowPadding | None = None
) -> Callable[[SVIState, jax.Array, Mapping[str, jax.Array], Record], dict[str, jax.Array]]:
    """``sample(svi_state, rng_key, device_data, record)``: ``num_samples`` posterior draws, on
    the record's first batch (its real rows, with ``padding``)."""

    def sample(
        svi_state: SVIState, rng_key: jax.Array, device_data: Mapping[str, jax.Array], record: Record
    ) -> dict[str, jax.Array]:
        batch, indices = first_batch(device_data, record, padding)
        with traced_svi(svi, batch, indices, layout.row_plates), at_rows(layout.row_plates, indices):
            return sample_posterior(svi, rng_key, svi.get_params(svi_state), batch, num_samples, layout)

    return sample


def pointwise_lpd(log_likelihoods: Mapping[str, jax.Array]) -> jax.Array:
    """Per-observation log predictive density from ``(draws, rows, ...)`` log-likelihoods:
    ``log mean_s p(y_i | theta_s)``, summed over the observed sites and their event dims."""
    total = None
    for values in log_likelihoods.values():
        draws = values.shape[0]
        per_row = logsumexp(values, axis=0) - jnp.log(draws)
        per_row = per_row.reshape(per_row.shape[0], -1).sum(axis=1)
        total = per_row if total is None else total + per_row
    assert total is not None, "the model has no observed site"
    return total


def make_validation_step(
    svi: SVI, num_samples: int, num_train_rows: int, layout: ModelLayout, *, padding: RowPadding | None = None
) -> Callable[[dict[str, jax.Array], jax.Array, Mapping[str, jax.Array], Record], dict[str, jax.Array]]:
    """``val(params, rng_key, device_data, record) -> {"loss", "lpd_sum", "weight_sum"}``
    for one validation batch, of the constrained variational ``params`` (``SVI.get_params``).

    ``loss`` is the SVI loss (the negative ELBO, with the model's own minibatch scaling) on the
    batch divided by ``num_train_rows``: the held-out negative ELBO per observation, on the
    scale of the training loss per observation. ``lpd_sum`` sums, over the batch's weighted
    rows, the log predictive density under ``num_samples`` guide draws (absent when the model
    has no observed site); ``weight_sum`` counts the batch's real rows. ``rng_key`` is split
    into the keys of the ELBO estimate, of the draws and of the sites drawn from the prior.

    Held-out rows have no fitted guide parameters of their own: for a model with per-row
    latent sites, ``loss`` (which would need them) is absent, and the log predictive density
    draws those sites from the prior, given each draw of the global sites (the density of new
    rows, whose latents are unknown).

    With ``padding``, the batch's columns past ``padding.rows`` (weight 0) are masked out of
    ``loss`` (:func:`~aimz_trainer.plates.padding_masked`), as the weights leave them out of
    the rest.
    """

    def validate(
        params: dict[str, jax.Array], rng_key: jax.Array, device_data: Mapping[str, jax.Array], record: Record
    ) -> dict[str, jax.Array]:
        batch, indices = first_batch(device_data, record)
        # The rows are not training rows: the plates get valid indices that stand for nothing.
        indices = indices % num_train_rows
        weights = record["weights"][0]
        loss_key, draw_key, plate_key = jax.random.split(rng_key, 3)
        metrics = {"weight_sum": jnp.sum(weights)}
        with traced_svi(svi, batch, indices, layout.row_plates), at_rows(layout.row_plates, indices):
            kwargs = model_kwargs(svi, batch)
            if not layout.local_sites:
                with padding_masked(padding, indices.shape[0]):
                    loss = svi.loss.loss(loss_key, params, svi.model, svi.guide, **kwargs)
                metrics["loss"] = loss / num_train_rows
            if not layout.observed_sites:
                return metrics
            draws = sample_posterior(svi, draw_key, params, batch, num_samples, layout)
            draws = {name: value for name, value in draws.items() if name in layout.global_sites}
            # Sites not drawn (per-row latents) come from the prior: a key of their own per draw.
            keys = jax.random.split(plate_key, num_samples)
            log_likelihoods = jax.vmap(
                lambda theta, key: log_likelihood(handlers.seed(svi.model, key), theta, batch_ndims=0, **kwargs)
            )(draws, keys)
        lpd = pointwise_lpd({name: log_likelihoods[name] for name in layout.observed_sites})
        metrics["lpd_sum"] = jnp.sum(lpd * weights)
        return metrics

    return validate
