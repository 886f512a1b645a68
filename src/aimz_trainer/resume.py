"""Resuming a fit: which checkpoint, where in the fit it is, restoring it, and what a
checkpoint of a running fit holds (the on-disk format itself is :mod:`aimz_trainer.checkpoint`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro

from aimz_trainer._version import library_version
from aimz_trainer.callbacks.base import Callback, overrides_state
from aimz_trainer.callbacks.context import FitContext, TrainerState
from aimz_trainer.checkpoint import (
    CHECKPOINT_FORMAT,
    array_tree,
    checkpoint_steps,
    compare_array_trees,
    named_arrays,
    newest_checkpoint,
    read_meta,
    require_usable,
    resolve_checkpoint,
    restore_state,
    tree_signature,
    warn_checkpoint,
)
from aimz_trainer.data import BlockShuffle, digest_rows
from aimz_trainer.distributed import allgather_json
from aimz_trainer.errors import CheckpointError, ConfigurationError
from aimz_trainer.plan import FitPlan
from aimz_trainer.step import TrainState

__all__ = [
    "Boundary",
    "ResumePoint",
    "capture_boundary",
    "data_digest",
    "fingerprint_differences",
    "fit_fingerprint",
    "fit_shape",
    "loader_state_of",
    "open_checkpoint",
    "optimizer_probe",
    "restore",
    "resume_position",
    "snapshot",
]


class ResumePoint(NamedTuple):
    """The checkpoint a fit resumes from: its step directory and its JSON metadata."""

    step_dir: Path
    meta: dict[str, Any]

    @property
    def rng_key(self) -> jax.Array:
        """The key of the fit that wrote the checkpoint."""
        key = self.meta["rng_key"]
        return jax.random.wrap_key_data(np.asarray(key["data"], np.uint32), impl=key["impl"])


def open_checkpoint(ckpt_path: Any, callbacks: Sequence[Callback]) -> ResumePoint | None:
    """Find and read the checkpoint to resume from (nothing is written). ``"last"`` and a
    directory skip damaged newer checkpoints with a warning; ``"last"`` when nothing is saved
    yet is ``None``, with a warning (a job's first run, the script of its resumes); a step or a
    step directory is that checkpoint or an error. ``"last"`` and steps refer to the first callback with a
    :meth:`~aimz_trainer.callbacks.Callback.checkpoint_directory`."""
    last = isinstance(ckpt_path, str) and ckpt_path == "last"  # an array would compare elementwise
    if last or (isinstance(ckpt_path, int) and not isinstance(ckpt_path, bool)):
        directories = [d for c in callbacks if (d := c.checkpoint_directory()) is not None]
        if not directories:
            raise CheckpointError(
                f"ckpt_path={ckpt_path!r} refers to the fit's ModelCheckpoint, but it has none: add "
                "ModelCheckpoint(dirpath) to the callbacks or pass the checkpoint's path."
            )
        directory = directories[0]
        if last:
            newest = newest_checkpoint(directory)
            if newest is None:  # a requeued job's first run: the same script starts the fit
                warn_checkpoint(
                    f"ckpt_path='last' but {str(directory)!r} holds no checkpoint yet: the fit starts from the "
                    "beginning."
                )
                return None
            step_dir = newest
        elif not (directory / str(ckpt_path)).is_dir():
            raise CheckpointError(
                f"ckpt_path={ckpt_path}: no checkpoint of that step; the steps saved are {checkpoint_steps(directory)}."
            )
        else:
            step_dir = require_usable(directory / str(ckpt_path))
    elif isinstance(ckpt_path, str | os.PathLike):
        step_dir = resolve_checkpoint(ckpt_path)
    else:
        raise ConfigurationError(f"ckpt_path must be 'last', a step (int) or a path; got {ckpt_path!r}.")
    return ResumePoint(step_dir, read_meta(step_dir))


def fit_shape(
    plan: FitPlan, *, shuffle: bool | BlockShuffle, drop_last: bool, fingerprint: Mapping[str, Any]
) -> dict[str, Any]:
    """The fit's shape and fingerprint (training data digest, optimizer probe), as a
    checkpoint records them and a resume compares them (a :class:`BlockShuffle` as its sizes)."""
    return {
        "num_rows": plan.num_rows,
        "batch_size": plan.batch_size,
        "steps_per_epoch": plan.steps_per_epoch,
        "steps_per_chunk": plan.steps_per_chunk,
        "total_steps": plan.total_steps,
        "shuffle": shuffle.record() if isinstance(shuffle, BlockShuffle) else shuffle,
        "drop_last": drop_last,
        **fingerprint,
    }


def resume_position(plan: FitPlan, resume: ResumePoint, shape: Mapping[str, Any]) -> int:
    """The chunk the resumed fit starts with, after checking the checkpoint's fit matches."""
    saved = resume.meta["fit"]
    differing = [
        f"{name}: {saved.get(name)!r} in the checkpoint, {shape[name]!r} now"
        for name in ("num_rows", "batch_size", "steps_per_epoch", "shuffle", "drop_last")
        if saved.get(name) != shape[name]
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


def loader_state_of(resume: ResumePoint) -> dict[str, Any]:
    """This process's loader state in the checkpoint (a checkpoint of another number of
    processes has one state for all: they iterate the same chunks)."""
    states = resume.meta.get("process_loader_states") or []
    own = jax.process_index()
    return states[own] if own < len(states) else resume.meta["loader_state"]


def restore(
    resume: ResumePoint,
    state: TrainState,
    trainer_state: TrainerState,
    fingerprint: Mapping[str, Any],
    callbacks: Sequence[Callback],
) -> tuple[TrainState, np.ndarray]:
    """Load the checkpoint's arrays onto the mesh of ``state`` (a freshly initialized fit,
    whose parameters ``trainer_state`` holds) and its callbacks' states. ``trainer_state`` is
    updated to the checkpoint's; returns the training state and the losses so far."""
    meta = resume.meta
    params = trainer_state.params
    assert params is not None
    differences = compare_array_trees(meta["params_tree"], array_tree(params))
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
        "params": params,
        "losses": jax.ShapeDtypeStruct((int(meta["step"]),), np.float32),
    }
    restored = restore_state(resume.step_dir, like)
    changed = fingerprint_differences(meta["fit"], fingerprint)
    if changed:
        warn_checkpoint(
            f"resuming from the checkpoint {str(resume.step_dir)!r} with " + " and ".join(changed) + ": the fit "
            "continues, but not as the run that wrote the checkpoint."
        )
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
    svi_state = restored["svi_state"]
    trainer_state.step, trainer_state.epoch = int(meta["step"]), int(meta["epoch"])
    trainer_state.svi_state, trainer_state.params = svi_state, restored["params"]
    return TrainState(svi_state, jnp.asarray(True)), np.asarray(restored["losses"])


class Boundary(NamedTuple):
    """A running fit at a chunk boundary, after the chunk's hooks: everything a checkpoint of
    that moment holds, kept so that it can still be written after the fit has moved on (a save
    on exception writes the last one: :class:`~aimz_trainer.callbacks.ModelCheckpoint`'s
    ``save_on_exception``).

    Attributes:
        state: a copy of the fit's :class:`~aimz_trainer.callbacks.context.TrainerState` (its
            arrays are shared: JAX arrays never change, and the compiled chunk does not donate
            its input).
        loader_state: the loader's state after the chunk.
        num_loss_chunks: how many entries of the fit's list of loss arrays are the losses so far
            (the list is only appended to).
        metrics: the fit's metrics then.
        callback_states: each stateful callback's ``state_dict`` then, deep-copied.
    """

    state: TrainerState
    loader_state: dict[str, Any]
    num_loss_chunks: int
    metrics: dict[str, float]
    callback_states: dict[str, Any]


def capture_boundary(
    fit: FitContext, *, loader_state: dict[str, Any], losses: Sequence[np.ndarray], callbacks: Sequence[Callback]
) -> Boundary:
    """The fit as it stands now, as a :class:`Boundary`: call it where the fit is consistent
    (after a chunk's last hook). Nothing is copied to the host; callbacks' states are
    deep-copied, so that a callback changing its own state later does not change this one."""
    return Boundary(
        state=dataclasses.replace(fit.state),
        loader_state=copy.deepcopy(loader_state),
        num_loss_chunks=len(losses),
        metrics=dict(fit.metrics),
        callback_states={c.state_key: copy.deepcopy(c.state_dict()) for c in callbacks if overrides_state(c)},
    )


def snapshot(
    fit: FitContext,
    *,
    loader_state: dict[str, Any],
    losses: Sequence[np.ndarray],
    callbacks: Sequence[Callback],
    shape: Mapping[str, Any],
    boundary: Boundary | None = None,
) -> dict[str, Any]:
    """The fit as it stands, as a checkpoint: ``{"state": named arrays, "meta": JSON}``; or, given
    a ``boundary`` captured earlier (:func:`capture_boundary`), the fit as it stood then."""
    if boundary is None:
        boundary = capture_boundary(fit, loader_state=loader_state, losses=losses, callbacks=callbacks)
    state = boundary.state
    settings = fit.settings
    meta = {
        "format": CHECKPOINT_FORMAT,
        "step": state.step,
        "epoch": state.epoch,
        "rng_key": {
            "data": np.asarray(jax.random.key_data(state.rng_key)).tolist(),
            "impl": str(jax.random.key_impl(state.rng_key)),
        },
        "loader_state": boundary.loader_state,
        "process_loader_states": allgather_json(boundary.loader_state),
        "callbacks": boundary.callback_states,
        "params_tree": array_tree(state.params),
        "svi_state_tree": tree_signature(state.svi_state),
        "fit": dict(shape),
        "trainer": {name: getattr(settings, name) for name in _RECORDED_SETTINGS},
        "mesh_shape": dict(fit.mesh.shape),
        "versions": {"aimz_trainer": library_version(), "jax": jax.__version__, "numpyro": numpyro.__version__},
    }
    done = losses[: boundary.num_loss_chunks]
    all_losses = np.concatenate(done) if done else np.zeros(0, np.float32)
    arrays = named_arrays({"svi_state": state.svi_state, "params": state.params, "losses": all_losses})
    return {"state": arrays, "meta": meta}


_RECORDED_SETTINGS = (
    "max_epochs",
    "max_steps",
    "log_every_n_steps",
    "check_val_every_n_epoch",
    "val_check_interval",
    "steps_per_chunk",
    "nonfinite_loss",
)


# -- what a resume compares ---------------------------------------------------------------------

_PROBE_START = np.array([0.0, 0.0, 1.0, -2.0], np.float32)  # zeros: moves read exactly; others: decay
# Three steps (momenta show from the second), a large gradient (clipping), and a loss for the
# optimizers that take one (numpyro's update_with_value).
_PROBE_GRADIENTS = np.array([[0.1, -0.4, 2.0, -1e-3], [0.3, 0.2, -1.0, 5e-3], [-10.0, 3.0, 0.5, 1.0]], np.float32)
_PROBE_LOSSES = np.array([3.0, 2.0, 1.0], np.float32)


def optimizer_probe(optim: Any) -> list[float] | None:
    """How far the optimizer ``optim`` (an SVI's: ``numpyro.optim``, or optax as SVI wraps it)
    moves a fixed probe parameter in three updates from fixed gradients, each move to 4
    significant digits.

    A fingerprint of its hyperparameters that needs no access to them (numpyro keeps them in
    closures): it tells Adam(0.01) from Adam(0.02), other momenta, weight decay or clipping
    apart; a schedule that differs only after its first steps goes unseen. ``None`` when the
    optimizer cannot update the probe (one that needs the model's own parameter tree, such as
    optax's ``multi_transform`` with a tree of labels).

    Example:
        >>> from numpyro.optim import Adam
        >>> optimizer_probe(Adam(0.01)) != optimizer_probe(Adam(0.02))
        True
    """

    def moves() -> jax.Array:
        state = optim.init({"probe": jnp.asarray(_PROBE_START)})
        for gradient, loss in zip(_PROBE_GRADIENTS, _PROBE_LOSSES, strict=True):
            state = optim.update({"probe": jnp.asarray(gradient)}, state, value=jnp.asarray(loss))
        return optim.get_params(state)["probe"] - _PROBE_START

    try:
        # One compiled function: 50-150 ms, where op by op each op compiles on its first use
        # in a process (0.5-1 s in all).
        moved = np.asarray(jax.jit(moves)())
    except Exception:  # the optimizer's own error: it needs other parameters than the probe
        return None
    return [float(f"{move:.4g}") for move in moved]


def data_digest(arrays: Mapping[str, Any]) -> str:
    """A short digest of training data (:func:`~aimz_trainer.data.digest_rows`: names, shapes,
    dtypes and 1,024 sampled rows): tells apart datasets given by mistake."""
    digest = hashlib.sha256()
    digest_rows(digest, arrays)
    return digest.hexdigest()[:16]


def fit_fingerprint(arrays: Mapping[str, Any], optim: Any) -> dict[str, Any]:
    """What a resumed fit checks it still has: ``{"sampled_rows_digest", "optimizer_probe"}``.
    (Checkpoints written before the sample was runs of rows hold a ``"data_digest"`` of other
    rows instead: not compared, as any value missing on one side.)"""
    return {"sampled_rows_digest": data_digest(arrays), "optimizer_probe": optimizer_probe(optim)}


def fingerprint_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """How a fit's :func:`fit_fingerprint` differs from the one a checkpoint recorded (a value
    missing on either side is not compared)."""
    differences = []
    data = saved.get("sampled_rows_digest"), current.get("sampled_rows_digest")
    if None not in data and data[0] != data[1]:
        differences.append(
            f"other training data (the digest of their sampled rows is {data[0]} in the checkpoint, {data[1]} now)"
        )
    probes = saved.get("optimizer_probe"), current.get("optimizer_probe")
    if None not in probes and list(probes[0]) != list(probes[1]):
        differences.append(
            "another optimizer setting, such as the learning rate (its moves of a probe parameter from fixed "
            f"gradients are {probes[0]} in the checkpoint, {probes[1]} now)"
        )
    return differences
