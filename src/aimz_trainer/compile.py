"""The compiled programs of one fit: lowered and compiled on the mesh, in the background where
that pays.

Compilation is most of a fit's start-up on a CPU, so each program compiles on a worker thread
from the moment it is lowered: ``init`` while the training chunk is lowered, the chunk while
the calling thread lowers validation (its compile queued behind them) and opens the data loader
(Grain's import and threads); XLA compiles outside the GIL. ``init``, the chunk and validation
are traced as one function, which sets the SVI up once, and split into one program each
(:mod:`aimz_trainer.split_trace`); split out, init leaves the literals it returns (the
hyperparameters an optimizer keeps in its state) out of its program, so that another learning
rate reads the same programs back. Tracing stays on the calling thread: it temporarily touches
the user's ``svi``. Posterior draws compile on first use: they are bigger, and a compile in the
background slows training on a small machine for as long as it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from numpyro.infer import SVI
from numpyro.infer.svi import SVIState

from aimz_trainer.checkpoint import tree_signature
from aimz_trainer.errors import ConfigurationError
from aimz_trainer.gc_pause import gc_paused
from aimz_trainer.plates import ModelLayout, RowPadding, model_guide_checked
from aimz_trainer.sharding import record_shardings, replicated, to_global_array
from aimz_trainer.split_trace import HandOver, split_trace
from aimz_trainer.step import (
    StepMetric,
    TrainState,
    first_batch,
    learning_rate,
    make_init,
    make_params,
    make_posterior_sampler,
    make_train_chunk,
    make_validation_step,
    traced_svi,
)

__all__ = ["ChunkOutputs", "FitPrograms", "ValidationInputs"]

Record = dict[str, Any]
Params = dict[str, jax.Array]


class ChunkOutputs(NamedTuple):
    """What one compiled chunk returns besides its state (all on the devices until fetched).

    Attributes:
        losses: the K per-step losses (NaN for padding steps).
        params: the constrained parameters of the chunk's final state (computed in the chunk:
            a separate call would queue behind the chunk in flight).
        step_metrics: name -> the K per-step values of each of the Trainer's step metrics.
        learning_rate: the optimizer's learning rate after the chunk, when an
            ``optax.inject_hyperparams`` state holds one, else ``None``.
    """

    losses: jax.Array
    params: Params
    step_metrics: dict[str, jax.Array]
    learning_rate: jax.Array | None


class ValidationInputs(NamedTuple):
    """What a fit's validation program is traced with.

    Attributes:
        rng_key: a key of the validation pass (any: only its shape is traced).
        device_data: the held-out arrays on the devices (empty with host placement).
        record: a validation batch's record (any: they share their shapes).
        num_samples: guide draws behind ``val_lpd``.
        num_train_rows: training rows (``val_loss`` is per training observation).
        batch_size: the real rows of each validation batch.
    """

    rng_key: jax.Array
    device_data: Mapping[str, jax.Array]
    record: Record
    num_samples: int
    num_train_rows: int
    batch_size: int


class FitPrograms:
    """Compiles and runs the compiled functions of one fit: init, the training chunk,
    validation and posterior draws.

    Args:
        svi: the user's SVI (set up and restored inside every trace).
        layout: the model's row plates and sites.
        mesh: the fit's mesh.
        device_data: the training arrays on the devices (empty with host placement).
        draw_record: the batch posterior draws set ``svi`` up with and compute deterministic
            sites on (fixed rows, the same whatever the shuffle or resume).
        step_metrics: per-step metrics the training chunk returns.
        batch_size: the real rows of each training batch; the records' batches may have more
            columns, padding for the devices (:mod:`aimz_trainer.data`).
    """

    def __init__(
        self,
        svi: SVI,
        layout: ModelLayout,
        mesh: Mesh,
        device_data: dict[str, jax.Array],
        draw_record: Record,
        step_metrics: Mapping[str, StepMetric],
        batch_size: int,
    ) -> None:
        self._svi = svi
        self._padding = RowPadding.of(layout, batch_size)
        self._layout = layout
        self._mesh = mesh
        self._rep = replicated(mesh)
        self.device_data = device_data
        self.draw_record = draw_record
        self._step_metrics = dict(step_metrics)
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="aimz-compile")  # init and the chunk at once
        self._init: Future[Any] | None = None
        self._init_args: tuple[jax.Array, SVIState | None] | None = None
        self._complete_init: Callable[[Any, Callable[[np.ndarray], Any]], Any] | None = None
        self._chunk: Future[Any] | None = None
        self._validate: Future[Any] | None = None
        self._samplers: dict[int, Any] = {}

    def lower(
        self,
        rng_key: jax.Array,
        record: Record,
        svi_state: SVIState | None = None,
        validation: ValidationInputs | None = None,
    ) -> None:
        """Trace init, the training chunk and (with ``validation``) validation with ``record``
        (any record of the fit: they share their shapes), as one function where the chunk
        needs nothing of init's trace but its state and validation nothing but init's
        parameters, each compiled on a worker thread from the moment it is lowered (validation
        after the other two, traced with the shapes of init's parameters). Then :meth:`start`.

        ``svi_state``: a previous fit's state to continue from (init then only sets ``svi``
        up)."""
        rep, plates = self._rep, self._layout.row_plates
        init = make_init(self._svi, plates, padding=self._padding)
        train_chunk = make_train_chunk(self._svi, plates, self._step_metrics, padding=self._padding)
        params = make_params(self._svi, plates)

        def init_with_params(
            rng_key: jax.Array, device_data: Any, record: Record, previous: SVIState | None
        ) -> tuple[TrainState, Params]:
            # One set-up of svi serves the init and the parameters (traced_svi nests).
            with traced_svi(self._svi, *first_batch(device_data, record, self._padding), plates, rng_key):
                state = init(rng_key, device_data, record)
                if previous is not None:
                    state = TrainState(previous, jnp.asarray(True))
                return state, params(state.svi_state, device_data, record)

        if svi_state is not None:
            expected = jax.eval_shape(init, rng_key, self.device_data, record).svi_state
            if tree_signature(expected) != tree_signature(svi_state):
                raise ConfigurationError(
                    "init_state does not fit this SVI: its structure (parameters, optimizer state) differs from "
                    "the state this model, guide and optimizer start from. Continue a fit with the SVI that made it."
                )

        def chunk_with_outputs(state: TrainState, device_data: Any, record: Record) -> tuple[TrainState, ChunkOutputs]:
            with traced_svi(self._svi, *first_batch(device_data, record), plates):  # one set-up for both parts
                state, losses, metrics = train_chunk(state, device_data, record)
                final = params(state.svi_state, device_data, record)
            return state, ChunkOutputs(losses, final, metrics, learning_rate(state.svi_state.optim_state))

        validate = self._validation_step(validation) if validation is not None else None

        def set_up_once(
            hand_over: HandOver, rng_key: jax.Array, device_data: Any, record: Record, previous: SVIState | None,
            *validation_args: Any,
        ) -> tuple[Any, ...]:  # fmt: skip
            # Every part inside one set-up: the others' nest in the init's.
            with traced_svi(self._svi, *first_batch(device_data, record, self._padding), plates, rng_key):
                state, params = init_with_params(rng_key, device_data, record, previous)
                chunk_outputs = chunk_with_outputs(hand_over(state), device_data, record)
                if not validation_args:
                    return (state, params), chunk_outputs
                return (state, params), chunk_outputs, validate(hand_over(params), *validation_args)

        shardings = (rep, rep, record_shardings(self._mesh, record))
        with model_guide_checked():  # the chunk's trace is the ELBO's first
            parts: dict[str, Callable[..., Any] | None] = {}
            if self._padding.rows == record["indices"].shape[1]:  # init's set-up batch is the chunk's
                args, reads = (rng_key, self.device_data, record, svi_state), [(0, 1, 2, 3), (1, 2)]
                names = ["init_with_params", "chunk_with_outputs"]
                # Validation joins where it would set svi up on a batch of the set-up's shapes
                # (no padding here): a set-up's structure (plates, per-row parameters) follows them.
                if validation is not None and jax.eval_shape(
                    first_batch, validation.device_data, validation.record
                ) == jax.eval_shape(first_batch, self.device_data, record):
                    args += (validation.rng_key, validation.device_data, validation.record)
                    reads.append((4, 5, 6))
                    names.append("validate")
                parts = dict(zip(names, split_trace(set_up_once, args, reads, names) or (), strict=False))
            init_part = parts.get("init_with_params")
            # Split out, init leaves its literal outputs (hyperparameters an optimizer keeps in
            # its state) to be put in after it runs: its program is then the same for any value.
            init_program, self._complete_init = (
                init_part.without_literal_outputs() if init_part is not None else (init_with_params, None)
            )
            lowered_init = jax.jit(init_program, in_shardings=(*shardings, rep), out_shardings=rep).lower(
                rng_key, self.device_data, record, svi_state
            )

            def literal_shape(value: np.ndarray) -> jax.ShapeDtypeStruct:
                return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=rep)

            init_shapes = self._init_outputs(lowered_init.out_info, literal_shape)
            # init runs once: unoptimized code compiles faster than it loses at run time.
            self._init = self._pool.submit(lowered_init.compile, {"xla_backend_optimization_level": 0})
            chunk = jax.jit(
                parts.get("chunk_with_outputs") or chunk_with_outputs, in_shardings=shardings, out_shardings=rep
            )
            lowered_chunk = chunk.lower(init_shapes[0], self.device_data, record)
        self._chunk = self._pool.submit(lowered_chunk.compile)
        self._init_args = (rng_key, svi_state)
        if validation is not None:
            self._lower_validation(parts.get("validate") or validate, init_shapes[1], validation)

    def _init_outputs(self, outputs: Any, make: Callable[[np.ndarray], Any]) -> Any:
        """Init's outputs (state, params) from what its program returned (with ``make(value)``
        for each literal it left out)."""
        return outputs if self._complete_init is None else self._complete_init(outputs, make)

    def start(
        self, record: Record
    ) -> tuple[TrainState, Params, Callable[[TrainState, Any, Record], tuple[TrainState, ChunkOutputs]]]:
        """Run init on ``record``, the fit's first, once compiled; return the initial state,
        its parameters and, once compiled, ``chunk(state, device_data, record) -> (state,
        ChunkOutputs)``."""
        assert self._init is not None and self._chunk is not None, "lower first"
        rng_key, svi_state = self._init_args
        outputs = self._init.result()(rng_key, self.device_data, record, svi_state)
        state, params = self._init_outputs(outputs, lambda value: to_global_array(value, self._rep, value.shape))
        return state, params, self._chunk.result()

    def prepare_validation(self, params: Params, validation: ValidationInputs) -> None:
        """Trace validation now, on its own, and compile it on the worker thread (``params``:
        the constrained parameters, or their shapes). A fit's :meth:`lower` does this itself."""
        self._lower_validation(self._validation_step(validation), params, validation)

    def _validation_step(self, validation: ValidationInputs) -> Callable[..., Any]:
        padding = RowPadding.of(self._layout, validation.batch_size)
        return make_validation_step(
            self._svi, validation.num_samples, validation.num_train_rows, self._layout, padding=padding
        )

    def _lower_validation(self, validate: Callable[..., Any], params: Params, validation: ValidationInputs) -> None:
        rep = self._rep
        lowered = jax.jit(
            validate,
            in_shardings=(rep, rep, rep, record_shardings(self._mesh, validation.record)),
            out_shardings=rep,
        ).lower(params, validation.rng_key, validation.device_data, validation.record)
        self._validate = self._pool.submit(lowered.compile)

    def validate(self, params: Params, rng_key: jax.Array, device_data: Any, record: Record) -> Any:
        """One validation batch's sums of the constrained ``params`` (see
        :func:`~aimz_trainer.step.make_validation_step`)."""
        assert self._validate is not None, "prepare_validation first"
        return self._validate.result()(params, rng_key, device_data, record)

    def sample(self, svi_state: SVIState, rng_key: jax.Array, num_samples: int) -> dict[str, jax.Array]:
        """``num_samples`` posterior draws at ``svi_state`` (compiled once per count)."""
        if num_samples not in self._samplers:
            rep = self._rep
            sampler = jax.jit(
                make_posterior_sampler(self._svi, num_samples, self._layout, padding=self._padding),
                in_shardings=(rep, rep, rep, record_shardings(self._mesh, self.draw_record)),
                out_shardings=rep,
            )
            with gc_paused():
                lowered = sampler.lower(svi_state, rng_key, self.device_data, self.draw_record)
            # Optimization level 1 compiles faster than the default and runs a function that
            # is called a few times as fast.
            self._samplers[num_samples] = lowered.compile({"xla_backend_optimization_level": 1})
        return self._samplers[num_samples](svi_state, rng_key, self.device_data, self.draw_record)

    def close(self) -> None:
        """Stop the worker thread (after the compiles it was given)."""
        self._pool.shutdown()
