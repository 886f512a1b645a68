"""The Trainer: validates, compiles, and runs the chunked SVI loop with callbacks.

Python orchestrates around one compiled function. Each call runs K SVI steps; the loop keeps
one call in flight and reads the previous call's K losses while the devices work on the next,
so the host never waits on a single step.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh
from numpyro.infer import SVI
from numpyro.infer.svi import SVIState

from aimz_trainer.callbacks.base import Callback, FitProgress
from aimz_trainer.callbacks.progress import ProgressBar, progress_bar_wanted
from aimz_trainer.data import (
    ChunkSource,
    FitPlan,
    Placement,
    device_data_budget,
    make_chunk_loader,
    resolve_placement,
    validate_batch_size,
    validate_data,
)
from aimz_trainer.errors import ConfigurationError, NonFiniteLossError
from aimz_trainer.sharding import DATA_AXIS, make_mesh, replicated, stacked_batch_sharding, to_global_array
from aimz_trainer.step import (
    TrainState,
    check_model_accepts,
    make_finish,
    make_init,
    make_train_chunk,
)

__all__ = ["FitResult", "Trainer", "TrainerState"]


class FitResult(NamedTuple):
    """What :meth:`Trainer.fit` returns.

    Attributes:
        params: the optimized variational parameters, constrained (``svi.get_params``).
        losses: one ELBO loss per step, as a NumPy array.
        posterior: site name -> draws from the guide with a leading ``num_samples`` axis, or
            ``None`` when ``num_samples=0``.
        state: the final ``SVIState``.
    """

    params: dict[str, jax.Array]
    losses: np.ndarray
    posterior: dict[str, jax.Array] | None
    state: SVIState


@dataclass
class TrainerState:
    """The trainer's live state: where the fit is and the newest SVI state.

    Attributes:
        step: SVI steps finished.
        epoch: current epoch, from 0.
        svi_state: the newest ``SVIState``; after a non-finite loss, the last good one.
        rng_key: the key the fit's randomness derives from.
    """

    step: int
    epoch: int
    svi_state: SVIState | None
    rng_key: jax.Array


class _Compiled:
    """The compiled functions of one fit.

    Compilation is most of a fit's start-up on a CPU, so it is overlapped: ``init`` compiles
    on a worker thread while the chunk is traced and compiled, and once training runs, other
    chunk lengths compile in the background. XLA compiles outside the GIL. Tracing stays on
    the calling thread: it temporarily touches the user's ``svi``.
    """

    def __init__(self, svi: SVI, mesh: Mesh) -> None:
        rep, stacked = replicated(mesh), stacked_batch_sharding(mesh)
        shardings = (rep, rep, stacked)
        self._init = jax.jit(make_init(svi), in_shardings=shardings, out_shardings=rep)
        self._chunk = jax.jit(make_train_chunk(svi), in_shardings=shardings, out_shardings=(rep, rep), donate_argnums=0)
        self._svi = svi
        self._shardings = (rep, stacked)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="aimz-compile")
        self._chunks: dict[int, Future[Any]] = {}

    def start(self, rng_key: jax.Array, device_data: Any, chunk_input: Any) -> TrainState:
        """Compile init and the first chunk's length; return the initial state."""
        lowered_init = self._init.lower(rng_key, device_data, chunk_input)
        # init runs once: unoptimized code compiles faster than it loses at run time.
        init = self._pool.submit(lowered_init.compile, {"xla_backend_optimization_level": 0})
        self._chunks[_chunk_length(chunk_input)] = _done(
            self._chunk.lower(lowered_init.out_info, device_data, chunk_input).compile()
        )
        return init.result()(rng_key, device_data, chunk_input)

    def prepare(self, state: TrainState, device_data: Any, chunk_input: Any, lengths: set[int]) -> None:
        """Trace the fit's other chunk lengths (an epoch's remainder, a ``max_steps`` cut) and
        compile them in the background; they are needed within the first epoch."""
        for length in lengths - set(self._chunks):
            shaped = jax.tree.map(functools.partial(_with_length, length=length), chunk_input)
            self._chunks[length] = self._pool.submit(self._chunk.lower(state, device_data, shaped).compile)

    def run_chunk(self, state: TrainState, device_data: Any, chunk_input: Any) -> tuple[TrainState, jax.Array]:
        return self._chunks[_chunk_length(chunk_input)].result()(state, device_data, chunk_input)

    def finish(
        self, state: TrainState, rng_key: jax.Array, device_data: Any, chunk_input: Any, num_samples: int
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array] | None]:
        """``(params, posterior)`` from the final state.

        Compiled here rather than in the background during training: on a 2-core machine a
        background compile halves training throughput for as long as it runs. Optimization
        level 1 compiles about 30% faster than the default and runs this once-only function
        as fast.
        """
        self.close()
        rep, stacked = self._shardings
        finish = jax.jit(make_finish(self._svi, num_samples), in_shardings=(rep, rep, rep, stacked), out_shardings=rep)
        lowered = finish.lower(state, rng_key, device_data, chunk_input)
        return lowered.compile({"xla_backend_optimization_level": 1})(state, rng_key, device_data, chunk_input)

    def close(self) -> None:
        """Stop the compile thread (waiting for a compile in progress)."""
        self._pool.shutdown(cancel_futures=True)


def _done(value: Any) -> Future[Any]:
    future: Future[Any] = Future()
    future.set_result(value)
    return future


def _with_length(leaf: jax.Array, length: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((length, *leaf.shape[1:]), leaf.dtype, sharding=leaf.sharding)


def _chunk_length(chunk_input: Any) -> int:
    return jax.tree.leaves(chunk_input)[0].shape[0]


class Trainer:
    """Fits a NumPyro SVI model by minibatches, on a device mesh, with callbacks.

    Args:
        max_epochs: stop after this many passes over the data.
        max_steps: stop after this many SVI steps (whichever limit comes first).
        rng_key: the key all randomness of a fit derives from (initialization, shuffling,
            SVI's own sampling, posterior draws). Defaults to ``jax.random.key(0)``.
        callbacks: :class:`~aimz_trainer.callbacks.Callback` instances, run in list order.
        devices: devices for the default 1-D ``"data"`` mesh: ``None`` (all), a count, or a list.
        mesh: an explicit mesh with a ``"data"`` axis (instead of ``devices``).
        log_every_n_steps: how often loggers record the per-step loss.
        enable_progress_bar: show a progress bar (only when stdout is a terminal and ``CI`` is
            unset).
        steps_per_chunk: SVI steps per compiled call; default: about 50, a divisor of the epoch
            length when one is near.
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
        ...     with numpyro.plate("data", 1000, subsample_size=len(x)):
        ...         numpyro.sample("y", dist.Normal(w * x, 1.0), obs=y)
        >>> x = np.linspace(-1, 1, 1000, dtype=np.float32); y = 2 * x
        >>> svi = SVI(model, AutoNormal(model), adam(0.05), Trace_ELBO())
        >>> trainer = Trainer(max_epochs=20, rng_key=jax.random.key(0), enable_progress_bar=False)
        >>> result = trainer.fit(svi, {"x": x, "y": y}, batch_size=100, num_samples=10)
        >>> result.losses.shape, result.posterior["w"].shape
        ((200,), (10,))
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
        enable_progress_bar: bool = True,
        steps_per_chunk: int | None = None,
        nonfinite_loss: Literal["raise", "warn"] = "raise",
    ) -> None:
        if max_epochs is None and max_steps is None:
            raise ConfigurationError("set max_epochs or max_steps (or both): the trainer needs to know when to stop.")
        for name, value in [
            ("max_epochs", max_epochs),
            ("max_steps", max_steps),
            ("log_every_n_steps", log_every_n_steps),
            ("steps_per_chunk", steps_per_chunk),
        ]:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigurationError(f"{name} must be a positive int or None; got {value!r}.")
        if nonfinite_loss not in ("raise", "warn"):
            raise ConfigurationError(f"nonfinite_loss must be 'raise' or 'warn'; got {nonfinite_loss!r}.")
        if mesh is not None and devices is not None:
            raise ConfigurationError("pass either devices or mesh, not both.")
        if mesh is not None and (not isinstance(mesh, Mesh) or mesh.axis_names != (DATA_AXIS,)):
            raise ConfigurationError(f"mesh must be a jax.sharding.Mesh with the single axis {DATA_AXIS!r}.")
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
        self.steps_per_chunk = steps_per_chunk
        self.nonfinite_loss = nonfinite_loss
        self.callbacks = callbacks
        self.mesh = mesh if mesh is not None else make_mesh(devices)
        self.rng_key = _as_key(rng_key)
        self.state = TrainerState(step=0, epoch=0, svi_state=None, rng_key=self.rng_key)
        self.callback_metrics: dict[str, float] = {}
        self.should_stop = False
        self.steps_per_epoch = 0
        self.placement: Literal["device", "host"] | None = None
        self.timings: dict[str, float] = {}

    def request_stop(self) -> None:
        """Ask the fit to stop at the next chunk boundary (``on_fit_end`` still runs)."""
        self.should_stop = True

    def fit(
        self,
        svi: SVI,
        train_data: Mapping[str, Any],
        *,
        batch_size: int,
        num_samples: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        data_placement: Placement = "auto",
    ) -> FitResult:
        """Run minibatch SVI over ``train_data`` and draw ``num_samples`` posterior samples.

        Args:
            svi: a ``numpyro.infer.SVI`` (model, guide, optimizer, loss).
            train_data: keyword name -> array (NumPy or JAX), one row per observation; each
                batch is passed to the model as these keyword arguments.
            batch_size: rows per step (the global batch, split over the mesh's devices).
            num_samples: posterior draws from the guide at the end (0: none).
            shuffle: a new seeded order of the rows every epoch.
            drop_last: drop the last partial batch instead of completing it (module
                :mod:`aimz_trainer.data` explains both).
            data_placement: ``"device"`` keeps the arrays on the devices and gathers batches
                there; ``"host"`` gathers them on the host and streams them; ``"auto"`` picks
                ``"device"`` when the data fit :func:`~aimz_trainer.data.device_data_budget`.
        """
        started = time.perf_counter()
        if not isinstance(svi, SVI):
            raise ConfigurationError(f"svi must be a numpyro.infer.SVI; got {type(svi).__name__}.")
        arrays, num_rows = validate_data(train_data)
        check_model_accepts(svi.model, list(arrays))
        batch_size = validate_batch_size(batch_size, num_rows, self.mesh.size)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 0:
            raise ConfigurationError(f"num_samples must be an int >= 0; got {num_samples!r}.")
        plan = FitPlan.create(
            num_rows,
            batch_size,
            drop_last=drop_last,
            max_epochs=self.max_epochs,
            max_steps=self.max_steps,
            steps_per_chunk=self.steps_per_chunk,
        )
        self.steps_per_epoch = plan.steps_per_epoch
        init_key, shuffle_key, sample_key = jax.random.split(self.rng_key, 3)
        data_bytes = sum(
            int(np.prod(a.shape)) * jax.dtypes.canonicalize_dtype(a.dtype).itemsize for a in arrays.values()
        )
        local_devices = self.mesh.local_mesh.size
        self.placement = resolve_placement(
            data_placement, data_bytes, device_data_budget(self.mesh.local_devices[0], local_devices)
        )
        device_data = _place_on_mesh(arrays, self.mesh) if self.placement == "device" else {}
        source = ChunkSource(
            plan,
            seed=_numpy_seed(shuffle_key),
            shuffle=shuffle,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        host_arrays = {k: np.asarray(a) for k, a in arrays.items()} if self.placement == "host" else None
        chunks = iter(make_chunk_loader(source, host_arrays))
        to_device = _chunk_to_device(self.mesh, batch_size)

        self.callback_metrics = {}
        self.should_stop = False
        self.state = TrainerState(step=0, epoch=0, svi_state=None, rng_key=self.rng_key)
        compiled = _Compiled(svi, self.mesh)
        first_input = to_device(next(chunks))
        train_state = compiled.start(init_key, device_data, first_input)
        self.timings = {"setup_s": time.perf_counter() - started}

        losses: list[np.ndarray] = []
        try:
            self._call("on_fit_start")
            train_state = self._loop(
                plan, compiled, train_state, device_data, first_input, chunks, to_device, losses, started
            )
            self._call("on_fit_end")
            params, posterior = compiled.finish(train_state, sample_key, device_data, first_input, num_samples)
            self.timings["fit_s"] = time.perf_counter() - started
        except BaseException as exception:
            self._call("on_exception", exception)
            raise
        finally:
            compiled.close()
            for callback in self.callbacks:
                callback.teardown(self)
        return FitResult(params=params, losses=np.concatenate(losses), posterior=posterior, state=train_state.svi_state)

    def _loop(
        self,
        plan: FitPlan,
        compiled: _Compiled,
        train_state: TrainState,
        device_data: Any,
        first_input: Any,
        chunks: Any,
        to_device: Any,
        losses: list[np.ndarray],
        started: float,
    ) -> TrainState:
        """Dispatch chunk c, then read chunk c-1's losses and run its hooks while c runs.

        Hooks therefore fire in fit order, but the devices are one chunk ahead of them.
        """
        in_flight: tuple[int, jax.Array] | None = None
        chunk_input = first_input
        for index in range(plan.num_chunks):
            if index:
                chunk_input = to_device(next(chunks))
            train_state, chunk_losses = compiled.run_chunk(train_state, device_data, chunk_input)
            self.state.svi_state = train_state.svi_state
            if not index:  # the devices are busy: compile the rest of the fit meanwhile
                compiled.prepare(train_state, device_data, chunk_input, plan.chunk_lengths())
            if in_flight is not None and not self._finish_chunk(plan, *in_flight, losses, started):
                return train_state  # a non-finite loss: the chunk just dispatched ran on a frozen state
            epoch, first_step, _ = plan.chunk(index)
            if first_step % plan.steps_per_epoch == 0:  # after the previous epoch's end hooks
                self.state.epoch = epoch
                self._call("on_train_epoch_start")
            in_flight = (index, chunk_losses)
            if self.should_stop:
                break
        if in_flight is not None:
            self._finish_chunk(plan, *in_flight, losses, started)
        return train_state

    def _finish_chunk(
        self, plan: FitPlan, index: int, chunk_losses: jax.Array, losses: list[np.ndarray], started: float
    ) -> bool:
        """Bring a chunk's losses to the host and run its hooks; ``False`` after a non-finite
        loss (in ``"warn"`` mode; ``"raise"`` raises)."""
        host_losses = np.asarray(chunk_losses)
        now = time.perf_counter()
        _, first_step, length = plan.chunk(index)
        if "first_chunk_s" not in self.timings:
            self.timings["first_chunk_s"] = now - started
        else:
            self.callback_metrics["steps_per_sec"] = length / (now - self._last_chunk_done)
        self._last_chunk_done = now
        bad = np.flatnonzero(~np.isfinite(host_losses))
        if bad.size:
            step = first_step + int(bad[0])
            losses.append(host_losses[: bad[0]])
            self.state.step = step
            error = NonFiniteLossError(step, float(host_losses[bad[0]]))
            if self.nonfinite_loss == "raise":
                raise error
            warnings.warn(str(error), RuntimeWarning, stacklevel=4)
            return False
        losses.append(host_losses)
        self.state.step = first_step + length
        self.callback_metrics["train_loss"] = float(host_losses.mean())
        self._call("on_train_chunk_end", host_losses, range(first_step, first_step + length))
        if self.state.step % plan.steps_per_epoch == 0 or self.state.step == plan.total_steps:
            self._call("on_train_epoch_end")
        return True

    def _progress(self) -> FitProgress:
        return FitProgress(step=self.state.step, epoch=self.state.epoch, metrics=dict(self.callback_metrics))

    def _call(self, hook: str, *args: Any) -> None:
        progress = self._progress()
        for callback in self.callbacks:
            getattr(callback, hook)(self, progress, *args)


def _as_key(rng_key: jax.Array | None) -> jax.Array:
    if rng_key is None:
        return jax.random.key(0)
    if isinstance(rng_key, jax.Array) and jax.dtypes.issubdtype(rng_key.dtype, jax.dtypes.prng_key):
        return rng_key
    raw = np.asarray(rng_key)
    if raw.dtype == np.uint32 and raw.shape == (2,):
        return jax.random.wrap_key_data(raw)
    raise ConfigurationError(f"rng_key must be a jax.random.key(...) (or a legacy uint32[2] key); got {rng_key!r}.")


def _numpy_seed(key: jax.Array) -> list[int]:
    return [int(word) for word in np.asarray(jax.random.key_data(key)).ravel()]


def _place_on_mesh(arrays: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Replicate the training arrays on every device of the mesh."""
    sharding = replicated(mesh)
    placed = {}
    for key, array in arrays.items():
        dtype = jax.dtypes.canonicalize_dtype(array.dtype)
        if isinstance(array, jax.Array):
            placed[key] = jax.device_put(array.astype(dtype), sharding)
        else:
            placed[key] = to_global_array(np.asarray(array, dtype=dtype), sharding, array.shape)
    return placed


def _chunk_to_device(mesh: Mesh, batch_size: int) -> Any:
    """Turn a Grain record (this process's columns) into global arrays on the mesh."""
    sharding = stacked_batch_sharding(mesh)

    def to_device(record: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        return {
            key: to_global_array(local, sharding, (local.shape[0], batch_size, *local.shape[2:]))
            for key, local in record.items()
        }

    return to_device
