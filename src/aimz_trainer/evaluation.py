"""Held-out metrics without training: what ``Trainer.validate`` and ``Trainer.test`` run.

The parameters come from a checkpoint, from the caller, or from the Trainer's last fit; the
pass is the fit's own compiled validation (:class:`~aimz_trainer.validation.Validator`), with
the fit's validation key, so a checkpoint evaluated here reports what the fit logged at its
step, given the same held-out data and batch size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh
from numpyro.infer import SVI

from aimz_trainer._checks import check_model_accepts, is_int_at_least
from aimz_trainer.checkpoint import array_tree
from aimz_trainer.compile import FitPrograms
from aimz_trainer.data import (
    NONFINITE_ROWS,
    data_bytes,
    device_data_budget,
    is_lazy_source,
    place_data,
    require_finite_rows,
    resolve_placement,
    validate_data,
)
from aimz_trainer.errors import ConfigurationError
from aimz_trainer.plan import BatchLimit, Every
from aimz_trainer.plates import check_paddable, model_layout
from aimz_trainer.step import make_init, make_params
from aimz_trainer.validation import Validator

__all__ = ["EvaluationSource", "evaluate"]

Params = dict[str, Any]


class EvaluationSource(NamedTuple):
    """What an evaluation evaluates: the parameters and what the fit that made them knew.

    Attributes:
        params: constrained variational parameters.
        step: the fit's steps done (the loggers' rows go at ``step - 1``).
        epoch: the fit's epoch.
        rng_key: the fit's key (the validation key derives from it).
        num_train_rows: training rows (the losses are per training observation).
        batch_size: the fit's batch size (the default evaluation batch).
    """

    params: Params
    step: int
    epoch: int
    rng_key: jax.Array
    num_train_rows: int | None
    batch_size: int | None


def evaluate(
    svi: SVI,
    data: Any,
    source: EvaluationSource,
    mesh: Mesh,
    *,
    batch_size: int | None,
    num_samples: int,
    limit_batches: BatchLimit,
    validation_key: jax.Array,
) -> dict[str, float]:
    """``val_loss`` / ``val_lpd`` of ``source.params`` on ``data``: the fit's validation pass.

    Raises:
        ConfigurationError: a batch size or a number of training rows is needed and not known,
            or the parameters are not those of ``svi``'s guide (each difference named).
    """
    if not isinstance(svi, SVI):
        raise ConfigurationError(f"svi must be a numpyro.infer.SVI; got {type(svi).__name__}.")
    arrays, num_rows = validate_data(data, name="data")
    require_finite_rows("data", arrays, NONFINITE_ROWS)
    check_model_accepts(svi.model, list(arrays), name="data")
    batch_size = batch_size if batch_size is not None else source.batch_size
    if batch_size is None:
        raise ConfigurationError("batch_size is needed: there is no fit or checkpoint to take it from.")
    if not is_int_at_least(batch_size, 1):
        raise ConfigurationError(f"batch_size must be a positive int; got {batch_size!r}.")
    if not is_int_at_least(num_samples, 1):
        raise ConfigurationError(f"num_samples must be a positive int; got {num_samples!r}.")
    batch_size = min(int(batch_size), num_rows)
    layout = model_layout(svi.model, arrays, batch_rows=batch_size, static_kwargs=svi.static_kwargs)
    check_paddable(layout, batch_size, mesh.size, name="batch_size")
    num_train_rows = source.num_train_rows or next(iter(layout.plate_sizes.values()), None)
    if num_train_rows is None:
        raise ConfigurationError(
            "the losses are per training observation, and neither a fit, a checkpoint nor a subsampled plate "
            "of the model tells how many there were."
        )
    params = _checked_params(svi, layout.row_plates, arrays, batch_size, source.params)
    placement = resolve_placement(
        "auto",
        data_bytes(arrays),
        device_data_budget(mesh.local_devices[0], mesh.local_mesh.size),
        lazy=any(map(is_lazy_source, arrays.values())),
    )
    programs = FitPrograms(svi, layout, mesh, {}, {}, {}, batch_size)
    try:
        validator = Validator(
            programs,
            place_data(arrays, placement, mesh),
            mesh,
            batch_size=batch_size,
            num_samples=num_samples,
            num_train_rows=num_train_rows,
            rng_key=validation_key,
            every=Every(),
            limit_batches=limit_batches,
        )
        programs.prepare_validation(params, validator.inputs)
        return validator.run(params)
    finally:
        programs.close()


def _checked_params(
    svi: SVI, row_plates: tuple[str, ...], arrays: Mapping[str, Any], batch_size: int, params: Any
) -> Params:
    """``params`` on the mesh as JAX arrays, after checking they are the guide's: a parameter
    left out would otherwise be initialised afresh inside the pass, and the metrics would be
    those of an untrained guide."""
    if not isinstance(params, Mapping):
        raise ConfigurationError(f"params must map parameter names to arrays; got {type(params).__name__}.")
    rows = {key: np.asarray(array[:batch_size])[None] for key, array in arrays.items()}
    record = {"indices": np.arange(batch_size)[None], "rows": rows, "num_steps": np.int32(1)}
    init, to_params = make_init(svi, row_plates), make_params(svi, row_plates)
    expected = array_tree(
        jax.eval_shape(lambda key, rec: to_params(init(key, {}, rec).svi_state, {}, rec), jax.random.key(0), record)
    )
    given = array_tree({name: jax.numpy.asarray(value) for name, value in params.items()})
    differences = [f"{name}: missing" for name in sorted(set(expected) - set(given))]
    differences += [f"{name}: not a parameter of this guide" for name in sorted(set(given) - set(expected))]
    differences += [
        f"{name}: shape {given[name][0]} {given[name][1]}, expected {expected[name][0]} {expected[name][1]}"
        for name in sorted(set(expected) & set(given))
        if given[name] != expected[name]
    ]
    if differences:
        raise ConfigurationError("params are not this guide's parameters: " + "; ".join(differences))
    return {name: jax.numpy.asarray(value) for name, value in params.items()}
