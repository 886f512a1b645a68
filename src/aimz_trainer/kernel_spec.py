"""What an ``ImpactModel`` knows of its kernel: the signature rules it checks up front and the
sites a trace of the kernel records (:class:`KernelSpec`).

A trace runs the kernel abstractly (``jax.eval_shape``): it costs no computation, whatever
the number of rows, and records each site's type, whether it is observed and its plates.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from aimz_trainer.data import is_lazy_source
from aimz_trainer.errors import KernelValidationError
from aimz_trainer.plates import site_dims, trace_model

__all__ = ["KernelSpec", "SiteInfo", "check_kernel_signature", "merge_specs", "trace_kernel"]

# Dimension names of every output tree: a site of that name would collide with them.
RESERVED_SITE_NAMES = ("chain", "draw")


@dataclass(frozen=True)
class KernelSpec:
    """The kernel's structure as its traces recorded it.

    Attributes:
        traced: whether a trace has run (``False`` for a spec made from posterior samples alone).
        sample_sites: the sample sites, latent and observed, in the order the kernel runs them.
        return_sites: the default sites of predictions: the output, then the deterministic sites.
        output_observed: whether a trace observed the output site.
    """

    traced: bool
    sample_sites: tuple[str, ...]
    return_sites: tuple[str, ...]
    output_observed: bool


@dataclass(frozen=True)
class SiteInfo:
    """One site of a trace: ``kind`` (``"latent"``, ``"observed"`` or ``"deterministic"``) and
    the dims of its value (:func:`~aimz_trainer.plates.site_dims`: plate names, else
    ``<site>_dim_i``)."""

    kind: str
    dims: tuple[str, ...]


def check_kernel_signature(kernel: Callable[..., Any], param_input: str, param_output: str) -> None:
    """Raise :class:`~aimz_trainer.errors.KernelValidationError` unless every argument of
    ``kernel`` can be passed by name, it takes ``param_input`` without a default and
    ``param_output`` with the default ``None``.

    Example:
        >>> def kernel(X, y=None): ...
        >>> check_kernel_signature(kernel, "X", "y")
        >>> try:
        ...     check_kernel_signature(kernel, "X", "target")
        ... except KernelValidationError as error:
        ...     print(error)
        the kernel must take 'target' (param_output); its parameters are ['X', 'y'].
    """
    if not callable(kernel):
        raise KernelValidationError(f"kernel must be a NumPyro model (a callable); got {type(kernel).__name__}.")
    parameters = inspect.signature(kernel).parameters
    variable = [name for name, p in parameters.items() if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if variable:
        raise KernelValidationError(
            f"the kernel must not take variable arguments (*args or **kwargs); it takes {variable}: name each one."
        )
    positional = [name for name, p in parameters.items() if p.kind == p.POSITIONAL_ONLY]
    if positional:
        raise KernelValidationError(
            f"the kernel must not have positional-only parameters ({positional}): every argument is passed by name."
        )
    for role, name in [("param_input", param_input), ("param_output", param_output)]:
        if not isinstance(name, str) or name not in parameters:
            raise KernelValidationError(
                f"the kernel must take {name!r} ({role}); its parameters are {list(parameters)}."
            )
    if parameters[param_input].default is not inspect.Parameter.empty:
        raise KernelValidationError(f"the kernel's input parameter {param_input!r} must not have a default value.")
    if parameters[param_output].default is not None:
        raise KernelValidationError(
            f"the kernel's output parameter {param_output!r} must default to None (predictions call it without "
            f"the output); its default is {parameters[param_output].default!r}."
        )


def trace_kernel(
    kernel: Callable[..., Any], kwargs: Mapping[str, Any], param_output: str, *, with_output: bool
) -> tuple[KernelSpec, dict[str, SiteInfo]]:
    """Trace ``kernel(**kwargs)`` abstractly; return its spec and its sites.

    Raises:
        KernelValidationError: a site name holds ``/`` or is ``chain`` or ``draw``; the kernel
            has no site named ``param_output``; or ``with_output`` (the output was passed, as in
            a fit) and that site is not an observed sample site.
    """
    arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array | np.ndarray)}
    # A lazy source (aimz_trainer.data) is traced by its shape and dtype, never read.
    arrays.update({
        k: jax.ShapeDtypeStruct(tuple(v.shape), np.dtype(v.dtype)) for k, v in kwargs.items() if is_lazy_source(v)
    })  # fmt: skip
    static = {k: v for k, v in kwargs.items() if k not in arrays}
    recorded: dict[str, dict[str, Any]] = {}

    def run(arrays: dict[str, Any]) -> None:
        for name, site in trace_model(kernel, {**arrays, **static}).items():
            shape = tuple(np.shape(site["value"])) if site["type"] in ("sample", "deterministic") else ()
            recorded[name] = {
                "type": site["type"],
                "is_observed": bool(site.get("is_observed")),
                "dims": site_dims(site, name, len(shape)),
            }

    jax.eval_shape(run, arrays)
    invalid = [name for name in recorded if "/" in name]
    if invalid:
        raise KernelValidationError(
            f"site names must not hold '/' (a DataTree path separator); got {invalid}. Rename the sites."
        )
    reserved = [n for n in RESERVED_SITE_NAMES if recorded.get(n, {}).get("type") in ("sample", "deterministic")]
    if reserved:
        raise KernelValidationError(f"the site name(s) {reserved} are dimensions of every output tree; rename them.")
    output = recorded.get(param_output)
    if output is None or output["type"] not in ("sample", "deterministic"):
        raise KernelValidationError(
            f"the kernel has no sample or deterministic site named {param_output!r} (its output parameter). Name "
            "the output site after the output argument, or pass param_output= naming both."
        )
    if with_output and (output["type"] != "sample" or not output["is_observed"]):
        raise KernelValidationError(
            f"the kernel's output site {param_output!r} must be observed: numpyro.sample({param_output!r}, ..., "
            f"obs={param_output})."
        )
    sites = {
        name: _site_info(name, site, param_output)
        for name, site in recorded.items()
        if site["type"] in ("sample", "deterministic")
    }
    spec = KernelSpec(
        traced=True,
        sample_sites=tuple(n for n, s in recorded.items() if s["type"] == "sample"),
        return_sites=(
            param_output,
            *(n for n, s in recorded.items() if s["type"] == "deterministic" and n != param_output),
        ),
        output_observed=bool(output["is_observed"]),
    )
    return spec, sites


def merge_specs(old: KernelSpec | None, new: KernelSpec) -> KernelSpec:
    """The sites of both traces (a site recorded only for some arguments is kept once seen)."""
    if old is None or not old.traced:
        return new
    return KernelSpec(
        traced=True,
        sample_sites=tuple(dict.fromkeys((*old.sample_sites, *new.sample_sites))),
        return_sites=tuple(dict.fromkeys((*old.return_sites, *new.return_sites))),
        output_observed=old.output_observed or new.output_observed,
    )


def _site_info(name: str, site: Mapping[str, Any], param_output: str) -> SiteInfo:
    if site["type"] == "deterministic":
        kind = "deterministic"
    else:
        kind = "observed" if site["is_observed"] or name == param_output else "latent"
    return SiteInfo(kind, site["dims"])
