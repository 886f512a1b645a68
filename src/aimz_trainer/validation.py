"""A fit's validation pass: held-out ELBO and log predictive density, batch by batch."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from aimz_trainer.compile import FitPrograms, ValidationInputs
from aimz_trainer.data import PlacedData, ValidationSource, first_record, make_chunk_loader
from aimz_trainer.errors import FitWarning
from aimz_trainer.plan import BatchLimit, Every
from aimz_trainer.sharding import padded_batch_size, records_to_global

__all__ = ["Validator", "sanity_check", "validation_metrics"]


class Validator:
    """Validates an SVI state on held-out data with the validation program of ``programs``,
    traced from :attr:`inputs` (by :meth:`FitPrograms.lower
    <aimz_trainer.compile.FitPrograms.lower>` in a fit, else by
    :meth:`~aimz_trainer.compile.FitPrograms.prepare_validation`).

    Args:
        programs: the fit's compiled programs.
        data: the held-out data, placed like the training data.
        mesh: the fit's mesh.
        batch_size: rows per validation batch (padded for the mesh's devices as training
            batches are, see :mod:`aimz_trainer.data`).
        num_samples: guide draws behind ``val_lpd``.
        num_train_rows: training rows (``val_loss`` is per training observation).
        rng_key: the key of every pass: the same keys each time, so passes compare like for
            like.
        every: when a pass is due.
        limit_batches: how many of the batches a pass runs (:func:`~aimz_trainer.plan.limited`).

    Attributes:
        inputs: what the validation program is traced with (the pass's key, the held-out data
            on the devices, the first batch's record, the settings above).
    """

    def __init__(
        self,
        programs: FitPrograms,
        data: PlacedData,
        mesh: Mesh,
        *,
        batch_size: int,
        num_samples: int,
        num_train_rows: int,
        rng_key: jax.Array,
        every: Every,
        limit_batches: BatchLimit = 1.0,
    ) -> None:
        self._programs = programs
        self._data = data
        padded = padded_batch_size(batch_size, mesh.size)
        self._source = ValidationSource(
            data.num_rows,
            batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            padded_size=padded,
            limit_batches=limit_batches,
        )
        self._to_global = records_to_global(mesh, padded)
        self._key = rng_key
        self.every = every
        first = self._to_global(first_record(self._source, data.host_arrays))
        self.inputs = ValidationInputs(rng_key, data.device_data, first, num_samples, num_train_rows, batch_size)

    def run(self, params: dict[str, jax.Array], num_batches: int | None = None) -> dict[str, float]:
        """``val_loss`` (when the model has no per-row latents) and ``val_lpd`` (when it has an
        observed site) of the constrained variational ``params``, over the pass's batches (the
        first ``num_batches`` of them, when given)."""
        outputs = []
        batches = make_chunk_loader(self._source, self._data.host_arrays)
        count = len(self._source) if num_batches is None else min(num_batches, len(self._source))
        for index, record in zip(range(count), batches, strict=False):  # the loader may read ahead
            key = jax.random.fold_in(self._key, index)
            outputs.append(self._programs.validate(params, key, self._data.device_data, self._to_global(record)))
        return validation_metrics(jax.device_get(outputs))


def sanity_check(validator: Validator, params: dict[str, jax.Array], num_batches: int) -> dict[str, float]:
    """Run ``num_batches`` validation batches (``-1``: all) before training, so that a validation
    that cannot run fails before the first step; non-finite results warn
    (:class:`~aimz_trainer.errors.FitWarning`). Returns the metrics (nobody logs them)."""
    metrics = validator.run(params, None if num_batches == -1 else num_batches)
    bad = sorted(name for name, value in metrics.items() if not np.isfinite(value))
    if bad:
        warnings.warn(
            f"the sanity check of validation gives non-finite {bad} with the starting parameters: "
            "validation will report them too. Check the validation data and the model's likelihood.",
            FitWarning,
            stacklevel=3,
        )
    return metrics


def validation_metrics(batches: list[Mapping[str, Any]]) -> dict[str, float]:
    """Combine per-batch sums into the pass's metrics, weighting by each batch's real rows."""
    columns = {key: np.asarray([batch[key] for batch in batches], np.float64) for key in batches[0]}
    weights = columns["weight_sum"]
    metrics = {}
    if "loss" in columns:
        metrics["val_loss"] = float(np.sum(columns["loss"] * weights) / np.sum(weights))
    if "lpd_sum" in columns:
        metrics["val_lpd"] = float(np.sum(columns["lpd_sum"]) / np.sum(weights))
    return metrics
