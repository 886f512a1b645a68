"""Prediction stores: Zarr v3 groups written by a background thread and marked complete last.

A :class:`ZarrStore` creates every array up front, in blocks (Zarr's chunks) of a batch of
rows by as many draws as keep a block at about :data:`BLOCK_BYTES` (see :meth:`ArraySpec.chunks`;
integer arrays Blosc-zstd, float arrays uncompressed unless asked: they hardly compress; every
block ends in a crc32c checksum of its bytes), then takes whole batches from the compute
loop through a bounded queue: a writer thread writes them while the devices compute the next
ones, and host memory holds at most ``max_pending`` batches whatever the number of rows. A
second thread syncs each batch's block files to the disk, at most ``max_unsynced`` batches
behind the writer, so a slow disk is waited for away from the computation. After each synced
batch the root group records how many rows are written, so an interrupted store can be
continued; only when the last batch and the metadata are written is the store marked complete,
and :func:`~aimz_trainer.store_reading.open_store` refuses an incomplete one. A failed write
(disk full, permission) is raised to the compute loop at its next batch and leaves the store
incomplete.

Every block of a store is written, even one equal to the fill value, so a block that is not
there was lost, never left out; the store is opened on the
:class:`~aimz_trainer.store_reading.VerifyingStore` that reads it back only as written (see
:mod:`aimz_trainer.store_reading`). A resume reads back the blocks of the rows recorded as
written and continues from the first batch that is not intact, with a warning.

Several processes (a ``jax.distributed`` run) can write one store together, each its own rows:
writer 0 creates it (``writers=N``), the others open it once it exists (``join=True``). Each
batch is then cut into ``N`` parts, one per writer, each its own blocks (every block of
draws of its rows), so no block ever has two writers. The rows
written are not recorded batch by batch (N processes would share one attribute), only by
writer 0's :meth:`ZarrStore.finalize`: an interrupted store of several writers cannot be
resumed, only written again. :func:`open_shared_store` and :func:`finalize_shared_store` are the
protocol the processes follow around it: process 0 names the store (:func:`choose_store_path`),
creates it and writes the arrays without a row axis; the others open it once every process
knows it exists; after the last batch the processes agree whether every one wrote all its rows,
and only then does process 0 mark the store complete. A process that fails makes every process
raise (the failing one its own error, the others :class:`~aimz_trainer.errors.StoreError`) and
leaves the store incomplete. :func:`process_rows` is the part of every batch a process writes.

Stores written without an ``output_dir`` live in a scratch directory (:mod:`aimz_trainer.scratch`).

Memory when reading: a block is the unit every reader decodes, so :data:`BLOCK_BYTES` also bounds
what one read of a row-wise array holds per block it touches. ``open_store(path, chunks={})``
gives a dask-backed tree with one dask chunk per block (see
:func:`~aimz_trainer.store_reading.open_store`).
"""

from __future__ import annotations

import datetime
import itertools
import math
import os
import queue
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
import zarr
from jax.sharding import Mesh
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.errors import ZarrUserWarning

from aimz_trainer._checks import is_int_at_least
from aimz_trainer.distributed import allgather_json
from aimz_trainer.errors import ConfigurationError, StoreError, StoreWarning
from aimz_trainer.sharding import batch_sharding
from aimz_trainer.store_reading import COMPLETE, ROWS_WRITTEN, VerifyingStore, describe_block_problems

__all__ = [
    "BLOCK_BYTES",
    "FINGERPRINT",
    "ArraySpec",
    "ZarrStore",
    "choose_store_path",
    "finalize_shared_store",
    "open_shared_store",
    "process_rows",
    "require_shareable",
]

FINGERPRINT = "aimz_trainer_fingerprint"  # what was computed: a resume must compute the same

# What a block of a row-wise array aims at, uncompressed: a few draws' worth of a batch rather than
# all of them. At the tutorial's settings (100,000-row batches, 1,000 draws, float32) a block of
# every draw was 400 MB, which any reader of a single value had to decode whole.
BLOCK_BYTES = 16 * 2**20


@dataclass(frozen=True)
class ArraySpec:
    """One array of a store: ``<group>/<name>`` with named dims; ``row_axis`` is the axis the
    batches fill (``None``: written whole, once); ``draw_axis``, of a row-wise array, is cut into
    blocks of draws (see :meth:`chunks`)."""

    group: str
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    dims: tuple[str, ...]
    row_axis: int | None
    attrs: Mapping[str, Any] | None = None
    draw_axis: int | None = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def chunks(self, block_rows: int) -> tuple[int, ...]:
        """The shape of the array's blocks (zarr's ``chunks``): ``block_rows`` rows along the row
        axis; along the draw axis the draws cut into the fewest equal parts of at most about
        :data:`BLOCK_BYTES` each (one draw at least); the whole array along the others.

        Example:
            >>> dims = ("chain", "draw", "obs")
            >>> spec = ArraySpec("predictions", "p", (1, 1000, 10**6), np.dtype(np.float32), dims, 2, draw_axis=1)
            >>> spec.chunks(100_000)  # 24 blocks of draws of about 16 MiB, not one of 400 MB
            (1, 42, 100000)
        """
        if self.row_axis is None:
            return self.shape
        shape = [min(block_rows, n) if axis == self.row_axis else n for axis, n in enumerate(self.shape)]
        if self.draw_axis is not None:
            draws = shape[self.draw_axis]
            per_draw = math.prod(shape) // max(draws, 1) * np.dtype(self.dtype).itemsize
            parts = max(1, math.ceil(draws * per_draw / BLOCK_BYTES))
            shape[self.draw_axis] = max(1, math.ceil(draws / parts))
        return tuple(shape)


class ZarrStore:
    """A Zarr v3 group being written batch by batch from a background thread.

    Args:
        path: the store's directory (created; with ``resume`` it must be an incomplete store
            of the same arrays; its written blocks are read back, and it continues from the
            first batch with a missing or damaged block, with a warning, see
            :attr:`rows_written`).
        specs: the arrays.
        batch_size: rows per batch; with one writer also per block along each array's row axis.
        attrs: attributes of the root group.
        group_attrs: attributes of each group, ``{group: {name: value}}``.
        max_pending: batches queued for the writer at most (the compute loop blocks beyond).
        max_unsynced: batches written but not yet synced to the disk at most (the writer
            blocks beyond): the page cache holds no more of the store than that.
        resume: continue an interrupted store instead of creating one (one writer only).
        writers: processes writing the store together; blocks are ``batch_size // writers``
            rows, each writer's part of a batch. Writer 0 creates the store, writes the arrays
            without a row axis and finalizes it.
        join: open the store writer 0 created, to write this process's rows only (no
            attributes, no :meth:`finalize`).
        compress_floats: compress float arrays too (Blosc-lz4; default: written as they are,
            see :func:`_compressors`); integer arrays are always Blosc-zstd.

    Attributes:
        rows_written: the rows on the disk, synced (a resume continues after them).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        specs: Sequence[ArraySpec],
        *,
        batch_size: int,
        attrs: Mapping[str, Any] | None = None,
        group_attrs: Mapping[str, Mapping[str, Any]] | None = None,
        max_pending: int = 3,
        max_unsynced: int = 4,
        resume: bool = False,
        writers: int = 1,
        join: bool = False,
        compress_floats: bool = False,
    ) -> None:
        if not is_int_at_least(writers, 1) or batch_size % writers:
            raise StoreError(f"writers must be a positive int dividing batch_size={batch_size}; got {writers!r}.")
        if resume and writers > 1:
            raise StoreError("resume needs a store of one writer: several writers do not record their progress.")
        self.path = Path(path)
        self.specs = {(spec.group, spec.name): spec for spec in specs}
        self.writers = writers
        self.joined = join
        _one_codec_thread()
        reopened = self._reopen(batch_size, (attrs or {}).get(FINGERPRINT)) if resume else None
        if reopened is not None:
            self._root = reopened
        elif join:
            try:
                self._root = zarr.open_group(VerifyingStore(self.path), mode="r+", zarr_format=3)
            except Exception as error:
                raise StoreError(f"join: writer 0 has not created a store at {str(self.path)!r} ({error}).") from error
        else:
            self._root = zarr.open_group(VerifyingStore(self.path), mode="w", zarr_format=3)
            shared = {"writers": writers} if writers > 1 else {}
            self._root.attrs.update(
                {**(attrs or {}), **shared, COMPLETE: False, ROWS_WRITTEN: 0, "batch_size": batch_size}
            )
            self._create(batch_size // writers, compress_floats, group_attrs or {})
        self.rows_written = int(self._root.attrs[ROWS_WRITTEN])
        # Every block is written whole, so zarr's check whether a block equals the fill value
        # (and could be left out) is skipped: for NaN-filled float blocks it cost more CPU than
        # writing them.
        self._arrays = {
            key: self._root[f"{spec.group}/{spec.name}"].with_config({"write_empty_chunks": True})
            for key, spec in self.specs.items()
        }
        if resume:
            self._rewind_to_intact_rows(batch_size)
        self._queue: queue.Queue[Any] = queue.Queue(max_pending)
        self._unsynced: queue.Queue[Any] = queue.Queue(max_unsynced)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write_loop, name="aimz-store-writer", daemon=True)
        self._syncer = threading.Thread(target=self._sync_loop, name="aimz-store-syncer", daemon=True)
        self._thread.start()
        self._syncer.start()

    def _create(self, block_rows: int, compress_floats: bool, group_attrs: Mapping[str, Mapping[str, Any]]) -> None:
        for group, attributes in group_attrs.items():
            self._root.require_group(group).attrs.update(dict(attributes))
        for spec in self.specs.values():
            group = self._root.require_group(spec.group)
            group.create_array(
                spec.name,
                shape=spec.shape,
                dtype=spec.dtype,
                chunks=spec.chunks(block_rows),
                # Last: the checksum is of the bytes in the file, whatever the compression.
                compressors=(*_compressors(spec.dtype, compress_floats), Crc32cCodec()),
                dimension_names=spec.dims,
                attributes=dict(spec.attrs or {}),
                # Unwritten float blocks read as NaN, never as plausible zeros.
                fill_value=np.nan if np.dtype(spec.dtype).kind == "f" else 0,
            )

    def _reopen(self, batch_size: int, fingerprint: str | None) -> zarr.Group | None:
        """The interrupted store to continue, checked to be this computation's; ``None`` when
        it was interrupted while its arrays were being created (nothing written: create it anew)."""
        try:
            root = zarr.open_group(VerifyingStore(self.path), mode="r+", zarr_format=3)
        except Exception as error:
            raise StoreError(f"resume: {str(self.path)!r} is not a prediction store ({error}).") from error
        if root.attrs.get(COMPLETE, True):
            raise StoreError(f"resume: {str(self.path)!r} is complete (or not one of ours); nothing to continue.")
        if root.attrs.get("writers", 1) > 1:
            raise StoreError(
                f"resume: {str(self.path)!r} was written by {root.attrs['writers']} processes, which do not record "
                "their progress; delete it and predict again."
            )
        if fingerprint is not None and root.attrs.get(FINGERPRINT) != fingerprint:
            raise StoreError(
                f"resume: {str(self.path)!r} was written by another computation (other inputs, posterior, "
                "random key or intervention); continuing it would mix two runs."
            )
        if root.attrs.get("batch_size") != batch_size:
            raise StoreError(
                f"resume: {str(self.path)!r} was written with batch_size={root.attrs.get('batch_size')}; "
                f"resume with that batch size (got {batch_size})."
            )
        arrays = {(group, name): root.get(f"{group}/{name}") for group, name in self.specs}
        if None in arrays.values() and root.attrs.get(ROWS_WRITTEN, 0) == 0:
            return None
        for (group, name), spec in self.specs.items():
            existing = arrays[(group, name)]
            if existing is None or tuple(existing.shape) != spec.shape or existing.dtype != spec.dtype:
                raise StoreError(f"resume: {str(self.path)!r} was written for other arrays ({group}/{name} differs).")
        return root

    def _rewind_to_intact_rows(self, batch_size: int) -> None:
        """Read back the blocks of the rows recorded as written, and record only the batches
        before the first with a missing or damaged block: a resume recomputes it and every
        batch after it, rather than trusting what the record says is there."""
        store: VerifyingStore = self._root.store
        for start in range(0, self.rows_written, batch_size):
            problems = {key: problem for key in self._block_keys(start) if (problem := store.block_problem(key))}
            if problems:
                warnings.warn(
                    f"resume: in the rows of {str(self.path)!r} recorded as written, "
                    f"{describe_block_problems(problems)}; the rows from {start} on are computed again, not only those "
                    f"from {self.rows_written}.",
                    StoreWarning,
                    stacklevel=3,
                )
                self._root.attrs[ROWS_WRITTEN] = self.rows_written = start
                return

    def _block_keys(self, start: int) -> list[str]:
        return [
            block for key, spec in self.specs.items() if spec.row_axis is not None for block in self._keys(key, start)
        ]

    def write_batch(self, start: int, stop: int, values: Mapping[tuple[str, str], Any]) -> None:
        """Queue the rows ``start:stop`` of every row-wise array (host or device arrays; the
        writer thread copies device arrays to the host). Raises a failed write's error.

        With several writers, ``start:stop`` is this writer's part of a batch: whole blocks
        (the last one may end at the last row)."""
        self._raise_if_failed()
        self._queue.put((start, stop, dict(values)))
        self._raise_if_failed()

    def write_whole(self, values: Mapping[tuple[str, str], Any]) -> None:
        """Write arrays without a row axis (the posterior, the observed data) now."""
        for key, value in values.items():
            self._arrays[key][...] = np.asarray(value)

    def _write_loop(self) -> None:
        self._serve(self._queue, self._write)
        self._unsynced.put(None)  # after the last batch: the syncer stops once it is synced

    def _sync_loop(self) -> None:
        self._serve(self._unsynced, self._sync)

    def _serve(self, source: queue.Queue[Any], handle: Callable[..., None]) -> None:
        while (item := source.get()) is not None:
            if self._error is not None:
                continue  # drain: the compute loop is told at its next batch
            try:
                handle(*item)
            except BaseException as error:  # handed to the compute loop at its next batch
                self._error = error

    def _write(self, start: int, stop: int, values: Mapping[tuple[str, str], Any]) -> None:
        for key, value in values.items():
            spec = self.specs[key]
            index = tuple(slice(start, stop) if axis == spec.row_axis else slice(None) for axis in range(spec.ndim))
            self._arrays[key][index] = np.asarray(value)
        self._unsynced.put(([path for key in values for path in self.chunk_paths(key, start)], stop))

    def _sync(self, paths: Sequence[Path], stop: int) -> None:
        for path in paths:
            _write_back(path)
        if self.writers == 1:  # only rows on the disk count: a resume continues after them
            self._root.attrs[ROWS_WRITTEN] = stop
            self.rows_written = stop

    def chunk_paths(self, key: tuple[str, str], start: int) -> list[Path]:
        """The files of the blocks of row-wise array ``key`` whose rows begin at row ``start``:
        one per block of draws."""
        return [self.path / block for block in self._keys(key, start)]

    def _keys(self, key: tuple[str, str], start: int) -> list[str]:
        # From the array's own blocks, not the spec's: a resumed store keeps those it was created with.
        spec, array = self.specs[key], self._arrays[key]
        indices = [
            [start // array.chunks[axis]] if axis == spec.row_axis else range(array.cdata_shape[axis])
            for axis in range(spec.ndim)
        ]
        prefix = f"{spec.group}/{spec.name}"
        return [f"{prefix}/{array.metadata.encode_chunk_key(coords)}" for coords in itertools.product(*indices)]

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def flush(self) -> None:
        """Wait for the queued batches (the writer then stops); raise a failed write's error."""
        self._stop_writer()
        self._raise_if_failed()

    def finalize(self, attrs: Mapping[str, Any] | None = None) -> None:
        """Wait for the queued batches, write ``attrs`` and mark the store complete.

        With several writers only writer 0 finalizes, once every writer has flushed without
        error (the caller checks that across the processes)."""
        if self.joined:
            raise StoreError("a joined store is finalized by writer 0, not by the process that joined it.")
        self.flush()
        rows = {ROWS_WRITTEN: self._num_rows()} if self.writers > 1 else {}
        self._root.attrs.update({**(attrs or {}), **rows, COMPLETE: True})
        with warnings.catch_warnings():  # zarr notes consolidation is not in the v3 spec (yet)
            warnings.simplefilter("ignore", ZarrUserWarning)
            zarr.consolidate_metadata(self.path, zarr_format=3)

    def _num_rows(self) -> int:
        return max((spec.shape[spec.row_axis] for spec in self.specs.values() if spec.row_axis is not None), default=0)

    def abort(self) -> None:
        """Stop the writer and leave the store incomplete (resumable)."""
        self._stop_writer()

    def _stop_writer(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._syncer.join()


def _write_back(path: Path) -> None:
    """Wait until a block file is on the disk, then drop it from the page cache.

    The rows a store records as written are then durable, and the page cache does not grow
    with the store: it holds at most the ``max_unsynced`` batches not yet synced, and later
    blocks reuse the memory synced ones freed. The wait for the disk is spent on the syncer
    thread, a few batches behind the writer: a disk that stalls for a moment (a shared virtual
    disk does) delays neither.
    """
    # On these virtual machines memory the kernel has not touched lately is costly to touch
    # (the host backs it on first use): buffered writes of 100,000 rows x 1,000 draws (500 MB)
    # took 0.95 s of kernel CPU from the computation, 0.1 s with each block written back and
    # dropped.
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(descriptor)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def _compressors(dtype: Any, compress_floats: bool) -> tuple[BloscCodec, ...]:
    """Blosc-zstd with bit-shuffling for integer arrays; float arrays uncompressed unless
    ``compress_floats`` (then Blosc-lz4 with bit-shuffling)."""
    # Measured on 2 cores, 10 blocks of 1,000 draws x 10,000 rows, CPU of the writes: float32
    # probabilities compress only 1.22x (zstd level 1 and lz4 alike), and cost 0.1 s
    # uncompressed, 0.5-0.6 s with lz4 and 0.9-1.5 s with zstd, taken from the computation that
    # runs beside the writer; int8 Bernoulli draws compress 7.9x with zstd for 0.1 s.
    kind = np.dtype(dtype).kind
    if kind in "fc":
        return (BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle"),) if compress_floats else ()
    return (BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"),)


def _one_codec_thread() -> None:
    """Encode blocks on one zarr thread unless the user configured zarr's thread pool.

    zarr's default pool has a thread per core and more; while the devices (XLA on the CPU)
    keep every core busy, those threads only take turns with the computation. zarr reads the
    setting when it creates its pool, on first use.
    """
    # Measured on 2 cores, 100,000 rows x 1,000 draws: 8.0-8.5 s with one codec thread,
    # 10.0-10.4 s with the default pool.
    if zarr.config.get("threading.max_workers", None) is None:
        zarr.config.set({"threading.max_workers": 1})


# -- several processes, one store ------------------------------------------------------------------


def require_shareable(output_dir: Any, resume: bool) -> None:
    """Refuse, in a run of several processes, what one shared store cannot do:
    ``output_dir=None`` (each process would get a scratch directory of its own) and
    ``resume=True`` (several writers do not record their progress batch by batch)."""
    processes = jax.process_count()
    if processes > 1 and output_dir is None:
        raise ConfigurationError(
            f"this run has {processes} processes, which write one store together: pass output_dir, a directory "
            "every process reaches (output_dir=None would give each process a scratch directory of its own)."
        )
    if processes > 1 and resume:
        raise ConfigurationError(
            f"resume=True is not supported with {processes} processes (their progress is not recorded batch by "
            "batch): delete the interrupted store and predict again."
        )


def choose_store_path(parent: Path, *, resume: bool) -> Path:
    """The store to write in ``parent``: with ``resume``, its newest incomplete one; else a new
    timestamped ``predict-*`` name, process 0's in every process (a collective)."""
    if resume:
        candidates = sorted(p for p in parent.glob("predict-*") if p.is_dir())
        incomplete = [p for p in candidates if not zarr.open_group(p, mode="r").attrs.get(COMPLETE, True)]
        if not incomplete:
            raise ConfigurationError(f"resume=True but {str(parent)!r} holds no interrupted store.")
        return incomplete[-1]
    parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S%f")
    return parent / str(allgather_json(f"predict-{stamp}")[0])  # process 0's name in every process


def process_rows(mesh: Mesh, batch: int) -> tuple[int, int]:
    """``(first, last)``: the rows of every ``batch``-row batch this process's devices hold and
    write, one block of the store (all of them in a single-process run)."""
    if jax.process_count() == 1:
        return 0, batch
    indices = batch_sharding(mesh).addressable_devices_indices_map((batch,)).values()
    spans = sorted({index[0].indices(batch)[:2] for index in indices})
    expected = batch // jax.process_count()
    held = sum(stop - start for start, stop in spans)  # the devices' parts are disjoint
    if not spans or held != expected or spans[-1][1] - spans[0][0] != expected:
        raise ConfigurationError(
            f"with {jax.process_count()} processes each must hold one contiguous part of {expected} rows of every "
            f"{batch}-row batch; this one holds the rows {spans}. Use a mesh of the same number of devices of every "
            "process, grouped by process: make_mesh() (every device) is one."
        )
    return spans[0][0], spans[-1][1]


def _failed_processes(ok: bool) -> list[int]:
    """The processes that passed ``ok=False`` (a collective: every process calls it)."""
    return [index for index, flag in enumerate(allgather_json(ok)) if not flag]


def open_shared_store(
    path: Path,
    specs: Sequence[ArraySpec],
    batch: int,
    attrs: Mapping[str, Any],
    resume: bool,
    whole: Mapping[tuple[str, str], Any],
    compress_floats: bool,
    group_attrs: Mapping[str, Mapping[str, Any]] | None = None,
) -> ZarrStore:
    """The store (created, or resumed by a single process; its groups given ``group_attrs``)
    with the arrays ``whole`` written.
    With several processes, process 0 creates it and the others open it once it exists; every
    process raises when one of them could not (a collective)."""
    processes, index = jax.process_count(), jax.process_index()
    if processes == 1:
        store = ZarrStore(
            path, specs, batch_size=batch, attrs=attrs, group_attrs=group_attrs, resume=resume,
            compress_floats=compress_floats,
        )  # fmt: skip
        try:
            store.write_whole(whole)
        except BaseException:
            store.abort()
            raise
        return store
    store, error = None, None
    if index == 0:
        try:
            store = ZarrStore(
                path, specs, batch_size=batch, attrs=attrs, group_attrs=group_attrs, writers=processes,
                compress_floats=compress_floats,
            )  # fmt: skip
            store.write_whole(whole)
        except Exception as caught:
            error = caught
    if _failed_processes(error is None):  # also the barrier: the store exists after it
        if store is not None:
            store.abort()
        raise error or StoreError(f"process 0 could not create the store {str(path)!r}; see its error.")
    if index != 0:
        try:
            store = ZarrStore(path, specs, batch_size=batch, writers=processes, join=True)
        except Exception as caught:
            error = caught
    failed = _failed_processes(error is None)
    if failed:
        if store is not None:
            store.abort()
        raise error or StoreError(
            f"process(es) {failed} could not open the store {str(path)!r} that process 0 created: output_dir "
            "must be a directory every process reaches (a shared file system)."
        )
    assert store is not None
    return store


def finalize_shared_store(store: ZarrStore, failure: BaseException | None) -> None:
    """Mark the store complete (process 0), once every process has written all its rows; in
    every process, return only when the store is complete. ``failure``: this process's failed
    write, if any (a collective)."""
    if jax.process_count() == 1:
        store.finalize()
        return
    try:
        store.flush()
    except Exception as error:
        failure = failure or error
    failed = _failed_processes(failure is None)
    if failed:
        raise failure or StoreError(
            f"process(es) {failed} could not write their rows of {str(store.path)!r}; it stays incomplete."
        )
    if jax.process_index() == 0:
        try:
            store.finalize()
        except Exception as error:
            failure = error
    if _failed_processes(failure is None):  # also the barrier: the store is complete after it
        raise failure or StoreError(f"process 0 could not mark {str(store.path)!r} complete; see its error.")
