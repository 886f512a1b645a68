"""The Trainer: validates, compiles, and runs the chunked SVI loop with callbacks.

Python orchestrates around one compiled function. Each call runs K SVI steps; the loop keeps
one call in flight and runs the previous call's hooks while the devices work on the next, so
the host never waits on a single step and the devices never wait for the hooks. A stop
requested by a hook drops the call in flight: the fit ends exactly where it was requested.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from jax.sharding import Mesh
from numpyro.infer import SVI
from numpyro.infer.svi import SVIState

from aimz_trainer._checks import as_key, check_model_accepts, is_int_at_least, require_bool, require_choice
from aimz_trainer._version import library_version
from aimz_trainer.callbacks.base import Callback, FitProgress, overrides_state
from aimz_trainer.callbacks.checkpoint import ModelCheckpoint
from aimz_trainer.callbacks.posterior import PosteriorSampler
from aimz_trainer.callbacks.progress import ProgressBar, progress_bar_wanted
from aimz_trainer.checkpoint import (
    CHECKPOINT_FORMAT,
    array_tree,
    checkpoint_steps,
    compare_array_trees,
    fingerprint_differences,
    fit_fingerprint,
    named_arrays,
    newest_checkpoint,
    read_meta,
    require_usable,
    resolve_checkpoint,
    restore_state,
    tree_signature,
    warn_checkpoint,
)
from aimz_trainer.data import (
    Chunk,
    ChunkSource,
    FitPlan,
    Placement,
    ValidationSource,
    device_data_budget,
    digest_rows,
    epoch_length,
    leading_batch,
    make_chunk_loader,
    require_finite_rows,
    resolve_placement,
    validate_batch_size,
    validate_data,
)
from aimz_trainer.distributed import allgather_json, require_agreement
from aimz_trainer.errors import CheckpointError, ConfigurationError, DataError, NonFiniteLossError
from aimz_trainer.plates import ModelLayout, check_trainable, model_guide_checked, model_layout
from aimz_trainer.sharding import DATA_AXIS, make_mesh, replicated, stacked_batch_sharding, to_global_array
from aimz_trainer.step import (
    TrainState,
    make_init,
    make_params,
    make_posterior_sampler,
    make_train_chunk,
    make_validation_step,
)

__all__ = ["FitResult", "Trainer", "TrainerState"]

Record = dict[str, Any]
Params = dict[str, jax.Array]


class FitResult(NamedTuple):
    """What :meth:`Trainer.fit` returns.

    Attributes:
        params: the optimized variational parameters, constrained (``svi.get_params``).
        losses: one ELBO loss per step, as a NumPy array.
        posterior: site name -> draws from the guide with a leading ``num_samples`` axis (the
            latest draws of a :class:`~aimz_trainer.callbacks.PosteriorSampler`), or ``None``.
            Per-row latent and deterministic sites are not among them (see the README's "Which
            models"); deterministic sites are computed on the data's first ``batch_size`` rows
            in row order, whatever the shuffle and wherever the fit was resumed.
        state: the final ``SVIState``.
    """

    params: Params
    losses: np.ndarray
    posterior: dict[str, jax.Array] | None
    state: SVIState


@dataclass
class TrainerState:
    """The trainer's live state: where the fit is and the newest SVI state.

    Attributes:
        step: SVI steps finished.
        epoch: current epoch, from 0.
        svi_state: the ``SVIState`` after ``step`` steps; after a non-finite loss, the last
            good one.
        rng_key: the key the fit's randomness derives from.
        params: the constrained variational parameters of ``svi_state``.
    """

    step: int
    epoch: int
    svi_state: SVIState | None
    rng_key: jax.Array
    params: dict[str, jax.Array] | None = None


class _Resume(NamedTuple):
    step_dir: Path
    meta: dict[str, Any]


class FitKeys(NamedTuple):
    """The independent streams a fit's ``rng_key`` is split into."""

    init: jax.Array
    shuffle: jax.Array
    sample: jax.Array
    validation: jax.Array

    @classmethod
    def split(cls, rng_key: jax.Array) -> FitKeys:
        return cls(*jax.random.split(rng_key, 4))


@dataclass
class _Placed:
    """Arrays of one dataset as the compiled functions consume them."""

    device_data: dict[str, jax.Array]  # empty when the host gathers the batches
    host_arrays: dict[str, np.ndarray] | None  # None when the devices hold the data
    num_rows: int


class _Compiled:
    """The compiled functions of one fit, and their prototype inputs.

    Compilation is most of a fit's start-up on a CPU, so ``init`` and validation compile on a
    worker thread while the training chunk compiles; XLA compiles outside the GIL. Tracing
    stays on the calling thread: it temporarily touches the user's ``svi``. Posterior draws
    compile on first use: they are bigger, and on a 2-core machine a compile in the
    background halves training throughput for as long as it runs.

    Init and every chunk also return the constrained parameters of their state: a separate
    call would queue behind the chunk in flight and stall the loop for a whole chunk, while
    in the chunk it costs next to nothing.
    """

    def __init__(
        self, svi: SVI, layout: ModelLayout, mesh: Mesh, device_data: dict[str, jax.Array], draw_record: Record
    ) -> None:
        self._svi = svi
        self._layout = layout
        self._rep = replicated(mesh)
        self.device_data = device_data
        # The batch posterior draws set ``svi`` up with and compute deterministic sites on.
        self.prototype = draw_record
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="aimz-compile")
        self._validate: Any = None
        self._samplers: dict[int, Any] = {}

    def start(self, rng_key: jax.Array, record: Record) -> tuple[TrainState, Params, Callable[..., Any]]:
        """Compile init and the training chunk; return the initial state, its parameters and
        ``chunk(state, device_data, record) -> (state, losses, params)``."""
        rep, plates = self._rep, self._layout.row_plates
        init, train_chunk = make_init(self._svi, plates), make_train_chunk(self._svi, plates)
        params = make_params(self._svi, plates)

        def init_with_params(rng_key: jax.Array, device_data: Any, record: Record) -> tuple[TrainState, Params]:
            state = init(rng_key, device_data, record)
            return state, params(state.svi_state, device_data, record)

        def chunk_with_params(state: TrainState, device_data: Any, record: Record) -> tuple[TrainState, Any, Params]:
            state, losses = train_chunk(state, device_data, record)
            return state, losses, params(state.svi_state, device_data, record)

        shardings = (rep, rep, _record_shardings(rep, record))
        with model_guide_checked():  # the chunk's trace is the ELBO's first
            lowered_init = jax.jit(init_with_params, in_shardings=shardings, out_shardings=rep).lower(
                rng_key, self.device_data, record
            )
            # init runs once: unoptimized code compiles faster than it loses at run time.
            compiled_init = self._pool.submit(lowered_init.compile, {"xla_backend_optimization_level": 0})
            chunk = jax.jit(chunk_with_params, in_shardings=shardings, out_shardings=rep)
            lowered_chunk = chunk.lower(lowered_init.out_info[0], self.device_data, record)
        compiled_chunk = lowered_chunk.compile()
        return *compiled_init.result()(rng_key, self.device_data, record), compiled_chunk

    def prepare_validation(
        self,
        state: TrainState,
        rng_key: jax.Array,
        data: _Placed,
        record: Record,
        num_samples: int,
        num_train_rows: int,
    ) -> None:
        """Trace validation now and compile it on the worker thread."""
        rep = self._rep
        validate = jax.jit(
            make_validation_step(self._svi, num_samples, num_train_rows, self._layout),
            in_shardings=(rep, rep, rep, _record_shardings(rep, record)),
            out_shardings=rep,
        )
        self._validate = self._pool.submit(validate.lower(state.svi_state, rng_key, data.device_data, record).compile)

    def validate(self, svi_state: SVIState, rng_key: jax.Array, device_data: Any, record: Record) -> Any:
        return self._validate.result()(svi_state, rng_key, device_data, record)

    def sample(self, svi_state: SVIState, rng_key: jax.Array, num_samples: int) -> dict[str, jax.Array]:
        if num_samples not in self._samplers:
            rep = self._rep
            sampler = jax.jit(
                make_posterior_sampler(self._svi, num_samples, self._layout),
                in_shardings=(rep, rep, rep, _record_shardings(rep, self.prototype)),
                out_shardings=rep,
            )
            lowered = sampler.lower(svi_state, rng_key, self.device_data, self.prototype)
            self._samplers[num_samples] = _compile_once(lowered)
        return self._samplers[num_samples](svi_state, rng_key, self.device_data, self.prototype)

    def close(self) -> None:
        """Stop the worker thread (after the compiles it was given)."""
        self._pool.shutdown()


def _compile_once(lowered: Any) -> Any:
    # Optimization level 1 compiles about 30% faster than the default and runs a function that
    # is called a few times as fast.
    return lowered.compile({"xla_backend_optimization_level": 1})


def _record_shardings(rep: Any, record: Mapping[str, Any]) -> dict[str, Any]:
    """Shardings of a record's fields: stacked batches are split by rows, counts replicated."""
    stacked = stacked_batch_sharding(rep.mesh)
    return {key: rep if key == "num_steps" else stacked for key in record}


class Trainer:
    """Fits a NumPyro SVI model by minibatches, on a device mesh, with callbacks.

    Args:
        max_epochs: stop after this many passes over the data.
        max_steps: stop after this many SVI steps (whichever limit comes first).
        rng_key: the key all randomness of a fit derives from (initialization, shuffling,
            SVI's own sampling, posterior draws, validation draws). Defaults to
            ``jax.random.key(0)``.
        callbacks: :class:`~aimz_trainer.callbacks.Callback` instances, run in list order
            (those that monitor metrics last).
        devices: devices for the default 1-D ``"data"`` mesh: ``None`` (all), a count, or a list.
        mesh: an explicit mesh with a ``"data"`` axis (instead of ``devices``).
        log_every_n_steps: how often loggers record the per-step loss; compiled chunks end at
            its multiples, where loggers also record steps/s and the learning rate.
        check_val_every_n_epoch: validate after every N-th epoch (when ``val_data`` is given);
            ``None``: not at epoch ends.
        val_check_interval: also validate every N steps (an int), or N times per epoch
            (a float in (0, 1]: every that fraction of an epoch).
        enable_progress_bar: show a progress bar (only when stdout is a terminal and ``CI`` is
            unset).
        steps_per_chunk: SVI steps per compiled call; default: about 50, fitted to the epoch
            length and the intervals above.
        nonfinite_loss: ``"raise"`` (default) raises :class:`NonFiniteLossError` at the first
            NaN/inf loss; ``"warn"`` stops the fit with a warning and returns what it has. Either
            way the state from before the bad step is kept.

    Example:
        >>> import jax, numpy as np, numpyro, numpyro.distributions as dist
        >>> from numpyro.infer import SVI, Trace_ELBO
        >>> from numpyro.infer.autoguide import AutoNormal
        >>> from optax import adam
        >>> def model(x, y=None):
        ...     w = numpyro.sample("w", dist.Normal())
        ...     with numpyro.plate("data", 800, subsample_size=len(x)):  # the training rows
        ...         numpyro.sample("y", dist.Normal(w * x, 1.0), obs=y)
        >>> x = np.linspace(-1, 1, 1000, dtype=np.float32); y = 2 * x
        >>> svi = SVI(model, AutoNormal(model), adam(0.05), Trace_ELBO())
        >>> trainer = Trainer(max_epochs=20, rng_key=jax.random.key(0), enable_progress_bar=False)
        >>> result = trainer.fit(svi, {"x": x[:800], "y": y[:800]}, batch_size=100,
        ...                      val_data={"x": x[800:], "y": y[800:]}, num_samples=10)
        >>> result.losses.shape, result.posterior["w"].shape
        ((160,), (10,))
        >>> sorted(trainer.callback_metrics)[:4]
        ['epoch_time', 'steps_per_sec', 'train_loss', 'train_loss_epoch']
    """

    def __init__(
        self,
        max_epochs: int | None = None,
        max_steps: int | None = None,
        *,
        rng_key: jax.Array | None = None,
        callbacks: Sequence[Callback] = (),
        devices: int | Sequence[jax.Device] | None = None,
        mesh: Mesh | None = None,
        log_every_n_steps: int = 50,
        check_val_every_n_epoch: int | None = 1,
        val_check_interval: int | float | None = None,
        enable_progress_bar: bool = True,
        steps_per_chunk: int | None = None,
        nonfinite_loss: Literal["raise", "warn"] = "raise",
    ) -> None:
        if max_epochs is None and max_steps is None:
            raise ConfigurationError("set max_epochs or max_steps (or both): the trainer needs to know when to stop.")
        if not is_int_at_least(log_every_n_steps, 1):
            raise ConfigurationError(f"log_every_n_steps must be a positive int; got {log_every_n_steps!r}.")
        for name, value in [
            ("max_epochs", max_epochs),
            ("max_steps", max_steps),
            ("check_val_every_n_epoch", check_val_every_n_epoch),
            ("steps_per_chunk", steps_per_chunk),
        ]:
            if value is not None and not is_int_at_least(value, 1):
                raise ConfigurationError(f"{name} must be a positive int or None; got {value!r}.")
        if val_check_interval is not None and not (
            is_int_at_least(val_check_interval, 1)
            or (isinstance(val_check_interval, float) and 0 < val_check_interval <= 1)
        ):
            raise ConfigurationError(
                "val_check_interval must be a positive int (steps), a float in (0, 1] (a fraction of "
                f"an epoch) or None; got {val_check_interval!r}."
            )
        require_choice("nonfinite_loss", nonfinite_loss, ("raise", "warn"))
        require_bool("enable_progress_bar", enable_progress_bar)
        if mesh is not None and devices is not None:
            raise ConfigurationError("pass either devices or mesh, not both.")
        if mesh is not None and (not isinstance(mesh, Mesh) or mesh.axis_names != (DATA_AXIS,)):
            raise ConfigurationError(f"mesh must be a jax.sharding.Mesh with the single axis {DATA_AXIS!r}.")
        if not isinstance(callbacks, Sequence):
            raise ConfigurationError(f"callbacks must be a list of Callback instances; got {callbacks!r}.")
        callbacks = list(callbacks)
        for callback in callbacks:
            if not isinstance(callback, Callback):
                raise ConfigurationError(
                    f"callbacks must be aimz_trainer.callbacks.Callback instances; got {type(callback).__name__}."
                )
        if enable_progress_bar and progress_bar_wanted() and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(ProgressBar())

        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.log_every_n_steps = log_every_n_steps
        self.check_val_every_n_epoch = check_val_every_n_epoch
        self.val_check_interval = val_check_interval
        self.steps_per_chunk = steps_per_chunk
        self.nonfinite_loss = nonfinite_loss
        self.callbacks = callbacks
        self.mesh = mesh if mesh is not None else make_mesh(devices)
        self.rng_key = jax.random.key(0) if rng_key is None else as_key(rng_key)
        self.state = TrainerState(step=0, epoch=0, svi_state=None, rng_key=self.rng_key)
        self.callback_metrics: dict[str, float] = {}
        self.should_stop = False
        self.stop_reason: str | None = None
        self.posterior: dict[str, jax.Array] | None = None
        self.svi: SVI | None = None
        self.plan: FitPlan | None = None
        self.placement: Literal["device", "host"] | None = None
        self.timings: dict[str, float] = {}
        self._compiled: _Compiled | None = None
        self._run: _Run | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Steps per epoch of the current (or last) fit; 0 before the first fit."""
        return self.plan.steps_per_epoch if self.plan is not None else 0

    @property
    def has_validation(self) -> bool:
        """Whether the current fit validates (it was given ``val_data``)."""
        return self._validation is not None

    @property
    def posterior_key(self) -> jax.Array:
        """The key of the fit's posterior draws (derived from ``rng_key``)."""
        return FitKeys.split(self.rng_key).sample

    def request_stop(self, reason: str | None = None) -> None:
        """Ask the fit to stop at the next chunk boundary (``on_fit_end`` still runs)."""
        self.should_stop = True
        self.stop_reason = reason

    def current_params(self) -> dict[str, jax.Array]:
        """The constrained variational parameters at ``trainer.state``, as computed by the
        compiled chunk that produced it (free to call from any hook, and after ``fit``)."""
        self._require_compiled("current_params")
        assert self.state.params is not None
        return self.state.params

    def sample_posterior(self, num_samples: int, rng_key: jax.Array | None = None) -> dict[str, jax.Array]:
        """``num_samples`` draws from the guide at ``trainer.state`` (compiled once per count).

        Args:
            num_samples: number of draws (a positive int).
            rng_key: defaults to the fit's posterior key (derived from the trainer's
                ``rng_key``), so the same fit gives the same draws.
        """
        if not is_int_at_least(num_samples, 1):
            raise ConfigurationError(f"num_samples must be a positive int; got {num_samples!r}.")
        compiled = self._require_compiled("sample_posterior")
        key = self.posterior_key if rng_key is None else as_key(rng_key)
        return compiled.sample(self.state.svi_state, key, num_samples)

    def fit(
        self,
        svi: SVI,
        train_data: Mapping[str, Any],
        *,
        batch_size: int,
        val_data: Mapping[str, Any] | None = None,
        val_batch_size: int | None = None,
        val_num_samples: int = 20,
        num_samples: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        data_placement: Placement = "auto",
        ckpt_path: str | os.PathLike[str] | int | None = None,
    ) -> FitResult:
        """Run minibatch SVI over ``train_data`` and draw ``num_samples`` posterior samples.

        Args:
            svi: a ``numpyro.infer.SVI`` (model, guide, optimizer, loss).
            train_data: keyword name -> array (NumPy or JAX), one row per observation; each
                batch is passed to the model as these keyword arguments.
            batch_size: rows per step (the global batch, split over the mesh's devices).
            val_data: held-out data with the same keys; validation reports ``val_loss`` (the
                negative ELBO per training observation, with the current guide) and, for
                models with an observed site, ``val_lpd`` (mean log predictive density). A
                model with per-row latent sites reports ``val_lpd`` only: held-out rows have
                no guide parameters, so their latents are drawn from the prior.
            val_batch_size: rows per validation batch (default: ``batch_size``).
            val_num_samples: guide draws behind ``val_lpd``.
            num_samples: posterior draws from the guide at the end (0: none); shorthand for a
                :class:`~aimz_trainer.callbacks.PosteriorSampler` callback.
            shuffle: a new seeded order of the rows every epoch.
            drop_last: drop the last partial batch instead of completing it (module
                :mod:`aimz_trainer.data` explains both).
            data_placement: ``"device"`` keeps the arrays on the devices and gathers batches
                there; ``"host"`` gathers them on the host and streams them; ``"auto"`` picks
                ``"device"`` when the data fit :func:`~aimz_trainer.data.device_data_budget`.
            ckpt_path: resume from a checkpoint: ``"last"`` (the newest usable one of the
                fit's :class:`~aimz_trainer.callbacks.ModelCheckpoint`; damaged newer ones are
                skipped with a :class:`~aimz_trainer.errors.CheckpointWarning`), a step
                (``int``) of it, or a path (a checkpoint, or a directory of them: its newest
                usable one); a damaged checkpoint asked for by step or path is refused. A resume
                with other data or optimizer settings warns, naming them. The fit continues
                where the checkpoint left off (same position in the epoch, same shuffle order,
                the checkpoint's random keys, callbacks restored) and returns the whole loss
                history. Nothing on disk changes when the checkpoint cannot be used.
        """
        started = time.perf_counter()
        if not isinstance(svi, SVI):
            raise ConfigurationError(f"svi must be a numpyro.infer.SVI; got {type(svi).__name__}.")
        require_bool("shuffle", shuffle)
        require_bool("drop_last", drop_last)
        arrays, num_rows = validate_data(train_data)
        require_finite_rows("train_data", arrays, _NONFINITE_ROWS)
        check_model_accepts(svi.model, list(arrays))
        batch_size = validate_batch_size(batch_size, num_rows, self.mesh.size)
        layout = model_layout(svi.model, arrays, batch_rows=batch_size, static_kwargs=svi.static_kwargs)
        check_trainable(layout, svi.guide, num_rows, batch_size)
        _check_processes_agree(arrays, num_rows, batch_size)
        if not is_int_at_least(num_samples, 0):
            raise ConfigurationError(f"num_samples must be an int >= 0; got {num_samples!r}.")
        val_arrays = _validate_val_data(val_data, arrays) if val_data is not None else None
        if val_arrays is not None:
            require_finite_rows("val_data", val_arrays, _NONFINITE_ROWS)
            val_batch_size = self._validate_val_batch_size(batch_size if val_batch_size is None else val_batch_size)
            if not is_int_at_least(val_num_samples, 1):
                raise ConfigurationError(f"val_num_samples must be a positive int; got {val_num_samples!r}.")
        callbacks = self._fit_callbacks(num_samples)
        resume = self._open_checkpoint(ckpt_path, callbacks) if ckpt_path is not None else None
        if resume is not None:
            self.rng_key = jax.random.wrap_key_data(
                np.asarray(resume.meta["rng_key"]["data"], np.uint32), impl=resume.meta["rng_key"]["impl"]
            )

        val_interval = None
        if val_arrays is not None:
            val_interval = self._val_interval_steps(epoch_length(num_rows, batch_size, drop_last=drop_last))
        # Chunks end where a callback or validation must see the fit, and where loggers log.
        boundaries = [self.log_every_n_steps, *(i for c in callbacks if (i := c.step_interval(self)) is not None)]
        boundaries += [val_interval] if val_interval is not None else []
        plan = FitPlan.create(
            num_rows,
            batch_size,
            drop_last=drop_last,
            max_epochs=self.max_epochs,
            max_steps=self.max_steps,
            steps_per_chunk=self.steps_per_chunk,
            boundaries=boundaries,
        )
        self.plan = plan
        self.svi = svi
        self._shuffle, self._drop_last = shuffle, drop_last
        # Recorded in checkpoints, compared on resume. The optimizer probe compiles a small
        # function (50-150 ms): only a fit that saves or resumes pays for it.
        checkpointing = resume is not None or any(c.saves_checkpoints for c in callbacks)
        self._fingerprint = fit_fingerprint(arrays, svi.optim) if checkpointing else {}
        self._keys = FitKeys.split(self.rng_key)
        self.placement = self._resolve_placement(data_placement, arrays, val_arrays)
        train = self._place(arrays, num_rows)
        source = ChunkSource(
            plan,
            seed=_numpy_seed(self._keys.shuffle),
            shuffle=shuffle,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        records = iter(make_chunk_loader(source, train.host_arrays))
        start_index = 0
        if resume is not None:
            start_index = self._resume_position(plan, resume)
            # Each process continues from its own loader state (a checkpoint of another number
            # of processes has one state for all: they iterate the same chunks).
            states = resume.meta.get("process_loader_states") or []
            own = jax.process_index()
            records.set_state(states[own] if own < len(states) else resume.meta["loader_state"])
        to_device = _records_to_device(self.mesh, batch_size)

        self.callback_metrics = {}
        self.should_stop = False
        self.stop_reason = None
        self.posterior = None
        self.state = TrainerState(step=0, epoch=0, svi_state=None, rng_key=self.rng_key)
        first_record = to_device(next(records))
        first_loader_state = records.get_state()
        # Fixed rows, not the run's first batch: a resumed fit starts from another batch, and
        # draws of a deterministic site computed on it would differ from an uninterrupted fit's.
        draw_record = leading_batch(
            num_rows,
            batch_size,
            train.host_arrays,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        compiled = self._compiled = _Compiled(svi, layout, self.mesh, train.device_data, to_device(draw_record))
        try:
            train_state, self.state.params, chunk_fn = compiled.start(self._keys.init, first_record)
        except BaseException:  # e.g. a guide that does not fit the model
            compiled.close()
            raise
        self._validation = None
        if val_arrays is not None:
            self._validation = _Validation(self, val_arrays, val_batch_size, val_num_samples, num_rows, train_state)
        self.state.svi_state = train_state.svi_state
        losses: list[np.ndarray] = []
        self._active_callbacks = callbacks
        if resume is not None:
            try:
                train_state = self._restore(resume, train_state, losses, callbacks)
            except BaseException:
                compiled.close()
                raise
        self.timings = {"setup_s": time.perf_counter() - started}

        self._run = _Run(
            self,
            plan,
            chunk_fn,
            train.device_data,
            (first_record, first_loader_state),
            records,
            to_device,
            losses,
            started,
            val_interval,
            start_index,
        )
        try:
            self._call("on_fit_start")
            if resume is not None:
                self._call("on_load_checkpoint", resume.meta)
            train_state = self._run.loop(train_state)
            compiled.close()
            self._call("on_fit_end")
            params = self.current_params()
            self.timings["fit_s"] = time.perf_counter() - started
        except BaseException as exception:
            self._call_on_exception(exception)
            raise
        finally:
            compiled.close()
            for callback in callbacks:
                callback.teardown(self)
        return FitResult(
            params=params,
            losses=np.concatenate(losses) if losses else np.zeros(0, np.float32),
            posterior=self.posterior,
            state=train_state.svi_state,
        )

    # -- set-up --------------------------------------------------------------------------------

    def _fit_callbacks(self, num_samples: int) -> list[Callback]:
        """The fit's callbacks in calling order (monitors last), checked for state collisions."""
        callbacks = list(self.callbacks)
        if num_samples:
            callbacks.append(PosteriorSampler(num_samples))
        keys: dict[str, Callback] = {}
        for callback in callbacks:
            if not overrides_state(callback):
                continue
            other = keys.setdefault(callback.state_key, callback)
            if other is not callback:
                raise ConfigurationError(
                    f"two callbacks, {type(other).__name__} and {type(callback).__name__}, save their state "
                    f"under the same key {callback.state_key!r}, so a checkpoint could not tell them apart. "
                    "Give one a different state_key (or remove the duplicate)."
                )
        interval_errors = [
            type(c).__name__
            for c in callbacks
            if (i := c.step_interval(self)) is not None and not is_int_at_least(i, 1)
        ]
        if interval_errors:
            raise ConfigurationError(f"step_interval() must return a positive int or None; check {interval_errors}.")
        # Stable: list order within each rank (others, monitors, checkpoint writers).
        return sorted(callbacks, key=lambda c: 2 if c.saves_checkpoints else int(c.monitors_metrics))

    def _open_checkpoint(self, ckpt_path: Any, callbacks: list[Callback]) -> _Resume:
        """Find and read the checkpoint to resume from (nothing is written). ``"last"`` and a
        directory skip damaged newer checkpoints with a warning; a step or a step directory is
        that checkpoint or an error."""
        last = isinstance(ckpt_path, str) and ckpt_path == "last"  # an array would compare elementwise
        if last or (isinstance(ckpt_path, int) and not isinstance(ckpt_path, bool)):
            stores = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
            if not stores:
                raise CheckpointError(
                    f"ckpt_path={ckpt_path!r} refers to the fit's ModelCheckpoint, but it has none: add "
                    "ModelCheckpoint(dirpath) to the callbacks or pass the checkpoint's path."
                )
            if last:
                newest = newest_checkpoint(stores[0].dirpath)
                if newest is None:
                    raise CheckpointError(f"ckpt_path='last' but {str(stores[0].dirpath)!r} holds no checkpoint yet.")
                step_dir = newest
            elif not (stores[0].dirpath / str(ckpt_path)).is_dir():
                raise CheckpointError(
                    f"ckpt_path={ckpt_path}: no checkpoint of that step; the steps saved are "
                    f"{checkpoint_steps(stores[0].dirpath)}."
                )
            else:
                step_dir = require_usable(stores[0].dirpath / str(ckpt_path))
        elif isinstance(ckpt_path, str | os.PathLike):
            step_dir = resolve_checkpoint(ckpt_path)
        else:
            raise ConfigurationError(f"ckpt_path must be 'last', a step (int) or a path; got {ckpt_path!r}.")
        return _Resume(step_dir, read_meta(step_dir))

    def _resume_position(self, plan: FitPlan, resume: _Resume) -> int:
        """The chunk the resumed fit starts with, after checking the checkpoint's fit matches."""
        saved, current = resume.meta["fit"], self._fit_meta(plan)
        differing = [
            f"{name}: {saved.get(name)!r} in the checkpoint, {current[name]!r} now"
            for name in ("num_rows", "batch_size", "steps_per_epoch", "shuffle", "drop_last")
            if saved.get(name) != current[name]
        ]
        if differing:
            raise CheckpointError(
                f"the checkpoint {str(resume.step_dir)!r} comes from a fit over other data or batches; "
                + "; ".join(differing)
            )
        step = int(resume.meta["step"])
        if step >= plan.total_steps:
            raise CheckpointError(
                f"the checkpoint {str(resume.step_dir)!r} is at step {step}, and this fit ends at step "
                f"{plan.total_steps}: raise max_epochs or max_steps to train further."
            )
        index = next((i for i, chunk in enumerate(plan.chunks) if chunk.first_step == step), None)
        if index is None or resume.meta["loader_state"].get("next_index") != index:
            raise CheckpointError(
                f"the checkpoint {str(resume.step_dir)!r} is at step {step}, which is not where a chunk of this "
                "fit starts: resume with the settings that wrote it (log_every_n_steps, steps_per_chunk, "
                "val_check_interval, the callbacks' step intervals)."
            )
        return index

    def _restore(
        self, resume: _Resume, state: TrainState, losses: list[np.ndarray], callbacks: list[Callback]
    ) -> TrainState:
        """Load the checkpoint's arrays onto this fit's mesh and its callbacks' states."""
        assert self.state.params is not None
        meta = resume.meta
        differences = compare_array_trees(meta["params_tree"], array_tree(self.state.params))
        if differences:
            raise CheckpointError(
                f"the checkpoint {str(resume.step_dir)!r} was written for a different model; its parameters "
                "differ: " + "; ".join(differences)
            )
        if meta.get("svi_state_tree") != tree_signature(state.svi_state):
            raise CheckpointError(
                f"the checkpoint {str(resume.step_dir)!r} holds another optimizer or SVI state structure than "
                "this fit (same model, another optimizer?); resume with the SVI that wrote it."
            )
        like = {
            "svi_state": state.svi_state,
            "params": self.state.params,
            "losses": jax.ShapeDtypeStruct((int(meta["step"]),), np.float32),
        }
        restored = restore_state(resume.step_dir, like)
        changed = fingerprint_differences(meta["fit"], self._fingerprint)
        if changed:
            warn_checkpoint(
                f"resuming from the checkpoint {str(resume.step_dir)!r} with " + " and ".join(changed) + ": the fit "
                "continues, but not as the run that wrote the checkpoint."
            )
        svi_state = restored["svi_state"]
        self.state = TrainerState(
            step=int(meta["step"]),
            epoch=int(meta["epoch"]),
            svi_state=svi_state,
            rng_key=self.rng_key,
            params=restored["params"],
        )
        losses.append(np.asarray(restored["losses"]))
        saved = dict(meta["callbacks"])
        for callback in callbacks:
            if overrides_state(callback) and callback.state_key in saved:
                callback.load_state_dict(saved.pop(callback.state_key))
        if saved:
            warnings.warn(
                f"the checkpoint holds state for callbacks this fit does not have: {sorted(saved)}",
                RuntimeWarning,
                stacklevel=4,
            )
        return TrainState(svi_state, jnp.asarray(True))

    def checkpoint(self) -> dict[str, Any]:
        """The fit as it stands, as a checkpoint: ``{"state": arrays, "meta": JSON}``.

        Checkpointing callbacks call this from a hook and hand it to
        :func:`aimz_trainer.checkpoint.save_args`; each callback's ``on_save_checkpoint`` may
        add to ``checkpoint["meta"]`` first.
        """
        run = self._run
        if run is None or self.state.svi_state is None or self.plan is None:
            raise ConfigurationError("checkpoint() is for hooks of a running fit.")
        svi_state = self.state.svi_state
        meta = {
            "format": CHECKPOINT_FORMAT,
            "step": self.state.step,
            "epoch": self.state.epoch,
            "rng_key": {
                "data": np.asarray(jax.random.key_data(self.rng_key)).tolist(),
                "impl": str(jax.random.key_impl(self.rng_key)),
            },
            "loader_state": run.loader_state,
            "process_loader_states": allgather_json(run.loader_state),
            "callbacks": {c.state_key: c.state_dict() for c in self._active_callbacks if overrides_state(c)},
            "params_tree": array_tree(self.state.params),
            "svi_state_tree": tree_signature(svi_state),
            "fit": self._fit_meta(self.plan),
            "trainer": {
                "max_epochs": self.max_epochs,
                "max_steps": self.max_steps,
                "log_every_n_steps": self.log_every_n_steps,
                "check_val_every_n_epoch": self.check_val_every_n_epoch,
                "val_check_interval": self.val_check_interval,
                "steps_per_chunk": self.steps_per_chunk,
                "nonfinite_loss": self.nonfinite_loss,
            },
            "mesh_shape": dict(self.mesh.shape),
            "versions": {"aimz_trainer": library_version(), "jax": jax.__version__, "numpyro": numpyro.__version__},
        }
        losses = np.concatenate(run.losses) if run.losses else np.zeros(0, np.float32)
        state = named_arrays({"svi_state": svi_state, "params": self.state.params, "losses": losses})
        checkpoint = {"state": state, "meta": meta}
        self._call("on_save_checkpoint", checkpoint)
        return checkpoint

    def _fit_meta(self, plan: FitPlan) -> dict[str, Any]:
        """The fit's shape and fingerprint (training data digest, optimizer probe), as a
        checkpoint records them and a resume compares them."""
        return {
            "num_rows": plan.num_rows,
            "batch_size": plan.batch_size,
            "steps_per_epoch": plan.steps_per_epoch,
            "steps_per_chunk": plan.steps_per_chunk,
            "total_steps": plan.total_steps,
            "shuffle": self._shuffle,
            "drop_last": self._drop_last,
            **self._fingerprint,
        }

    def _val_interval_steps(self, steps_per_epoch: int) -> int | None:
        if self.val_check_interval is None:
            return None
        if isinstance(self.val_check_interval, float):
            return max(1, int(self.val_check_interval * steps_per_epoch))
        return int(self.val_check_interval)

    def _validate_val_batch_size(self, size: Any) -> int:
        if not is_int_at_least(size, 1) or size % self.mesh.size:
            raise ConfigurationError(
                f"val_batch_size must be a positive int divisible by the {self.mesh.size} device(s); got {size!r}."
            )
        return int(size)

    def _resolve_placement(
        self, placement: Placement, arrays: Mapping[str, Any], val_arrays: Mapping[str, Any] | None
    ) -> Literal["device", "host"]:
        data_bytes = sum(_nbytes(a) for a in arrays.values())
        data_bytes += sum(_nbytes(a) for a in (val_arrays or {}).values())
        budget = device_data_budget(self.mesh.local_devices[0], self.mesh.local_mesh.size)
        return resolve_placement(placement, data_bytes, budget)

    def _place(self, arrays: Mapping[str, Any], num_rows: int) -> _Placed:
        if self.placement == "device":
            return _Placed(_place_on_mesh(arrays, self.mesh), None, num_rows)
        return _Placed({}, {k: np.asarray(a) for k, a in arrays.items()}, num_rows)

    def _require_compiled(self, what: str) -> _Compiled:
        if self._compiled is None or self.state.svi_state is None:
            raise ConfigurationError(f"{what}() needs a fit: call trainer.fit(...) first (or call it from a hook).")
        return self._compiled

    # -- hooks ---------------------------------------------------------------------------------

    def _progress(self) -> FitProgress:
        return FitProgress(step=self.state.step, epoch=self.state.epoch, metrics=dict(self.callback_metrics))

    def _call(self, hook: str, *args: Any) -> None:
        progress = self._progress()
        for callback in self._active_callbacks:
            getattr(callback, hook)(self, progress, *args)

    def _call_on_exception(self, exception: BaseException) -> None:
        """Every callback hears of the exception, even when another one's handler fails."""
        progress = self._progress()
        for callback in getattr(self, "_active_callbacks", ()):
            try:
                callback.on_exception(self, progress, exception)
            except Exception as handler_error:
                warnings.warn(
                    f"{type(callback).__name__}.on_exception raised {handler_error!r} while handling {exception!r}",
                    RuntimeWarning,
                    stacklevel=3,
                )

    _validation: _Validation | None = None
    _keys: FitKeys


class _Validation:
    """A fit's validation pass: held-out ELBO and log predictive density, batch by batch."""

    def __init__(
        self,
        trainer: Trainer,
        arrays: dict[str, Any],
        batch_size: int,
        num_samples: int,
        num_train_rows: int,
        state: TrainState,
    ) -> None:
        self._trainer = trainer
        num_rows = len(next(iter(arrays.values())))
        self._data = trainer._place(arrays, num_rows)
        self._source = ValidationSource(
            num_rows, batch_size, process_index=jax.process_index(), process_count=jax.process_count()
        )
        self._to_device = _records_to_device(trainer.mesh, batch_size)
        self._key = trainer._keys.validation
        first = self._to_device(next(iter(make_chunk_loader(self._source, self._data.host_arrays))))
        assert trainer._compiled is not None
        trainer._compiled.prepare_validation(state, self._key, self._data, first, num_samples, num_train_rows)

    def is_due(self, chunk: Chunk, epoch_end: bool, interval: int | None) -> bool:
        end = chunk.first_step + chunk.num_steps
        every = self._trainer.check_val_every_n_epoch
        return bool(interval and end % interval == 0) or (
            epoch_end and every is not None and (chunk.epoch + 1) % every == 0
        )

    def run(self, svi_state: SVIState) -> dict[str, float]:
        """Validate ``svi_state``; the same keys every time, so passes compare like for like."""
        compiled = self._trainer._compiled
        assert compiled is not None
        outputs = []
        for index, record in enumerate(make_chunk_loader(self._source, self._data.host_arrays)):
            key = jax.random.fold_in(self._key, index)
            outputs.append(compiled.validate(svi_state, key, self._data.device_data, self._to_device(record)))
        columns = {key: np.asarray([o[key] for o in jax.device_get(outputs)], np.float64) for key in outputs[0]}
        weights = columns["weight_sum"]
        metrics = {}
        if "loss" in columns:
            metrics["val_loss"] = float(np.sum(columns["loss"] * weights) / np.sum(weights))
        if "lpd_sum" in columns:
            metrics["val_lpd"] = float(np.sum(columns["lpd_sum"]) / np.sum(weights))
        return metrics


class _Run:
    """One pass of the training loop: dispatch, pipelining, per-chunk bookkeeping, hooks."""

    def __init__(
        self,
        trainer: Trainer,
        plan: FitPlan,
        chunk_fn: Callable[..., Any],
        device_data: dict[str, jax.Array],
        first: tuple[Record, dict[str, Any]],
        records: Any,
        to_device: Callable[[Record], Record],
        losses: list[np.ndarray],
        started: float,
        val_interval: int | None,
        start_index: int,
    ) -> None:
        self.trainer = trainer
        self.plan = plan
        self.chunk_fn = chunk_fn
        self.device_data = device_data
        self.first = first  # the start chunk's record and the loader's state after it
        self.start_index = start_index
        self.loader_state: dict[str, Any] = {}  # the loader's state after the last finished chunk
        self.records = records
        self.to_device = to_device
        self.losses = losses
        self.started = started
        self.val_interval = val_interval
        self.rate_since = (0, started)  # (step, time) the steps/s average counts from
        self.epoch_started = started  # the first epoch's time includes compilation
        self.epoch_losses: list[np.ndarray] = []

    def loop(self, state: TrainState) -> TrainState:
        """Dispatch chunk c, then run chunk c-1's hooks while c runs.

        Chunk c is speculative: when c-1's hooks stop the fit (or its loss was not finite), c's
        results are dropped and the fit ends on c-1's state, which the compiled chunk leaves
        intact (it does not donate its input). A stop thus takes effect exactly at the
        boundary where it was requested, and the devices never wait for the hooks.
        """
        trainer = self.trainer
        pending: tuple[Chunk, jax.Array, TrainState, Params, dict[str, Any]] | None = None
        for index in range(self.start_index, self.plan.num_chunks):
            chunk = self.plan.chunks[index]
            if index == self.start_index:
                record, loader_state = self.first
            else:
                record = self.to_device(next(self.records))
                loader_state = self.records.get_state()
            new_state, chunk_losses, params = self.chunk_fn(state, self.device_data, record)
            if pending is not None and (not self.finish(*pending) or trainer.should_stop):
                return state
            # After the previous epoch's end hooks (a resumed fit starts its epoch too).
            if chunk.first_step % self.plan.steps_per_epoch == 0 or index == self.start_index:
                self.start_epoch(chunk)
                if trainer.should_stop:
                    return state
            state = new_state
            pending = (chunk, chunk_losses, state, params, loader_state)
        if pending is not None:
            self.finish(*pending)
        return state

    def start_epoch(self, chunk: Chunk) -> None:
        self.trainer.state.epoch = chunk.epoch
        done = np.concatenate(self.losses) if self.losses else np.zeros(0, np.float32)
        self.epoch_losses = [done[chunk.epoch * self.plan.steps_per_epoch :]]  # the part before a resume
        self.trainer._call("on_train_epoch_start")

    def finish(
        self, chunk: Chunk, chunk_losses: jax.Array, state: TrainState, params: Params, loader_state: dict[str, Any]
    ) -> bool:
        """Bring a chunk's losses to the host and run its hooks; ``False`` after a non-finite
        loss (in ``"warn"`` mode; ``"raise"`` raises)."""
        trainer = self.trainer
        host_losses = np.asarray(chunk_losses)[: chunk.num_steps]
        now = time.perf_counter()
        if "first_chunk_s" not in trainer.timings:  # compilation and start-up: not a rate
            trainer.timings["first_chunk_s"] = now - self.started
            self.rate_since = (chunk.first_step + chunk.num_steps, now)
        else:
            # Averaged since the last epoch's last results: with a chunk in flight, the time
            # between two chunks' results alone says little.
            steps = chunk.first_step + chunk.num_steps - self.rate_since[0]
            trainer.callback_metrics["steps_per_sec"] = steps / (now - self.rate_since[1])
        bad = np.flatnonzero(~np.isfinite(host_losses))
        if bad.size:
            self.losses.append(host_losses[: bad[0]])
            trainer.state.step = chunk.first_step + int(bad[0])
            trainer.state.svi_state = state.svi_state  # frozen before the bad step
            trainer.state.params = params
            error = NonFiniteLossError(trainer.state.step, float(host_losses[bad[0]]))
            if trainer.nonfinite_loss == "raise":
                raise error
            warnings.warn(str(error), RuntimeWarning, stacklevel=5)
            return False
        self.losses.append(host_losses)
        self.epoch_losses.append(host_losses)
        trainer.state.step = chunk.first_step + chunk.num_steps
        trainer.state.svi_state = state.svi_state
        trainer.state.params = params
        self.loader_state = loader_state
        trainer.callback_metrics["train_loss"] = float(host_losses.mean())
        trainer._call("on_train_chunk_end", host_losses, chunk.steps)
        epoch_end = self.plan.is_epoch_end(chunk)
        if epoch_end:  # epochs are timed from one's last results to the next's
            trainer.callback_metrics["train_loss_epoch"] = float(np.concatenate(self.epoch_losses).mean())
            trainer.callback_metrics["epoch_time"] = now - self.epoch_started
            self.epoch_started = now
            self.rate_since = (chunk.first_step + chunk.num_steps, now)
        validation = trainer._validation
        if validation is not None and validation.is_due(chunk, epoch_end, self.val_interval):
            trainer.callback_metrics.update(validation.run(state.svi_state))
            trainer._call("on_validation_end")
        if epoch_end:
            trainer._call("on_train_epoch_end")
        return True


_NONFINITE_ROWS = (
    "the ELBO of every batch holding that row would be NaN. Fill or drop those rows; for a missing "
    "observation, fill it and mask the site (numpyro's obs_mask)."
)


def _validate_val_data(val_data: Any, train_arrays: Mapping[str, Any]) -> dict[str, Any]:
    arrays, _ = validate_data(val_data, name="val_data")
    if set(arrays) != set(train_arrays):
        raise DataError(
            f"val_data must have the same keys as train_data: got {sorted(arrays)}, expected {sorted(train_arrays)}."
        )
    for key, array in arrays.items():
        if array.shape[1:] != train_arrays[key].shape[1:]:
            raise DataError(
                f"val_data[{key!r}] rows have shape {array.shape[1:]} but train_data[{key!r}] rows have "
                f"shape {train_arrays[key].shape[1:]}."
            )
    return arrays


def _check_processes_agree(arrays: Mapping[str, Any], num_rows: int, batch_size: int) -> None:
    """Every process of a multi-process run must fit the same data with the same batch size
    (each feeds its share of every global batch): compare them before anything is compiled."""
    if jax.process_count() == 1:
        return
    digest = hashlib.sha256()
    digest_rows(digest, arrays)
    require_agreement(
        {"rows": num_rows, "batch_size": batch_size, "data": digest.hexdigest()[:12]},
        "training data or batch sizes",
        "Give every process the same arrays and batch_size (each feeds its share of every batch).",
    )


def _nbytes(array: Any) -> int:
    return int(np.prod(array.shape)) * jax.dtypes.canonicalize_dtype(array.dtype).itemsize


def _numpy_seed(key: jax.Array) -> list[int]:
    return [int(word) for word in np.asarray(jax.random.key_data(key)).ravel()]


def _place_on_mesh(arrays: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Replicate the arrays on every device of the mesh."""
    sharding = replicated(mesh)
    placed = {}
    for key, array in arrays.items():
        dtype = jax.dtypes.canonicalize_dtype(array.dtype)
        if isinstance(array, jax.Array):
            placed[key] = jax.device_put(array.astype(dtype), sharding)
        else:
            placed[key] = to_global_array(np.asarray(array, dtype=dtype), sharding, array.shape)
    return placed


def _records_to_device(mesh: Mesh, batch_size: int) -> Callable[[Record], Record]:
    """Turn a Grain record (this process's columns of each batch) into global arrays."""
    stacked, rep = stacked_batch_sharding(mesh), replicated(mesh)

    def put(local: Any) -> jax.Array:
        local = np.asarray(local)
        if local.ndim == 0:
            return to_global_array(local, rep, ())
        return to_global_array(local, stacked, (local.shape[0], batch_size, *local.shape[2:]))

    return lambda record: jax.tree.map(put, record)
