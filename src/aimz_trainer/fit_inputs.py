"""The first stage of a fit: its arguments checked, before anything is placed or compiled."""

from __future__ import annotations

from typing import Any, NamedTuple

from jax.sharding import Mesh
from numpyro.infer import SVI

from aimz_trainer._checks import check_model_accepts, is_int_at_least, require_bool
from aimz_trainer.data import (
    NONFINITE_ROWS,
    BlockShuffle,
    check_processes_agree,
    require_finite_rows,
    validate_batch_size,
    validate_data,
    validate_val_data,
)
from aimz_trainer.errors import ConfigurationError
from aimz_trainer.plates import ModelLayout, check_paddable, check_trainable, model_layout

__all__ = ["FitInputs", "check_fit_inputs", "require_flag"]


class FitInputs(NamedTuple):
    """``fit``'s arguments, checked: the first stage's output."""

    svi: SVI
    arrays: dict[str, Any]
    num_rows: int
    batch_size: int
    layout: ModelLayout
    val_arrays: dict[str, Any] | None
    val_batch_size: int
    val_num_samples: int
    num_samples: int
    shuffle: bool | BlockShuffle
    drop_last: bool


def check_fit_inputs(
    svi: Any,
    train_data: Any,
    batch_size: Any,
    val_data: Any,
    val_batch_size: Any,
    val_num_samples: Any,
    num_samples: Any,
    shuffle: Any,
    drop_last: Any,
    mesh: Mesh,
) -> FitInputs:
    """``fit``'s arguments checked, before anything is placed or compiled."""
    if not isinstance(svi, SVI):
        raise ConfigurationError(f"svi must be a numpyro.infer.SVI; got {type(svi).__name__}.")
    if not isinstance(shuffle, BlockShuffle):
        shuffle = require_flag("shuffle", shuffle)
    drop_last = require_flag("drop_last", drop_last)
    arrays, num_rows = validate_data(train_data)
    require_finite_rows("train_data", arrays, NONFINITE_ROWS)
    check_model_accepts(svi.model, list(arrays))
    batch_size = validate_batch_size(batch_size, num_rows)
    layout = model_layout(svi.model, arrays, batch_rows=batch_size, static_kwargs=svi.static_kwargs)
    check_trainable(layout, svi.guide, num_rows, batch_size)
    check_paddable(layout, batch_size, mesh.size, num_rows)
    check_processes_agree(arrays, num_rows, batch_size)
    if not is_int_at_least(num_samples, 0):
        raise ConfigurationError(f"num_samples must be an int >= 0; got {num_samples!r}.")
    val_arrays = validate_val_data(val_data, arrays) if val_data is not None else None
    if val_arrays is not None:
        require_finite_rows("val_data", val_arrays, NONFINITE_ROWS)
        val_batch_size = batch_size if val_batch_size is None else val_batch_size
        if not is_int_at_least(val_batch_size, 1):
            raise ConfigurationError(f"val_batch_size must be a positive int; got {val_batch_size!r}.")
        check_paddable(layout, val_batch_size, mesh.size, name="val_batch_size")
        if not is_int_at_least(val_num_samples, 1):
            raise ConfigurationError(f"val_num_samples must be a positive int; got {val_num_samples!r}.")
    return FitInputs(
        svi,
        arrays,
        num_rows,
        batch_size,
        layout,
        val_arrays,
        int(val_batch_size or batch_size),
        int(val_num_samples),
        int(num_samples),
        shuffle,
        drop_last,
    )


def require_flag(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False``; else a :class:`ConfigurationError` naming ``name``."""
    require_bool(name, value)
    return bool(value)
