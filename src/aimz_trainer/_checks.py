"""Checks of argument values shared by every public entry point."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from aimz_trainer.errors import AimzWarning, ConfigurationError, DataError

__all__ = [
    "ModelParameters",
    "as_key",
    "check_model_accepts",
    "is_int_at_least",
    "model_parameters",
    "require_batch_limit",
    "require_bool",
    "require_choice",
]


def is_int_at_least(value: Any, minimum: int) -> bool:
    """Whether ``value`` is an integer (Python or NumPy; ``True``/``False`` are not counts) of at
    least ``minimum``.

    Example:
        >>> is_int_at_least(3, 1), is_int_at_least(True, 1), is_int_at_least(0, 1)
        (True, False, False)
    """
    return isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= minimum


def as_key(rng_key: Any, *, name: str = "rng_key") -> jax.Array:
    """``rng_key`` as one typed JAX key: a ``jax.random.key(seed)`` as it is, a legacy ``uint32[2]``
    key (``jax.random.PRNGKey``) wrapped, with a warning; anything else (a seed, a batch of
    keys) is refused with a :class:`~aimz_trainer.errors.ConfigurationError` naming ``name``.

    Example:
        >>> as_key(jax.random.key(1)).shape
        ()
        >>> try:
        ...     as_key(1)
        ... except ConfigurationError as error:
        ...     print(error)
        rng_key must be one key, jax.random.key(seed); got 1 (an int: pass jax.random.key(1)).
    """
    is_array = isinstance(rng_key, jax.Array | np.ndarray)
    if is_array and jax.dtypes.issubdtype(rng_key.dtype, jax.dtypes.prng_key):
        if rng_key.shape != ():
            raise ConfigurationError(
                f"{name} must be one key, jax.random.key(seed); got a batch of keys of shape {rng_key.shape}."
            )
        return rng_key  # type: ignore[return-value]
    if is_array and rng_key.dtype == np.uint32 and rng_key.shape == (2,):
        warnings.warn(
            f"{name} is a legacy uint32 key (jax.random.PRNGKey); converted to a typed key. "
            "Pass jax.random.key(seed) instead.",
            AimzWarning,
            stacklevel=3,
        )
        return jax.random.wrap_key_data(rng_key)
    hint = f" (an int: pass jax.random.key({rng_key}))" if isinstance(rng_key, int | np.integer) else ""
    shape = f" of shape {rng_key.shape} and dtype {rng_key.dtype}" if is_array else ""
    raise ConfigurationError(f"{name} must be one key, jax.random.key(seed); got {rng_key!r}{shape}{hint}.")


def require_batch_limit(name: str, value: Any, *, minimum: int) -> int | float:
    """``value`` as a limit on a number of batches (an int of at least ``minimum``, or a float
    fraction in (0, 1]), or a :class:`~aimz_trainer.errors.ConfigurationError` naming ``name``.

    Example:
        >>> require_batch_limit("limit_train_batches", 0.25, minimum=1)
        0.25
    """
    if is_int_at_least(value, minimum):
        return int(value)
    if isinstance(value, float | np.floating) and 0 < value <= 1:
        return float(value)
    raise ConfigurationError(
        f"{name} must be a number of batches (an int >= {minimum}) or a fraction of them (a float in (0, 1]); "
        f"got {value!r}."
    )


def require_bool(name: str, value: Any) -> None:
    """Raise :class:`~aimz_trainer.errors.ConfigurationError` unless ``value`` is ``True`` or
    ``False`` (a string such as ``"no"`` would otherwise count as true).

    Example:
        >>> require_bool("shuffle", True)
    """
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name} must be True or False; got {value!r}.")


def require_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise :class:`~aimz_trainer.errors.ConfigurationError` unless ``value`` is one of the
    strings ``choices`` (checked as a string first: an array would not compare as one value).

    Example:
        >>> require_choice("mode", "min", ("min", "max"))
    """
    if not isinstance(value, str) or value not in choices:
        accepted = " or ".join(repr(choice) for choice in choices)
        raise ConfigurationError(f"{name} must be {accepted}; got {value!r}.")


class ModelParameters(NamedTuple):
    """What a model's signature says about the keyword arguments it takes.

    Attributes:
        names: every named parameter, in order.
        keyword: those a keyword argument can fill (not positional-only, not ``*args``).
        optional: those with a default value.
        any_keyword: the model takes ``**kwargs``: every keyword is accepted.
        known: ``False`` when the callable has no signature to read (a builtin): nothing is checked.
    """

    names: tuple[str, ...]
    keyword: tuple[str, ...]
    optional: frozenset[str]
    any_keyword: bool
    known: bool = True


def model_parameters(model: Callable[..., Any]) -> ModelParameters:
    """The one reading of a model's signature every entry point uses.

    Example:
        >>> def model(x, y=None, *, scale=1.0): ...
        >>> parameters = model_parameters(model)
        >>> parameters.keyword, sorted(parameters.optional)
        (('x', 'y', 'scale'), ['scale', 'y'])
    """
    try:
        parameters = list(inspect.signature(model).parameters.values())
    except (TypeError, ValueError):  # builtins and C callables: nothing to read
        return ModelParameters((), (), frozenset(), any_keyword=True, known=False)
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return ModelParameters(
        names=tuple(p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)),
        keyword=tuple(p.name for p in parameters if p.kind in keyword_kinds),
        optional=frozenset(p.name for p in parameters if p.default is not inspect.Parameter.empty),
        any_keyword=any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters),
    )


def check_model_accepts(model: Callable[..., Any], keys: list[str], *, name: str = "train_data") -> None:
    """Raise :class:`~aimz_trainer.errors.DataError` if the model cannot take every key of
    ``name`` (the data) as a keyword argument."""
    parameters = model_parameters(model)
    if parameters.any_keyword:
        return
    unknown = [key for key in keys if key not in parameters.keyword]
    if unknown:
        raise DataError(
            f"the model does not accept the {name} key(s) {unknown}: batches are passed as keyword "
            f"arguments and the model's keyword parameters are {list(parameters.keyword)}. Rename the keys of "
            f"{name} to match."
        )
