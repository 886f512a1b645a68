"""ModelSummary: the variational parameters of a fit, one row each, with their total, printed
and logged at fit start."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import numpy as np

from aimz_trainer.callbacks.base import Callback
from aimz_trainer.errors import ConfigurationError

if TYPE_CHECKING:
    from aimz_trainer.callbacks.context import FitContext, FitProgress

__all__ = ["ModelSummary", "ParamRow", "format_param_table", "param_rows"]


class ParamRow(NamedTuple):
    """One variational parameter.

    Attributes:
        name: the parameter's name (``w_auto_loc`` for an ``AutoNormal`` guide's site ``w``; a
            nested parameter's path joined with ``/``).
        shape: its shape.
        count: its number of values.
        dtype: its dtype's name.
    """

    name: str
    shape: tuple[int, ...]
    count: int
    dtype: str


def param_rows(params: Mapping[str, Any]) -> list[ParamRow]:
    """A :class:`ParamRow` for every array in ``params`` (a guide's parameters), by name (pytree order).

    Only shapes and dtypes are read: nothing moves off the devices.

    Example:
        >>> import numpy as np
        >>> param_rows({"w_auto_loc": np.zeros(3, np.float32)})
        [ParamRow(name='w_auto_loc', shape=(3,), count=3, dtype='float32')]
    """
    rows = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(dict(params))[0]:
        shape = tuple(int(size) for size in np.shape(leaf))
        name = "/".join(str(getattr(key, "key", key)) for key in path)
        rows.append(ParamRow(name, shape, math.prod(shape), np.dtype(getattr(leaf, "dtype", np.float64)).name))
    return rows


def format_param_table(rows: list[ParamRow]) -> str:
    """``rows`` as a text table with a total line.

    Example:
        >>> rows = [ParamRow("w_auto_loc", (3,), 3, "float32"), ParamRow("b_auto_loc", (), 1, "float32")]
        >>> print(format_param_table(rows))
          | parameter  | shape | count | dtype
        --+------------+-------+-------+--------
        0 | w_auto_loc | (3,)  | 3     | float32
        1 | b_auto_loc | ()    | 1     | float32
        --+------------+-------+-------+--------
        total: 4 values in 2 parameters
    """
    header = ("", "parameter", "shape", "count", "dtype")
    cells = [header, *((str(i), r.name, str(r.shape), f"{r.count:,}", r.dtype) for i, r in enumerate(rows))]
    widths = [max(len(line[column]) for line in cells) for column in range(len(header))]
    rule = "-+-".join("-" * width for width in widths)
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in cells]
    total = sum(row.count for row in rows)
    return "\n".join([lines[0], rule, *lines[1:], rule, f"total: {total:,} values in {len(rows)} parameters"])


class ModelSummary(Callback):
    """At fit start, a table of the guide's variational parameters (name, shape, value count,
    dtype; constrained values, as ``fit.current_params()`` holds them) and their total:
    printed to stdout by process 0, and the total logged as ``num_params`` (a point at step 0
    in every logger, and ``trainer.callback_metrics["num_params"]``). A resumed fit prints the
    table again but logs nothing: its logs hold the step-0 point already.

    Args:
        print_table: print the table (``False``: only log the total and keep :attr:`rows`).

    Attributes:
        rows: the table's :class:`ParamRow` s, after fit start.
        total: their total value count, after fit start.

    Example:
        >>> from aimz_trainer import Trainer
        >>> trainer = Trainer(max_epochs=1, callbacks=[ModelSummary()], enable_progress_bar=False)
    """

    def __init__(self, *, print_table: bool = True) -> None:
        if not isinstance(print_table, bool):
            raise ConfigurationError(f"print_table must be True or False; got {print_table!r}.")
        self.print_table = print_table
        self.rows: list[ParamRow] = []
        self.total = 0

    def on_fit_start(self, fit: FitContext, progress: FitProgress) -> None:
        self.rows = param_rows(fit.current_params())
        self.total = sum(row.count for row in self.rows)
        if self.print_table and jax.process_index() == 0:
            print(format_param_table(self.rows), flush=True)
        if progress.step == 0:
            fit.log("num_params", self.total)
