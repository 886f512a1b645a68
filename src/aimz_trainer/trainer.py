"""The Trainer: a fit as a straight pipeline of stages, each in a module of its own.

``fit`` checks its arguments (:mod:`~aimz_trainer.data`, :mod:`~aimz_trainer.plates`), plans
the chunks (:mod:`~aimz_trainer.plan`), places the data and builds the record stream,
compiles (:mod:`~aimz_trainer.compile`), restores a checkpoint (:mod:`~aimz_trainer.resume`),
runs the chunk loop (:mod:`~aimz_trainer.loop`) and draws the posterior. Callbacks see the fit
through a :class:`~aimz_trainer.callbacks.FitContext`, never the Trainer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh
from numpyro.infer import SVI
from numpyro.infer.svi import SVIState

from aimz_trainer._checks import as_key, is_int_at_least, require_batch_limit, require_bool, require_choice
from aimz_trainer.callbacks import default_callbacks
from aimz_trainer.callbacks.base import Callback, CallbackList, check_callbacks
from aimz_trainer.callbacks.context import FitContext, TrainerSettings, TrainerState
from aimz_trainer.callbacks.logger import MetricLog, MetricLogger, warn_if_no_train_loss_point
from aimz_trainer.callbacks.timer import Duration, Timer, as_duration
from aimz_trainer.checkpoint import load_checkpoint
from aimz_trainer.compilation_cache import CompilationCache, use_compilation_cache
from aimz_trainer.compile import FitPrograms
from aimz_trainer.data import (
    BlockShuffle,
    ChunkSource,
    Placement,
    data_bytes,
    device_data_budget,
    is_lazy_source,
    leading_batch,
    make_chunk_loader,
    place_data,
    resolve_placement,
    samples_read_once,
)
from aimz_trainer.errors import CheckpointError, ConfigurationError
from aimz_trainer.evaluation import EvaluationSource, evaluate
from aimz_trainer.fit_inputs import FitInputs, check_fit_inputs
from aimz_trainer.gc_pause import gc_paused
from aimz_trainer.loop import ChunkLoop, Records
from aimz_trainer.plan import BatchLimit, Every, FitPlan, epoch_length, limited
from aimz_trainer.preemption import catch_preemption, save_on_preemption
from aimz_trainer.resume import (
    Boundary,
    ResumePoint,
    fit_fingerprint,
    fit_shape,
    loader_state_of,
    open_checkpoint,
    restore,
    resume_position,
    snapshot,
)
from aimz_trainer.sharding import DATA_AXIS, make_mesh, records_to_global
from aimz_trainer.step import StepMetric, step_metric_functions
from aimz_trainer.validation import Validator, sanity_check

__all__ = ["FitKeys", "FitResult", "Trainer", "TrainerState"]

use_compilation_cache()  # from the import on: see aimz_trainer.compilation_cache

Params = dict[str, jax.Array]

# Lightning's bound for a fit limited by time alone.
MAX_EPOCHS_UNDER_TIME_LIMIT = 1000


class FitResult(NamedTuple):
    """What :meth:`Trainer.fit` returns.

    Attributes:
        params: the optimized variational parameters, constrained (``svi.get_params``).
        losses: one ELBO loss per step, as a NumPy array.
        posterior: site name -> draws from the guide at the final state with a leading
            ``num_samples`` axis, drawn with the fit's posterior key: ``fit``'s
            ``num_samples`` of them, or with ``num_samples=0`` the last such draws a callback
            took at the end (a :class:`~aimz_trainer.callbacks.PosteriorSampler`'s); else
            ``None``. Per-row latent and deterministic sites are not among them (see the
            README's "Which models"); deterministic sites are computed on the data's first
            ``batch_size`` rows in row order, whatever the shuffle and wherever the fit was
            resumed.
        state: the final ``SVIState``.
    """

    params: Params
    losses: np.ndarray
    posterior: dict[str, jax.Array] | None
    state: SVIState


class FitKeys(NamedTuple):
    """The independent streams a fit's ``rng_key`` is split into."""

    init: jax.Array
    shuffle: jax.Array
    sample: jax.Array
    validation: jax.Array

    @classmethod
    def split(cls, rng_key: jax.Array) -> FitKeys:
        return cls(*jax.random.split(rng_key, 4))


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
        enable_model_summary: print the variational parameters (a
            :class:`~aimz_trainer.callbacks.ModelSummary`) at fit start and log their count.
        steps_per_chunk: SVI steps per compiled call; default: about 50, fitted to the epoch
            length and the intervals above.
        nonfinite_loss: ``"raise"`` (default) raises :class:`NonFiniteLossError` at the first
            NaN/inf loss; ``"warn"`` stops the fit with a warning and returns what it has. Either
            way the state from before the bad step is kept.
        step_metrics: per-step scalars the compiled chunk returns with the losses, logged like
            ``train_loss`` (every ``log_every_n_steps``; their chunk mean in
            ``callback_metrics``): names of built-in ones, ``"grad_norm"`` (global norm of the
            step's gradient) and ``"param_norm"`` (of the unconstrained parameters), or a
            mapping of names to :data:`~aimz_trainer.step.StepMetric` functions. Off by default.
        min_epochs: a stop requested earlier (early stopping) waits until this many epochs
            are done.
        min_steps: likewise, in steps.
        max_time: stop once the fit has run this long (a :class:`~aimz_trainer.callbacks.Timer`,
            checked at chunk boundaries; a ``timedelta``, seconds, ``"DD:HH:MM:SS"`` or
            ``{"hours": 2}``). Alone, without ``max_epochs``/``max_steps``, the fit runs up to
            1,000 epochs.
        limit_train_batches: run only the first batches of each epoch's order: an int (a count)
            or a float in (0, 1] (a fraction; ``1.0``: all).
        limit_val_batches: likewise for each validation pass (``0``: no validation).
        overfit_batches: a debugging run on the same few batches every epoch: the first
            ``overfit_batches`` batches (an int, or a fraction of an epoch) in row order, no
            shuffle, and as many validation batches; ``0``: off.
        num_sanity_val_steps: validation batches run once before the first step, with the
            starting parameters, so that a broken validation fails before any training (its
            results are not logged; non-finite ones warn); ``-1``: all of them, ``0``: none.
        fast_dev_run: a smoke test of a recipe: ``N`` steps (``True``: 1) of training and one
            validation batch, without loggers or checkpoints (callbacks that log or save are
            left out of the fit); ``max_epochs``, ``max_steps``, the limits and the
            validation intervals are overridden.
        compilation_cache: keep compiled programs on disk for the next process (see
            :mod:`aimz_trainer.compilation_cache`): ``True`` (default) in this user's cache
            directory (or where ``AIMZ_TRAINER_COMPILATION_CACHE`` says), ``False`` none from
            here on, or a directory. Importing this class already turned the environment's
            choice on (``AIMZ_TRAINER_COMPILATION_CACHE=0`` keeps the whole process off it). A
            cache set through JAX (``JAX_COMPILATION_CACHE_DIR``) wins.

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
        >>> trainer = Trainer(max_epochs=20, rng_key=jax.random.key(0), enable_progress_bar=False,
        ...                   enable_model_summary=False)
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
        enable_model_summary: bool = True,
        steps_per_chunk: int | None = None,
        nonfinite_loss: Literal["raise", "warn"] = "raise",
        step_metrics: Sequence[str] | Mapping[str, StepMetric] = (),
        min_epochs: int | None = None,
        min_steps: int | None = None,
        max_time: Duration | None = None,
        limit_train_batches: BatchLimit = 1.0,
        limit_val_batches: BatchLimit = 1.0,
        overfit_batches: BatchLimit = 0,
        num_sanity_val_steps: int = 2,
        fast_dev_run: bool | int = False,
        compilation_cache: CompilationCache = True,
    ) -> None:
        use_compilation_cache(compilation_cache)
        timer = None if max_time is None else Timer(as_duration(max_time, "max_time"))
        if max_epochs is None and max_steps is None:
            if timer is None:
                raise ConfigurationError(
                    "set max_epochs, max_steps or max_time (or several): the trainer needs to know when to stop."
                )
            max_epochs = MAX_EPOCHS_UNDER_TIME_LIMIT
        if not is_int_at_least(log_every_n_steps, 1):
            raise ConfigurationError(f"log_every_n_steps must be a positive int; got {log_every_n_steps!r}.")
        for name, value in [
            ("max_epochs", max_epochs),
            ("max_steps", max_steps),
            ("check_val_every_n_epoch", check_val_every_n_epoch),
            ("steps_per_chunk", steps_per_chunk),
            ("min_epochs", min_epochs),
            ("min_steps", min_steps),
        ]:
            if value is not None and not is_int_at_least(value, 1):
                raise ConfigurationError(f"{name} must be a positive int or None; got {value!r}.")
        for name, low, high in [("min_epochs", min_epochs, max_epochs), ("min_steps", min_steps, max_steps)]:
            if low is not None and high is not None and low > high:
                raise ConfigurationError(f"{name}={low} exceeds max_{name[4:]}={high}: the fit could not honour both.")
        limit_train_batches = require_batch_limit("limit_train_batches", limit_train_batches, minimum=1)
        limit_val_batches = require_batch_limit("limit_val_batches", limit_val_batches, minimum=0)
        overfit_batches = require_batch_limit("overfit_batches", overfit_batches, minimum=0)
        if not is_int_at_least(num_sanity_val_steps, -1):
            raise ConfigurationError(
                "num_sanity_val_steps must be an int >= 0, or -1 for every validation batch; "
                f"got {num_sanity_val_steps!r}."
            )
        if not (isinstance(fast_dev_run, bool) or is_int_at_least(fast_dev_run, 0)):
            raise ConfigurationError(
                f"fast_dev_run must be True, False or a number of steps (an int >= 0); got {fast_dev_run!r}."
            )
        if overfit_batches:
            limit_train_batches = limit_val_batches = overfit_batches
        self.fast_dev_run = int(fast_dev_run)
        if self.fast_dev_run:
            max_epochs, max_steps, min_epochs, min_steps = 1, self.fast_dev_run, None, None
            limit_train_batches, limit_val_batches, num_sanity_val_steps = self.fast_dev_run, 1, 0
            check_val_every_n_epoch, val_check_interval = 1, None
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
        require_bool("enable_model_summary", enable_model_summary)
        if mesh is not None and devices is not None:
            raise ConfigurationError("pass either devices or mesh, not both.")
        if mesh is not None and (not isinstance(mesh, Mesh) or mesh.axis_names != (DATA_AXIS,)):
            raise ConfigurationError(f"mesh must be a jax.sharding.Mesh with the single axis {DATA_AXIS!r}.")
        if not isinstance(callbacks, Sequence):
            raise ConfigurationError(f"callbacks must be a list of Callback instances; got {callbacks!r}.")
        for callback in callbacks:
            if not isinstance(callback, Callback):
                raise ConfigurationError(
                    f"callbacks must be aimz_trainer.callbacks.Callback instances; got {type(callback).__name__}."
                )
        if timer is not None:
            if any(isinstance(callback, Timer) for callback in callbacks):
                raise ConfigurationError("pass max_time or a Timer callback, not both.")
            callbacks = [*callbacks, timer]
        self._step_metrics = step_metric_functions(step_metrics)

        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.log_every_n_steps = log_every_n_steps
        self.check_val_every_n_epoch = check_val_every_n_epoch
        self.val_check_interval = val_check_interval
        self.steps_per_chunk = steps_per_chunk
        self.nonfinite_loss = nonfinite_loss
        self.min_epochs = min_epochs
        self.min_steps = min_steps
        self.limit_train_batches = limit_train_batches
        self.limit_val_batches = limit_val_batches
        self.overfit_batches = overfit_batches
        self.num_sanity_val_steps = num_sanity_val_steps
        self.callbacks = default_callbacks(
            callbacks, enable_progress_bar=enable_progress_bar, enable_model_summary=enable_model_summary
        )
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
        self._fit: FitContext | None = None

    @property
    def steps_per_epoch(self) -> int:
        """Steps per epoch of the current (or last) fit; 0 before the first fit."""
        return self.plan.steps_per_epoch if self.plan is not None else 0

    @property
    def has_validation(self) -> bool:
        """Whether the current (or last) fit validates (it was given ``val_data``)."""
        return self._fit is not None and self._fit.has_validation

    @property
    def posterior_key(self) -> jax.Array:
        """The key of the fit's posterior draws (derived from ``rng_key``)."""
        return FitKeys.split(self.rng_key).sample

    @property
    def settings(self) -> TrainerSettings:
        """The settings that shape a fit, as checkpoints record them."""
        return TrainerSettings(
            max_epochs=self.max_epochs,
            max_steps=self.max_steps,
            log_every_n_steps=self.log_every_n_steps,
            check_val_every_n_epoch=self.check_val_every_n_epoch,
            val_check_interval=self.val_check_interval,
            steps_per_chunk=self.steps_per_chunk,
            nonfinite_loss=self.nonfinite_loss,
            step_metrics=tuple(self._step_metrics),
            min_epochs=self.min_epochs,
            min_steps=self.min_steps,
        )

    def request_stop(self, reason: str | None = None, *, force: bool = False) -> None:
        """Ask the running fit to stop at the next chunk boundary (``on_fit_end`` still runs;
        ``min_steps``/``min_epochs`` delay it unless ``force``: see
        :meth:`~aimz_trainer.callbacks.FitContext.request_stop`)."""
        self.should_stop, self.stop_reason = True, reason
        if self._fit is not None:
            self._fit.request_stop(reason, force=force)

    def current_params(self) -> dict[str, jax.Array]:
        """The constrained variational parameters at ``trainer.state``, as computed by the
        compiled chunk that produced it (free to call during and after ``fit``)."""
        return self._require_fit("current_params").current_params()

    def sample_posterior(self, num_samples: int, rng_key: jax.Array | None = None) -> dict[str, jax.Array]:
        """``num_samples`` draws from the guide at ``trainer.state`` (compiled once per count).

        Args:
            num_samples: number of draws (a positive int).
            rng_key: defaults to the fit's posterior key (derived from the trainer's
                ``rng_key``), so the same fit gives the same draws.
        """
        if not is_int_at_least(num_samples, 1):
            raise ConfigurationError(f"num_samples must be a positive int; got {num_samples!r}.")
        return self._require_fit("sample_posterior").sample_posterior(num_samples, rng_key)

    def validate(
        self,
        svi: SVI,
        data: Mapping[str, Any],
        *,
        ckpt_path: str | os.PathLike[str] | int | None = None,
        params: Mapping[str, Any] | None = None,
        batch_size: int | None = None,
        num_samples: int = 20,
    ) -> dict[str, float]:
        """The held-out metrics of a checkpoint, of given parameters or of the last fit, with no
        training: ``val_loss`` and ``val_lpd`` as a fit's validation reports them, sent to the
        loggers (at the checkpoint's or the fit's last step) and into ``callback_metrics``.

        Args:
            svi: the ``SVI`` whose guide the parameters belong to.
            data: the held-out data (keyword name -> array), as ``fit``'s ``val_data``.
            ckpt_path: a checkpoint, as ``fit``'s ``ckpt_path`` takes it (``"last"``, a step of
                the fit's ``ModelCheckpoint``, or a path); its fit's validation key is used, so
                the metrics are the ones that fit logged at that step, given the same data and
                batch size.
            params: constrained variational parameters (a fit's ``FitResult.params``); not
                with ``ckpt_path``. Neither: the parameters of the Trainer's last fit.
            batch_size: rows per batch; default: the batch size of the checkpoint's or the last
                fit (required without either).
            num_samples: guide draws behind ``val_lpd`` (``fit``'s ``val_num_samples``).

        The Trainer's ``limit_val_batches`` applies. The losses are per training observation:
        of the checkpoint's or the last fit's training data, else of the model's subsampled
        plate size.

        Example:
            >>> trainer.validate(svi, {"x": x_val, "y": y_val}, ckpt_path="last")  # doctest: +SKIP
            {'val_loss': 0.62, 'val_lpd': -0.58}
        """
        return self._evaluate("val", svi, data, ckpt_path, params, batch_size, num_samples)

    def test(
        self,
        svi: SVI,
        data: Mapping[str, Any],
        *,
        ckpt_path: str | os.PathLike[str] | int | None = None,
        params: Mapping[str, Any] | None = None,
        batch_size: int | None = None,
        num_samples: int = 20,
    ) -> dict[str, float]:
        """:meth:`validate` on test data: the same pass, reported as ``test_loss`` and
        ``test_lpd``."""
        return self._evaluate("test", svi, data, ckpt_path, params, batch_size, num_samples)

    def _evaluate(
        self,
        prefix: str,
        svi: SVI,
        data: Mapping[str, Any],
        ckpt_path: Any,
        params: Mapping[str, Any] | None,
        batch_size: int | None,
        num_samples: int,
    ) -> dict[str, float]:
        source = self._evaluation_source(ckpt_path, params)
        metrics = evaluate(
            svi,
            data,
            source,
            self.mesh,
            batch_size=batch_size,
            num_samples=num_samples,
            limit_batches=self.limit_val_batches or 1.0,
            validation_key=FitKeys.split(source.rng_key).validation,
        )
        metrics = {prefix + name.removeprefix("val"): value for name, value in metrics.items()}
        self.callback_metrics.update(metrics)
        self._send_to_loggers(metrics, source.step, source.epoch)
        return metrics

    def _evaluation_source(self, ckpt_path: Any, params: Mapping[str, Any] | None) -> EvaluationSource:
        """The parameters to evaluate, and what the fit that made them knew."""
        plan = self.plan
        if ckpt_path is not None:
            if params is not None:
                raise ConfigurationError("pass ckpt_path or params, not both.")
            resume = open_checkpoint(ckpt_path, self.callbacks)
            if resume is None:
                raise CheckpointError(f"ckpt_path={ckpt_path!r}: there is no checkpoint to evaluate yet.")
            checkpoint = load_checkpoint(resume.step_dir)
            fit = checkpoint.meta["fit"]
            return EvaluationSource(
                checkpoint.params,
                checkpoint.step,
                checkpoint.epoch,
                ResumePoint(checkpoint.path, checkpoint.meta).rng_key,
                fit["num_rows"],
                fit["batch_size"],
            )
        if params is None:
            if self._fit is None or self.state.params is None:
                raise ConfigurationError(
                    "nothing to evaluate: pass ckpt_path or params, or call fit first (its parameters are used)."
                )
            params = self.state.params
        return EvaluationSource(
            dict(params),
            self.state.step,
            self.state.epoch,
            self.rng_key,
            None if plan is None else plan.num_rows,
            None if plan is None else plan.batch_size,
        )

    def _send_to_loggers(self, metrics: Mapping[str, float], step: int, epoch: int) -> None:
        """Add ``metrics`` at the last finished step to what every logger holds (nothing is
        replaced: the loggers are opened without a resume step)."""
        loggers = [c for c in self.callbacks if isinstance(c, MetricLogger)]
        state = TrainerState(step=step, epoch=epoch, svi_state=None, rng_key=self.rng_key)
        log = MetricLog({}, loggers, state)
        fit = FitContext(
            state=state,
            mesh=self.mesh,
            settings=self.settings,
            has_validation=True,
            posterior_key=self.posterior_key,
            _metrics=log.metrics,
            _log=log.log,
            plan=self.plan,  # type: ignore[arg-type]
        )
        try:
            log.open(fit, None)
            for name, value in metrics.items():
                log.log(name, value)
            log.flush()
        finally:
            log.close()

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
        shuffle: bool | BlockShuffle = True,
        drop_last: bool = False,
        data_placement: Placement = "auto",
        ckpt_path: str | os.PathLike[str] | int | None = None,
        init_state: SVIState | None = None,
    ) -> FitResult:
        """Run minibatch SVI over ``train_data`` and draw ``num_samples`` posterior samples.

        Args:
            svi: a ``numpyro.infer.SVI`` (model, guide, optimizer, loss).
            train_data: keyword name -> array (NumPy or JAX), one row per observation; each
                batch is passed to the model as these keyword arguments. An array may be a
                lazy source, read by rows and never whole (a ``zarr.Array``, an ``np.memmap``,
                any object with ``shape``, ``dtype`` and row slicing:
                :func:`~aimz_trainer.data.is_lazy_source`); the losses are those of the same
                fit from NumPy arrays with ``data_placement="host"``.
            batch_size: rows per step (the global batch, split over the mesh's devices; any
                size: one that does not split evenly is padded with rows masked out of the
                ELBO, :mod:`aimz_trainer.data`).
            val_data: held-out data with the same keys; validation reports ``val_loss`` (the
                negative ELBO per training observation, with the current guide) and, for
                models with an observed site, ``val_lpd`` (mean log predictive density). A
                model with per-row latent sites reports ``val_lpd`` only: held-out rows have
                no guide parameters, so their latents are drawn from the prior.
            val_batch_size: rows per validation batch (default: ``batch_size``).
            val_num_samples: guide draws behind ``val_lpd``.
            num_samples: posterior draws from the guide at the end (0: none), with the fit's
                posterior key (the draws of a ``PosteriorSampler(num_samples)``).
            shuffle: a new seeded order of the rows every epoch: ``True``, a permutation of
                the rows; a :class:`~aimz_trainer.data.BlockShuffle`, a permutation of blocks
                of rows shuffled within windows, for data read from disk.
            drop_last: drop the last partial batch instead of completing it (module
                :mod:`aimz_trainer.data` explains both).
            data_placement: ``"device"`` keeps the arrays on the devices and gathers batches
                there; ``"host"`` gathers them on the host and streams them; ``"auto"`` picks
                ``"device"`` when the data fit :func:`~aimz_trainer.data.device_data_budget`
                and hold no lazy source (logged to ``aimz_trainer.data`` at level INFO).
            ckpt_path: resume from a checkpoint: ``"last"`` (the newest usable one of the
                fit's :class:`~aimz_trainer.callbacks.ModelCheckpoint`; damaged newer ones are
                skipped with a :class:`~aimz_trainer.errors.CheckpointWarning`), a step
                (``int``) of it, or a path (a checkpoint, or a directory of them: its newest
                usable one); a damaged checkpoint asked for by step or path is refused. A resume
                with other data or optimizer settings warns, naming them. The fit continues
                where the checkpoint left off (same position in the epoch, same shuffle order,
                the checkpoint's random keys, callbacks restored) and returns the whole loss
                history. Nothing on disk changes when the checkpoint cannot be used.
            init_state: continue from this ``SVIState`` (a previous fit's ``FitResult.state``,
                of the same model, guide and optimizer): the optimizer's state and the SVI key
                carry on, while steps, epochs and losses count from this fit's start. A state
                of another structure is a :class:`~aimz_trainer.errors.ConfigurationError`.
                Not with ``ckpt_path`` (a checkpoint holds its own state).

        Raises:
            FitPreempted: SIGTERM or SIGUSR1 stopped the fit at a chunk boundary, after its
                ``ModelCheckpoint`` saved it there (:mod:`aimz_trainer.preemption`); a
                ``SystemExit`` with status 128 + the signal.
        """
        if init_state is not None and ckpt_path is not None:
            raise ConfigurationError("pass init_state or ckpt_path, not both: a checkpoint holds its own SVI state.")
        started = time.perf_counter()
        # The checks and the checkpoint's digest share one read of each lazy source's sample.
        with samples_read_once():
            inputs = check_fit_inputs(
                svi,
                train_data,
                batch_size,
                val_data,
                val_batch_size,
                val_num_samples,
                num_samples,
                shuffle,
                drop_last,
                self.mesh,
            )
            if self.overfit_batches:
                inputs = inputs._replace(shuffle=False)  # the same batches every epoch
            if self.limit_val_batches == 0:
                inputs = inputs._replace(val_arrays=None)
            callbacks = self._fit_callbacks()
            resume = open_checkpoint(ckpt_path, callbacks) if ckpt_path is not None else None
            if resume is not None:
                self.rng_key = resume.rng_key
            keys = FitKeys.split(self.rng_key)
            fit, metric_log = self._start_context(inputs, callbacks, keys)
            check_callbacks(callbacks, fit)
            plan = fit.plan = self._plan(inputs, callbacks, fit)
            # Recorded in checkpoints, compared on resume. The optimizer probe compiles a small
            # function: only a fit that saves or resumes pays for it.
            checkpointing = resume is not None or any(c.saves_checkpoints for c in callbacks)
            fingerprint = fit_fingerprint(inputs.arrays, svi.optim) if checkpointing else {}
        shape = fit_shape(plan, shuffle=inputs.shuffle, drop_last=inputs.drop_last, fingerprint=fingerprint)
        start_index = resume_position(plan, resume, shape) if resume is not None else 0
        warn_if_no_train_loss_point(plan, start_index, self.log_every_n_steps, callbacks)

        self.placement = resolve_placement(
            data_placement,
            data_bytes(inputs.arrays, inputs.val_arrays),
            device_data_budget(self.mesh.local_devices[0], self.mesh.local_mesh.size),
            lazy=any(map(is_lazy_source, [*inputs.arrays.values(), *(inputs.val_arrays or {}).values()])),
        )
        train = place_data(inputs.arrays, self.placement, self.mesh, shuffle=inputs.shuffle)
        source = ChunkSource(
            plan,
            seed=_numpy_seed(keys.shuffle),
            shuffle=inputs.shuffle,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

        def open_loader() -> Any:
            loader = iter(make_chunk_loader(source, train.host_arrays))
            if resume is not None:
                loader.set_state(loader_state_of(resume))
            return loader

        to_global = records_to_global(self.mesh, plan.padded_batch_size)
        # With the data on the devices a record is the source's own (the loader gathers no rows):
        # the programs compile from it while Grain starts.
        records = Records(open_loader, to_global, like=to_global(source[0]) if train.host_arrays is None else None)
        # Fixed rows, not the run's first batch: a resumed fit starts from another batch, and
        # draws of a deterministic site computed on it would differ from an uninterrupted fit's.
        draw_record = leading_batch(
            inputs.num_rows,
            inputs.batch_size,
            train.host_arrays,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            padded_size=plan.padded_batch_size,
        )
        programs = FitPrograms(
            svi,
            inputs.layout,
            self.mesh,
            train.device_data,
            to_global(draw_record),
            self._step_metrics,
            inputs.batch_size,
        )
        fit._sample = programs.sample
        try:
            with catch_preemption(fit):  # SIGTERM, SIGUSR1: stop at a chunk boundary, save, exit (preemption.py)
                return self._run(
                    fit, metric_log, inputs, programs, records, callbacks, keys, resume, shape, started, start_index,
                    init_state,
                )  # fmt: skip
        finally:
            programs.close()

    def _start_context(
        self, inputs: FitInputs, callbacks: Sequence[Callback], keys: FitKeys
    ) -> tuple[FitContext, MetricLog]:
        """The new fit's context and the log behind its ``log``; the Trainer's public view of the
        fit follows the context."""
        self.svi, self.plan = inputs.svi, None
        self.should_stop, self.stop_reason, self.posterior = False, None, None
        self.state = state = TrainerState(step=0, epoch=0, svi_state=None, rng_key=self.rng_key)
        self.callback_metrics = {}
        metric_log = MetricLog(self.callback_metrics, [c for c in callbacks if isinstance(c, MetricLogger)], state)
        self._fit = FitContext(
            state=state,
            mesh=self.mesh,
            settings=self.settings,
            has_validation=inputs.val_arrays is not None,
            posterior_key=keys.sample,
            _metrics=self.callback_metrics,
            _log=metric_log.log,
            checkpoint_directories=tuple(d for c in callbacks if (d := c.checkpoint_directory()) is not None),
        )
        return self._fit, metric_log

    def _run(
        self,
        fit: FitContext,
        metric_log: MetricLog,
        inputs: FitInputs,
        programs: FitPrograms,
        records: Records,
        callbacks: list[Callback],
        keys: FitKeys,
        resume: ResumePoint | None,
        shape: dict[str, Any],
        started: float,
        start_index: int,
        init_state: SVIState | None,
    ) -> FitResult:
        """Compile, restore, loop and draw: the stages that hold compiled programs."""
        self.plan = fit.plan
        state = fit.state
        with gc_paused():  # the programs' traces and Grain's start: the collector would walk the process each time
            validator = None
            if inputs.val_arrays is not None:
                validator = Validator(
                    programs,
                    place_data(inputs.val_arrays, self.placement, self.mesh),  # type: ignore[arg-type]
                    self.mesh,
                    batch_size=inputs.val_batch_size,
                    num_samples=inputs.val_num_samples,
                    num_train_rows=inputs.num_rows,
                    rng_key=keys.validation,
                    every=self._validate_every(inputs),
                    limit_batches=self.limit_val_batches,
                )
            programs.lower(keys.init, records.like, init_state, validator.inputs if validator is not None else None)
            train_state, state.params, chunk_fn = programs.start(records.first)  # Grain opens while they compile
        state.svi_state = train_state.svi_state
        losses: list[np.ndarray] = []
        if resume is not None:
            train_state, saved_losses = restore(resume, train_state, state, shape, callbacks)
            losses.append(saved_losses)
        if validator is not None and self.num_sanity_val_steps:
            sanity_check(validator, state.params, self.num_sanity_val_steps)
        hooks = CallbackList(callbacks, fit, metric_log.flush)
        self.timings = {"setup_s": time.perf_counter() - started}
        loop = ChunkLoop(
            fit,
            metric_log,
            hooks,
            chunk_fn,
            programs.device_data,
            records,
            validator,
            losses,
            self.timings,
            started,
            start_index,
        )

        def take_snapshot(boundary: Boundary | None = None) -> dict[str, Any]:
            checkpoint = snapshot(
                fit,
                loader_state=loop.loader_state,
                losses=losses,
                callbacks=hooks.callbacks,
                shape=shape,
                boundary=boundary,
            )
            hooks.on_save_checkpoint(checkpoint)
            return checkpoint

        fit._snapshot = take_snapshot
        try:
            metric_log.open(fit, state.step)
            hooks.on_fit_start()
            if resume is not None:
                hooks.on_load_checkpoint(resume.meta)
            train_state = loop.run(train_state)
            preempted = save_on_preemption(fit, hooks.callbacks)  # None unless it stopped on a signal
            hooks.on_fit_end()
            if preempted is not None:  # after on_fit_end, which waits for the checkpoint
                raise preempted
            posterior = fit.sample_posterior(inputs.num_samples) if inputs.num_samples else fit.final_draws()
            self.timings["fit_s"] = time.perf_counter() - started
        except BaseException as exception:
            hooks.on_exception(exception)
            raise
        finally:
            self.should_stop, self.stop_reason = fit.should_stop, fit.stop_reason
            try:
                hooks.teardown()
            finally:
                metric_log.close()
        self.posterior = posterior
        return FitResult(
            params=fit.current_params(),
            losses=np.concatenate(losses) if losses else np.zeros(0, np.float32),
            posterior=posterior,
            state=train_state.svi_state,
        )

    # -- stages ----------------------------------------------------------------------------------

    def _fit_callbacks(self) -> list[Callback]:
        """The callbacks of a fit: with ``fast_dev_run``, none that log or save checkpoints."""
        if self.fast_dev_run:
            return [c for c in self.callbacks if not (isinstance(c, MetricLogger) or c.saves_checkpoints)]
        return list(self.callbacks)

    def _validate_every(self, inputs: FitInputs) -> Every:
        """When validation is due: every ``check_val_every_n_epoch`` epochs and every
        ``val_check_interval`` steps (a float: that fraction of an epoch)."""
        interval = self.val_check_interval
        if isinstance(interval, float):
            steps_per_epoch = limited(
                epoch_length(inputs.num_rows, inputs.batch_size, drop_last=inputs.drop_last), self.limit_train_batches
            )
            interval = max(1, int(interval * steps_per_epoch))
        return Every(steps=interval, epochs=self.check_val_every_n_epoch)

    def _plan(self, inputs: FitInputs, callbacks: Sequence[Callback], fit: FitContext) -> FitPlan:
        """The fit's chunks, ending where logging, validation or a callback must see the fit."""
        boundaries = [Every(steps=self.log_every_n_steps)]
        boundaries += [Every(steps=i) for c in callbacks if (i := c.step_interval(fit)) is not None]
        if inputs.val_arrays is not None:
            boundaries.append(self._validate_every(inputs))
        return FitPlan.create(
            inputs.num_rows,
            inputs.batch_size,
            drop_last=inputs.drop_last,
            max_epochs=self.max_epochs,
            max_steps=self.max_steps,
            steps_per_chunk=self.steps_per_chunk,
            boundaries=boundaries,
            devices=self.mesh.size,
            limit_batches=self.limit_train_batches,
        )

    def _require_fit(self, what: str) -> FitContext:
        if self._fit is None:
            raise ConfigurationError(f"{what}() needs a fit: call trainer.fit(...) first (or call it from a hook).")
        return self._fit


def _numpy_seed(key: jax.Array) -> list[int]:
    return [int(word) for word in np.asarray(jax.random.key_data(key)).ravel()]
