"""LambdaCallback: a callback made of functions, one per hook, for the one-off cases that do
not deserve a class (print a value, log a derived metric, stop on a condition)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from aimz_trainer.callbacks.base import Callback
from aimz_trainer.errors import ConfigurationError

__all__ = ["LambdaCallback"]

# Every hook of the Callback contract: its on_* methods and teardown.
HOOKS = (*(name for name, _ in inspect.getmembers(Callback, inspect.isfunction) if name.startswith("on_")), "teardown")


class LambdaCallback(Callback):
    """A :class:`~aimz_trainer.callbacks.Callback` whose hooks are the given functions; each
    takes the hook's arguments (``fit``, ``progress``, ...), and hooks not given do nothing.

    Raises:
        ConfigurationError: a keyword is not a hook's name, or its value is not callable.

    Example:
        >>> seen = []
        >>> callback = LambdaCallback(on_fit_end=lambda fit, progress: seen.append(progress.step))
        >>> sorted(name for name in HOOKS if name in vars(callback))
        ['on_fit_end']
    """

    def __init__(self, **hooks: Callable[..., Any]) -> None:
        unknown = sorted(set(hooks) - set(HOOKS))
        if unknown:
            raise ConfigurationError(f"LambdaCallback got {unknown}, which are not hooks; the hooks are {list(HOOKS)}.")
        for name, function in hooks.items():
            if not callable(function):
                raise ConfigurationError(f"LambdaCallback({name}=...) must be a function; got {function!r}.")
            setattr(self, name, function)  # the instance's function stands in for the no-op hook
