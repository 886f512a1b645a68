"""Checkpoints on disk: what one holds, where to find one, how to read it back.

A checkpoint is an orbax-checkpoint step directory ``<dirpath>/<step>`` with two items:

* ``state`` (:class:`~aimz_trainer.checkpoint_handler.NamedArraysHandler`): one uncompressed
  ``arrays.npz`` of named host arrays, which ``np.load`` reads without this library:
  ``params/<name>`` for each constrained variational parameter (the names ``SVI.get_params``
  gives; nested names joined with ``/``), ``svi_state/<path>`` for each leaf of the
  ``SVIState``, named by its tree path (e.g. ``svi_state/optim_state/1/0/mu/w_auto_loc``; the
  SVI rng key as its raw ``uint32`` key data), and ``losses``, every step's loss so far;
* ``meta`` (JSON, the file ``meta/metadata``): ``step``, ``epoch``, the trainer's ``rng_key``
  (raw data and implementation), the Grain iterator state of the next chunk
  (``loader_state``), each callback's ``state_dict`` under its ``state_key``, and descriptive
  metadata: library and jax versions, the trainer's settings, the fit's shape (rows, batch
  size, chunking) and fingerprint (a digest of the training data, the optimizer's
  :func:`optimizer_probe`), the mesh shape, the parameter tree (name -> shape and dtype) and
  the SVI state's structure.

The README's "Checkpoint format" section has a reader in plain NumPy.

orbax writes a step into a temporary directory and renames it when complete, so a save cut
short (a killed process) never looks like a checkpoint. A step directory can be damaged all
the same (an item missing or unreadable: a deletion cut short, a disk error, a hand edit):
asked for a directory of checkpoints, :func:`resolve_checkpoint` skips damaged newer ones for
the newest usable one with a :class:`~aimz_trainer.errors.CheckpointWarning` naming both; a
damaged checkpoint asked for by its own path is refused. Restoring takes the structure and the
shardings from a live target, so a checkpoint written on one device count is read onto
another mesh as it is.
"""

from __future__ import annotations

import functools
import os
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from aimz_trainer.errors import CheckpointError, CheckpointWarning
from aimz_trainer.step import set_up_guide

if TYPE_CHECKING:
    import orbax.checkpoint as ocp

    from aimz_trainer.checkpoint_handler import NamedArraysHandler, NamedArraysRestore, NamedArraysSave

__all__ = [
    "CHECKPOINT_FORMAT",
    "LoadedCheckpoint",
    "NamedArraysHandler",
    "NamedArraysRestore",
    "NamedArraysSave",
    "array_tree",
    "checkpoint_damage",
    "checkpoint_steps",
    "compare_array_trees",
    "load_checkpoint",
    "named_arrays",
    "newest_checkpoint",
    "read_arrays",
    "read_meta",
    "require_usable",
    "resolve_checkpoint",
    "restore_state",
    "save_args",
    "tree_from_arrays",
    "tree_signature",
    "warn_checkpoint",
]

# 3 held an AutoContinuous guide's latent vector (auto_loc, ...) with its sites in name order,
# where a guide set up on values reads them in the model's order: read by this version, its
# sites could be swapped without a sign, so it is refused; 2 packed the arrays into one buffer
# per dtype, sliced by the parameter tree; 1 stored them with orbax's StandardSave (tensorstore).
CHECKPOINT_FORMAT = 4
_ARRAYS_FILE = "arrays.npz"
_ITEMS = ("meta", "state")
_PARAMS = "params/"
_LIBRARY = os.path.dirname(__file__)  # warnings point at the first frame outside it


def __getattr__(name: str) -> object:
    # The orbax item's classes derive from orbax's: in checkpoint_handler, imported on first use.
    if name in {"NamedArraysHandler", "NamedArraysRestore", "NamedArraysSave"}:
        from aimz_trainer import checkpoint_handler

        return getattr(checkpoint_handler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def save_args(state: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> ocp.args.Composite:
    """The orbax arguments that write one checkpoint: ``state`` from :func:`named_arrays`."""
    import orbax.checkpoint as ocp

    from aimz_trainer.checkpoint_handler import NamedArraysSave

    return ocp.args.Composite(state=NamedArraysSave(dict(state)), meta=ocp.args.JsonSave(dict(meta)))


# -- named arrays ------------------------------------------------------------------------------


def named_arrays(tree: Any) -> dict[str, np.ndarray]:
    """The array leaves of ``tree`` on the host, each named by its tree path (keys joined with
    ``/``, e.g. ``svi_state/optim_state/1/0/mu/w_auto_loc``); typed PRNG keys as their raw
    ``uint32`` data. What a checkpoint's ``state`` item holds.

    Raises:
        CheckpointError: two leaves get the same name (e.g. a parameter named ``"a/b"`` next
            to a dict ``{"a": {"b": ...}}``): one would overwrite the other.
    """
    names, leaves, _ = _named_leaves(tree)
    raw = [jax.random.key_data(leaf) if _is_key(leaf) else leaf for leaf in leaves]
    # One device_get for all: the copies to the host overlap.
    return dict(zip(names, map(np.asarray, jax.device_get(raw)), strict=True))


def array_tree(tree: Any) -> dict[str, list[Any]]:
    """``{name: [shape, dtype]}`` of every array leaf of ``tree`` as :func:`named_arrays` stores
    it (typed PRNG keys as their ``uint32`` data), without copying: JSON-ready, and the
    expected contents of a checkpoint (``jax.ShapeDtypeStruct`` leaves work too)."""
    names, leaves, _ = _named_leaves(tree)
    return {name: [list(shape), dtype] for name, (shape, dtype) in zip(names, map(_stored_spec, leaves), strict=True)}


def tree_from_arrays(arrays: Mapping[str, np.ndarray], like: Any) -> Any:
    """Undo :func:`named_arrays`: the structure of ``like`` filled with ``arrays`` by name, each
    put on the sharding of its ``like`` leaf when that is a ``jax.Array`` (and wrapped as a key
    of its implementation when that is a typed key)."""
    names, refs, treedef = _named_leaves(like)
    return treedef.unflatten([_leaf_like(arrays[name], ref) for name, ref in zip(names, refs, strict=True)])


def compare_array_trees(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two :func:`array_tree` results (empty: the same)."""
    differences = [f"{name}: only in the checkpoint" for name in sorted(set(saved) - set(current))]
    differences += [f"{name}: not in the checkpoint" for name in sorted(set(current) - set(saved))]
    differences += [
        f"{name}: {saved[name][0]} {saved[name][1]} in the checkpoint, {current[name][0]} {current[name][1]} now"
        for name in sorted(set(saved) & set(current))
        if list(saved[name]) != list(current[name])
    ]
    return differences


def tree_signature(tree: Any) -> str:
    """The structure of a pytree, leaves described by shape and dtype (to compare two fits)."""
    return str(jax.tree.structure(tree)) + str([(tuple(leaf.shape), str(leaf.dtype)) for leaf in jax.tree.leaves(tree)])


def _named_leaves(tree: Any) -> tuple[tuple[str, ...], list[Any], Any]:
    leaves, treedef = jax.tree.flatten(tree)
    return _leaf_names(treedef), leaves, treedef


@functools.lru_cache(maxsize=64)
def _leaf_names(treedef: Any) -> tuple[str, ...]:
    """The leaves' path names of a tree structure; cached, as every save of a fit names the same
    structure (naming the paths was half of a save's time on the training loop)."""
    placeholders = treedef.unflatten(range(treedef.num_leaves))
    names = tuple(_path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(placeholders)[0])
    if len(set(names)) < len(names):
        repeated = sorted({name for name in names if names.count(name) > 1})
        raise CheckpointError(
            f"two leaves of the checkpointed state share the name(s) {repeated}; rename the parameter whose "
            "name contains '/' so that its path differs from a nested one."
        )
    return names


def _path_name(path: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)


def _is_key(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _stored_spec(leaf: Any) -> tuple[tuple[int, ...], str]:
    if _is_key(leaf):
        return tuple(jax.random.key_data(leaf).shape), "uint32"
    if not hasattr(leaf, "dtype"):  # a Python number
        leaf = np.asarray(leaf)
    return tuple(leaf.shape), np.dtype(leaf.dtype).name


def _leaf_like(value: np.ndarray, ref: Any) -> Any:
    leaf = jax.device_put(value, ref.sharding) if isinstance(ref, jax.Array) else value
    return jax.random.wrap_key_data(leaf, impl=jax.random.key_impl(ref)) if _is_key(ref) else leaf


# -- finding a checkpoint ----------------------------------------------------------------------


def checkpoint_steps(directory: str | os.PathLike[str]) -> list[int]:
    """The steps of the step directories in ``directory`` that hold both items, ascending
    (saves in progress excluded; their contents are not read: see :func:`checkpoint_damage`)."""
    return sorted(int(step_dir.name) for step_dir in _step_directories(Path(directory)) if _has_items(step_dir))


def checkpoint_damage(step_dir: Path) -> str | None:
    """What keeps the step directory ``step_dir`` from being resumed (an item missing, its
    ``meta`` unreadable, its ``arrays.npz`` missing or not an archive), or ``None``.

    The archive's members are not read here (a corrupted member shows when it is restored).
    """
    missing = [repr(item) for item in _ITEMS if not (step_dir / item).is_dir()]
    if missing:
        return f"it has no {' and no '.join(missing)} item"
    try:
        _read_json(step_dir)
    except Exception as error:  # orbax raises many types for a damaged file
        return f"its 'meta' item is damaged ({error})"
    if not zipfile.is_zipfile(step_dir / "state" / _ARRAYS_FILE):
        return f"its 'state' item is damaged ({_ARRAYS_FILE} is missing or not a .npz archive)"
    return None


def require_usable(step_dir: Path) -> Path:
    """``step_dir``, after checking it is not damaged (:func:`checkpoint_damage`).

    Raises:
        CheckpointError: it is; a checkpoint asked for by its path or step is never swapped
            for another one.
    """
    damage = checkpoint_damage(step_dir)
    if damage is not None:
        raise CheckpointError(
            f"the checkpoint {str(step_dir)!r} cannot be used: {damage}. Resume from another step, or pass the "
            "directory of checkpoints for its newest usable one."
        )
    return step_dir


def newest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The newest usable checkpoint in ``directory`` (``None``: it holds no step directory).

    A damaged step directory newer than it (:func:`checkpoint_damage`) is skipped with a
    :class:`~aimz_trainer.errors.CheckpointWarning` that names it and the one used: the fit
    continues the same run from an earlier step rather than not at all.

    Raises:
        CheckpointError: every step directory in ``directory`` is damaged.
    """
    skipped = []
    for step_dir in _step_directories(Path(directory)):
        damage = checkpoint_damage(step_dir)
        if damage is None:
            if skipped:
                warn_checkpoint(
                    f"skipped the damaged checkpoint(s) {'; '.join(skipped)}; using {str(step_dir)!r} (step "
                    f"{step_dir.name}), the newest usable one, instead. Remove the damaged directories, or pass a "
                    "checkpoint's own path, to silence this."
                )
            return step_dir
        skipped.append(f"{str(step_dir)!r} ({damage})")
    if skipped:
        raise CheckpointError(f"every checkpoint in {str(directory)!r} is damaged: {'; '.join(skipped)}.")
    return None


def resolve_checkpoint(path: str | os.PathLike[str], *, name: str = "ckpt_path") -> Path:
    """A checkpoint step directory from ``path`` (the argument ``name``): a step directory itself
    (refused when damaged), or a directory of checkpoints (its newest usable one:
    :func:`newest_checkpoint`)."""
    if not isinstance(path, str | os.PathLike) or not str(path):
        raise CheckpointError(f"{name} must be a checkpoint's path; got {path!r}.")
    location = Path(path)
    if not location.exists():
        raise CheckpointError(f"{name}={str(path)!r} does not exist.")
    if any((location / item).exists() for item in _ITEMS):
        return require_usable(location)
    newest = newest_checkpoint(location)
    if newest is None:
        raise CheckpointError(
            f"{name}={str(path)!r} holds no complete checkpoint (expected step directories such as "
            f"{str(location / '100')!r} with 'state' and 'meta' inside)."
        )
    return newest


def warn_checkpoint(message: str) -> None:
    """Issue a :class:`~aimz_trainer.errors.CheckpointWarning` at the caller's line (the first
    frame outside this library)."""
    warnings.warn(message, CheckpointWarning, skip_file_prefixes=(_LIBRARY,))


def _step_directories(directory: Path) -> list[Path]:
    """The directories named by a step number, newest first (orbax names a save in progress
    otherwise: ``<step>.orbax-checkpoint-tmp...``)."""
    if not directory.is_dir():
        return []
    entries = (entry for entry in directory.iterdir() if entry.name.isdigit() and entry.is_dir())
    return sorted(entries, key=lambda entry: int(entry.name), reverse=True)


def _has_items(step_dir: Path) -> bool:
    return all((step_dir / item).exists() for item in _ITEMS)


# -- reading a checkpoint ----------------------------------------------------------------------


def read_meta(step_dir: Path) -> dict[str, Any]:
    """The JSON item of a checkpoint, checked for the fields a resume needs."""
    try:
        meta = _read_json(step_dir)
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


def _read_json(step_dir: Path) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(step_dir / "meta")


def read_arrays(step_dir: Path) -> dict[str, np.ndarray]:
    """A checkpoint's ``state`` item: ``{name: array}`` (:func:`named_arrays`), on the host."""
    import orbax.checkpoint as ocp

    from aimz_trainer.checkpoint_handler import NamedArraysHandler, NamedArraysRestore

    try:
        return ocp.Checkpointer(NamedArraysHandler()).restore(step_dir / "state", args=NamedArraysRestore())
    except Exception as error:  # numpy and zipfile raise many types for a damaged file
        raise CheckpointError(f"the checkpoint {str(step_dir)!r} cannot be restored: {error}") from error


def restore_state(step_dir: Path, like: Any) -> Any:
    """A checkpoint's ``state`` item as a tree shaped like ``like`` (:func:`tree_from_arrays`),
    after checking that it holds exactly ``like``'s arrays, by name, shape and dtype.

    Raises:
        CheckpointError: the item cannot be read, or its arrays are not ``like``'s (each
            difference is named).
    """
    arrays = read_arrays(step_dir)
    differences = compare_array_trees(array_tree(arrays), array_tree(like))
    if differences:
        raise CheckpointError(
            f"the checkpoint {str(step_dir)!r} cannot be restored: its arrays are not this fit's; "
            + "; ".join(differences)
        )
    return tree_from_arrays(arrays, like)


# -- without a Trainer -------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A checkpoint read back without a Trainer (see :func:`load_checkpoint`).

    Attributes:
        path: the step directory.
        step: SVI steps done when it was written.
        epoch: the epoch it was written in.
        params: the constrained variational parameters (``SVI.get_params``), as NumPy arrays;
            nested names joined with ``/``.
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
        set_up_guide(guide, rng_key, data)
        return guide.sample_posterior(rng_key, self.params, sample_shape=(num_samples,), **data)


def load_checkpoint(path: str | os.PathLike[str]) -> LoadedCheckpoint:
    """Read a checkpoint's parameters, losses and metadata, for prediction without a Trainer.

    Args:
        path: a checkpoint step directory, or a directory of checkpoints (its newest usable
            one: :func:`resolve_checkpoint`).

    Example:
        >>> ckpt = load_checkpoint("checkpoints")  # doctest: +SKIP
        >>> ckpt.params["w_auto_loc"]  # doctest: +SKIP
    """
    step_dir = resolve_checkpoint(path, name="path")
    meta = read_meta(step_dir)
    arrays = read_arrays(step_dir)
    return LoadedCheckpoint(
        path=step_dir,
        step=int(meta["step"]),
        epoch=int(meta["epoch"]),
        params={name.removeprefix(_PARAMS): array for name, array in arrays.items() if name.startswith(_PARAMS)},
        losses=arrays["losses"],
        meta=meta,
    )
