"""Checkpoints on disk: what one holds, where to find one, how to read it back.

A checkpoint is an orbax-checkpoint step directory ``<dirpath>/<step>`` with two items:

* ``state`` (:class:`PackedArraysHandler`, one ``arrays.npz``): the array leaves
  (:func:`pack`) of ``svi_state`` (optimizer state, mutable state, the SVI rng key as raw key
  data) and of ``params`` (the constrained variational parameters), and ``losses`` (every
  step's loss so far);
* ``meta`` (JSON): ``step``, ``epoch``, the trainer's ``rng_key`` (raw data and
  implementation), the Grain iterator state of the next chunk (``loader_state``), each
  callback's ``state_dict`` under its ``state_key``, and descriptive metadata: library and
  jax versions, the trainer's settings, the fit's shape (rows, batch size, chunking), the
  mesh shape, the parameter tree (name -> shape and dtype) and the SVI state's structure.

orbax writes a step into a temporary directory and renames it when complete, so a save cut
short (a killed process) never looks like a checkpoint; :func:`resolve_checkpoint` only ever
sees complete ones. Restoring takes the structure and the shardings from a live target, so a
checkpoint written on one device count is read onto another mesh as it is.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from numpyro.handlers import seed

from aimz_trainer.errors import CheckpointError

__all__ = [
    "CHECKPOINT_FORMAT",
    "LoadedCheckpoint",
    "PackedArraysHandler",
    "PackedArraysRestore",
    "PackedArraysSave",
    "checkpoint_steps",
    "compare_param_trees",
    "load_checkpoint",
    "pack",
    "packed_like",
    "param_tree",
    "read_meta",
    "resolve_checkpoint",
    "restore_state",
    "save_args",
    "tree_signature",
    "unpack",
]

CHECKPOINT_FORMAT = 2  # 1 stored the state with orbax's StandardSave (tensorstore)
_ARRAYS_FILE = "arrays.npz"


class PackedArraysHandler(ocp.CheckpointHandler):
    """An orbax item of a few host arrays, written as one uncompressed ``.npz`` file.

    A checkpoint's state is a handful of packed buffers (:func:`pack`), already on the host;
    orbax's tensorstore-backed ``StandardSave`` spent 11 ms of CPU per save on them (of 25 ms
    in all), a fixed cost paid at every epoch end. One file write is a fraction of a
    millisecond. The arrays are replicated, so only process 0 writes them.
    """

    def save(self, directory: Any, args: PackedArraysSave) -> None:  # type: ignore[override]
        if jax.process_index() == 0:
            with open(Path(directory) / _ARRAYS_FILE, "wb") as file:
                np.savez(file, **_flatten(args.arrays))

    def restore(self, directory: Any, args: PackedArraysRestore | None = None) -> dict[str, Any]:  # type: ignore[override]
        with np.load(Path(directory) / _ARRAYS_FILE) as archive:
            return _unflatten({name: archive[name] for name in archive.files})


@ocp.args.register_with_handler(PackedArraysHandler, for_save=True)
@dataclasses.dataclass
class PackedArraysSave(ocp.args.CheckpointArgs):
    """Save arguments of :class:`PackedArraysHandler`: ``{name: array or {name: array}}``."""

    arrays: Mapping[str, Any]


@ocp.args.register_with_handler(PackedArraysHandler, for_restore=True)
@dataclasses.dataclass
class PackedArraysRestore(ocp.args.CheckpointArgs):
    """Restore arguments of :class:`PackedArraysHandler` (nothing to say: the file has it all)."""


def _flatten(arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    flat: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        if isinstance(value, Mapping):
            flat.update({f"{name}/{inner}": np.asarray(array) for inner, array in value.items()})
        else:
            flat[name] = np.asarray(value)
    return flat


def _unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    arrays: dict[str, Any] = {}
    for name, array in flat.items():
        outer, _, inner = name.partition("/")
        if inner:
            arrays.setdefault(outer, {})[inner] = array
        else:
            arrays[outer] = array
    return arrays


def save_args(state: Mapping[str, Any], meta: Mapping[str, Any]) -> ocp.args.Composite:
    """The orbax arguments that write one checkpoint."""
    return ocp.args.Composite(state=PackedArraysSave(dict(state)), meta=ocp.args.JsonSave(dict(meta)))


def checkpoint_steps(directory: str | os.PathLike[str]) -> list[int]:
    """The complete checkpoints in ``directory``, by step (in-progress saves excluded)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(
        int(entry.name)
        for entry in directory.iterdir()
        if entry.is_dir() and entry.name.isdigit() and (entry / "meta").exists() and (entry / "state").exists()
    )


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint step directory from ``path``: a step directory itself, or a directory of
    checkpoints (its newest complete one)."""
    location = Path(path)
    if not location.exists():
        raise CheckpointError(f"ckpt_path={str(path)!r} does not exist.")
    if (location / "meta").exists() and (location / "state").exists():
        return location
    steps = checkpoint_steps(location)
    if not steps:
        raise CheckpointError(
            f"ckpt_path={str(path)!r} holds no complete checkpoint (expected step directories such as "
            f"{str(location / '100')!r} with 'state' and 'meta' inside)."
        )
    return location / str(steps[-1])


def read_meta(step_dir: Path) -> dict[str, Any]:
    """The JSON item of a checkpoint, checked for the fields a resume needs."""
    try:
        meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "meta")
    except Exception as error:  # orbax raises many types for a damaged file
        raise CheckpointError(
            f"the checkpoint {str(step_dir)!r} cannot be read: its 'meta' item is damaged ({error})."
        ) from error
    missing = {"format", "step", "epoch", "rng_key", "loader_state", "callbacks", "params_tree"} - set(meta or {})
    if missing:
        raise CheckpointError(
            f"the checkpoint {str(step_dir)!r} is not an aimz_trainer checkpoint (missing {sorted(missing)})."
        )
    if meta["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"the checkpoint {str(step_dir)!r} has format {meta['format']}; this version reads format "
            f"{CHECKPOINT_FORMAT}."
        )
    return meta


def restore_state(step_dir: Path, target: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Read the ``state`` item (host arrays); with ``target`` (arrays of the expected shapes
    and dtypes, e.g. :func:`packed_like`), check that it is what this fit holds."""
    try:
        restored = ocp.Checkpointer(PackedArraysHandler()).restore(step_dir / "state", args=PackedArraysRestore())
    except Exception as error:  # numpy and zipfile raise many types for a damaged file
        raise CheckpointError(f"the checkpoint {str(step_dir)!r} cannot be restored: {error}") from error
    if target is not None:
        expected = {name: (array.shape, array.dtype) for name, array in _flatten(target).items()}
        found = {name: (array.shape, array.dtype) for name, array in _flatten(restored).items()}
        if found != expected:
            raise CheckpointError(
                f"the checkpoint {str(step_dir)!r} cannot be restored: its arrays {found} are not this fit's "
                f"{expected}."
            )
    return restored


def pack(tree: Any) -> dict[str, np.ndarray]:
    """The array leaves of ``tree`` on the host, flattened into one buffer per dtype (typed
    PRNG keys as their raw ``uint32`` data): what a checkpoint holds.

    A few large buffers save several times faster than many small arrays, and orbax cannot
    store every pytree node type (e.g. the empty ``ParamShape`` nodes of
    ``numpyro.contrib.module``); the structure comes back from the live fit (:func:`unpack`).
    Only ready buffers are copied: nothing waits for a computation in flight.
    """
    buffers: dict[str, list[np.ndarray]] = {}
    for leaf in jax.tree.leaves(tree):
        host = np.asarray(jax.random.key_data(leaf) if _is_key(leaf) else leaf)
        buffers.setdefault(host.dtype.name, []).append(host.ravel())
    return {dtype: np.concatenate(parts) for dtype, parts in buffers.items()}


def unpack(buffers: Mapping[str, np.ndarray], like: Any) -> Any:
    """Undo :func:`pack` with the structure, key types and shardings of ``like``."""
    live, treedef = jax.tree.flatten(like)
    offsets = dict.fromkeys(buffers, 0)
    leaves = []
    for ref in live:
        data_shape = jax.random.key_data(ref).shape if _is_key(ref) else ref.shape
        dtype = np.dtype(np.uint32) if _is_key(ref) else np.dtype(ref.dtype)
        start, size = offsets.get(dtype.name, 0), math.prod(data_shape)
        chunk = np.asarray(buffers[dtype.name][start : start + size]).reshape(data_shape)
        offsets[dtype.name] = start + size
        leaf = jax.device_put(chunk, ref.sharding) if isinstance(ref, jax.Array) else chunk
        leaves.append(jax.random.wrap_key_data(leaf, impl=jax.random.key_impl(ref)) if _is_key(ref) else leaf)
    if any(offsets[name] != len(buffer) for name, buffer in buffers.items()):
        raise CheckpointError("the checkpoint's arrays do not fit this fit's state (another model or optimizer?).")
    return treedef.unflatten(leaves)


def packed_like(tree: Any) -> dict[str, np.ndarray]:
    """Empty buffers shaped like :func:`pack` of ``tree`` (a restore target), without copying."""
    sizes: dict[str, int] = {}
    for leaf in jax.tree.leaves(tree):
        dtype = np.dtype(np.uint32) if _is_key(leaf) else np.dtype(leaf.dtype)
        shape = jax.random.key_data(leaf).shape if _is_key(leaf) else leaf.shape
        sizes[dtype.name] = sizes.get(dtype.name, 0) + math.prod(shape)
    return {name: np.zeros(size, name) for name, size in sizes.items()}


def tree_signature(tree: Any) -> str:
    """The structure of a pytree, leaves described by shape and dtype (to compare two fits)."""
    return str(jax.tree.structure(tree)) + str([(tuple(leaf.shape), str(leaf.dtype)) for leaf in jax.tree.leaves(tree)])


def _is_key(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def param_tree(params: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``{name: [shape, dtype]}`` for every array leaf of the parameters, in :func:`pack`
    order; nested names are joined with ``/`` (JSON-ready)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {_path_name(path): [list(leaf.shape), str(leaf.dtype)] for path, leaf in leaves}


def _path_name(path: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)


def compare_param_trees(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two :func:`param_tree` results (empty: the same)."""
    differences = [f"{name}: only in the checkpoint" for name in sorted(set(saved) - set(current))]
    differences += [f"{name}: only in this model" for name in sorted(set(current) - set(saved))]
    differences += [
        f"{name}: {saved[name][0]} {saved[name][1]} in the checkpoint, {current[name][0]} {current[name][1]} now"
        for name in sorted(set(saved) & set(current))
        if list(saved[name]) != list(current[name])
    ]
    return differences


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint read back without a Trainer (see :func:`load_checkpoint`).

    Attributes:
        path: the step directory.
        step: SVI steps done when it was written.
        epoch: the epoch it was written in.
        params: the constrained variational parameters (``SVI.get_params``), as NumPy arrays.
        losses: the loss of every step up to ``step``.
        meta: the JSON metadata (versions, settings, parameter tree, callback states).
    """

    path: Path
    step: int
    epoch: int
    params: dict[str, Any]
    losses: np.ndarray
    meta: dict[str, Any]

    def sample_posterior(self, guide: Any, num_samples: int, rng_key: jax.Array, **data: Any) -> dict[str, jax.Array]:
        """``num_samples`` draws from ``guide`` (the fit's guide, e.g. ``svi.guide``) at these
        parameters; ``data`` is a batch of the model's inputs (deterministic sites are computed
        on it)."""
        if getattr(guide, "prototype_trace", None) is None:
            seed(guide, rng_key)(**data)  # an autoguide sets itself up on its first call
        return guide.sample_posterior(rng_key, self.params, sample_shape=(num_samples,), **data)


def _named_params(buffers: Mapping[str, np.ndarray], tree: Mapping[str, list[Any]]) -> dict[str, np.ndarray]:
    """Split packed parameters by the checkpoint's parameter tree (name -> [shape, dtype])."""
    offsets: dict[str, int] = {}
    params = {}
    for name, (shape, dtype) in tree.items():
        dtype = "uint32" if dtype.startswith("key<") else dtype
        start, size = offsets.get(dtype, 0), math.prod(shape)
        params[name] = np.asarray(buffers[dtype][start : start + size]).reshape(shape)
        offsets[dtype] = start + size
    return params


def load_checkpoint(path: str | os.PathLike[str]) -> LoadedCheckpoint:
    """Read a checkpoint's parameters, losses and metadata, for prediction without a Trainer.

    Args:
        path: a checkpoint step directory, or a directory of checkpoints (its newest).

    Example:
        >>> ckpt = load_checkpoint("checkpoints")  # doctest: +SKIP
        >>> ckpt.params["w_auto_loc"]  # doctest: +SKIP
    """
    step_dir = resolve_checkpoint(path)
    meta = read_meta(step_dir)
    restored = restore_state(step_dir)
    return LoadedCheckpoint(
        path=step_dir,
        step=int(meta["step"]),
        epoch=int(meta["epoch"]),
        params=_named_params(restored["params"], meta["params_tree"]),
        losses=np.asarray(restored["losses"]),
        meta=meta,
    )
