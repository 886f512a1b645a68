"""Reading a prediction store back: only a complete one, and only as the values written.

A store is complete once its root group's :data:`COMPLETE` attribute is true, which its writer
(:class:`~aimz_trainer.store.ZarrStore`) sets last; :data:`ROWS_WRITTEN` records how many rows
an interrupted one holds. :func:`open_store` and :func:`verify_store` refuse an incomplete store.

Every block of a store is written, even one equal to the fill value, so a block that is not
there was lost, never left out. Zarr reads a missing block as the fill value (0 or NaN: a
Bernoulli outcome, a "not computed"); the stores here are opened on a
:class:`VerifyingStore`, a :class:`zarr.storage.LocalStore` that raises
:class:`~aimz_trainer.errors.StoreError` instead, naming the block, or the store when its
directory is gone (removed by ``cleanup()``, say, while a tree read from it was still in use),
and that checks each block's checksum before zarr decodes it. :func:`verify_store` reads every
block of a store and names the missing and the damaged ones; the writer reads back the written
blocks of a store it resumes the same way. (Error messages say "chunk", Zarr's word.)
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import xarray as xr
import zarr
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import LocalStore

from aimz_trainer.errors import ConfigurationError, StoreError

__all__ = ["COMPLETE", "ROWS_WRITTEN", "Chunks", "VerifyingStore", "check_chunks", "open_store", "verify_store"]

COMPLETE = "aimz_trainer_complete"
ROWS_WRITTEN = "aimz_trainer_rows_written"

Chunks = str | int | Mapping[str, Any] | None  # dask chunks as xarray.open_datatree takes them


def open_store(path: str | os.PathLike[str], *, chunks: Chunks = None) -> xr.DataTree:
    """Open a complete prediction store lazily as an ``xarray.DataTree``.

    Reading a block that is missing (deleted, or the whole store removed) or damaged (its
    checksum does not match) raises :class:`~aimz_trainer.errors.StoreError` naming it; no
    fill value stands in for it.

    Memory: nothing but the coordinates is read on opening. With ``chunks=None`` (default) the
    variables are xarray's lazy arrays: an operation on one (``.mean()``, ``.values``) reads
    all of it into memory at once, and a selection (``.isel(draw=0)``) reads only the blocks it
    touches. With ``chunks`` (needs ``dask``: ``pip install aimz-trainer[dask]``) they are dask
    arrays, and dask computes a reduction block by block: ``chunks={}`` gives one dask chunk per
    store block (at most about :data:`~aimz_trainer.store.BLOCK_BYTES`), ``"auto"`` or
    ``{"draw": 100}`` larger ones (see :func:`xarray.open_datatree`). Either way a read holds
    a whole block of the store at least.

    Args:
        path: the store's directory (``tree.attrs["store_path"]`` of a returned tree).
        chunks: ``None`` for lazy numpy-backed arrays, else dask chunks as
            :func:`xarray.open_datatree` takes them.

    Raises:
        StoreError: ``path`` is not a prediction store or is incomplete.
        ConfigurationError: ``chunks`` is given and dask is not installed.

    Example:
        >>> import tempfile
        >>> import numpy as np
        >>> from aimz_trainer.store import ArraySpec, ZarrStore
        >>> directory = tempfile.TemporaryDirectory()
        >>> path = f"{directory.name}/store"
        >>> spec = ArraySpec("predictions", "y", (1, 3, 4), np.dtype(np.float32), ("chain", "draw", "obs"), 2)
        >>> store = ZarrStore(path, [spec], batch_size=4)
        >>> store.write_batch(0, 4, {("predictions", "y"): np.ones((1, 3, 4), np.float32)})
        >>> store.finalize()
        >>> tree = open_store(path, chunks={})
        >>> type(tree["predictions"]["y"].data).__module__.split(".")[0], float(tree["predictions"]["y"].sum())
        ('dask', 12.0)
        >>> directory.cleanup()
    """
    check_chunks(chunks)
    root = _open_complete(path)
    return xr.open_datatree(root.store, engine="zarr", consolidated=True, zarr_format=3, chunks=chunks)


def check_chunks(chunks: Chunks) -> None:
    """Raise :class:`~aimz_trainer.errors.ConfigurationError` when ``chunks`` asks for dask
    arrays and dask is not installed (before a prediction computes anything)."""
    if chunks is not None and importlib.util.find_spec("dask") is None:
        raise ConfigurationError(
            f"chunks={chunks!r} reads the store into dask arrays, and dask is not installed: pip install dask "
            "(or aimz-trainer[dask]), or pass chunks=None for xarray's lazy arrays."
        )


def verify_store(path: str | os.PathLike[str]) -> int:
    """Read every block of the complete prediction store ``path``; return how many there are.

    Raises:
        StoreError: naming every missing block (deleted since it was written) and every
            damaged one (its crc32c checksum does not match its bytes), or saying that
            ``path`` is not a prediction store (or no longer exists) or is incomplete.

    Example:
        >>> import tempfile
        >>> import numpy as np
        >>> from aimz_trainer.store import ArraySpec, ZarrStore
        >>> from aimz_trainer.store_reading import verify_store
        >>> directory = tempfile.TemporaryDirectory()
        >>> path = f"{directory.name}/store"
        >>> spec = ArraySpec("posterior_predictive", "y", (1, 2, 5), np.dtype(np.int8), ("chain", "draw", "obs"), 2)
        >>> store = ZarrStore(path, [spec], batch_size=4)
        >>> store.write_batch(0, 4, {("posterior_predictive", "y"): np.ones((1, 2, 4), np.int8)})
        >>> store.write_batch(4, 5, {("posterior_predictive", "y"): np.ones((1, 2, 1), np.int8)})
        >>> store.finalize()
        >>> verify_store(path)
        2
        >>> directory.cleanup()
    """
    root = _open_complete(path)
    store: VerifyingStore = root.store
    arrays = [node for _, node in root.members(max_depth=None) if isinstance(node, zarr.Array)]
    keys = [key for array in arrays for key in _all_block_keys(array)]
    problems = {key: problem for key in keys if (problem := store.block_problem(key))}
    if problems:
        raise StoreError(_unreadable(store.root, problems))
    return len(keys)


def _all_block_keys(array: zarr.Array) -> list[str]:
    return [
        f"{array.path}/{array.metadata.encode_chunk_key(coords)}"
        for coords in itertools.product(*(range(n) for n in array.cdata_shape))
    ]


def _open_complete(path: str | os.PathLike[str]) -> zarr.Group:
    try:
        root = zarr.open_group(VerifyingStore(path, read_only=True), mode="r", zarr_format=3)
    except Exception as error:
        raise StoreError(f"{str(path)!r} is not a prediction store ({error}).") from error
    attrs = root.attrs
    if not attrs.get(COMPLETE, False):
        if attrs.get("writers", 1) > 1:
            raise StoreError(
                f"the prediction store {str(path)!r} is incomplete: one of the {attrs['writers']} processes "
                "writing it failed or was interrupted. Delete it and predict again."
            )
        raise StoreError(
            f"the prediction store {str(path)!r} is incomplete (its writing was interrupted after "
            f"{attrs.get(ROWS_WRITTEN, 0)} rows): continue it with predict(..., resume=True) or delete it."
        )
    return root


# A block's key under zarr v3's default encoding: "<array path>/c/<i>/<j>/...".
_BLOCK_KEY = re.compile(r"(?:(?P<array>.+)/)?c(?:/\d+)*")


class VerifyingStore(LocalStore):
    """A local zarr store that reads a block as its bytes as written, or raises.

    zarr reads a block its store does not have as the array's fill value, which is right for
    a block never written and wrong for a prediction store, every block of which is written:
    here a missing block raises :class:`~aimz_trainer.errors.StoreError`. So does a block whose
    crc32c checksum (the last codec of the arrays :class:`~aimz_trainer.store.ZarrStore`
    creates) does not match its bytes: zarr checks it again as it decodes, but its error could
    not say which block.
    """

    def __init__(self, root: str | os.PathLike[str], *, read_only: bool = False) -> None:
        super().__init__(Path(root), read_only=read_only)
        self._checksummed: dict[str, bool] = {}  # array path -> whether its blocks end in a crc32c

    def get_sync(
        self, key: str, *, prototype: BufferPrototype | None = None, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        return self._verified(key, super().get_sync(key, prototype=prototype, byte_range=byte_range), byte_range)

    async def get(
        self, key: str, prototype: BufferPrototype | None = None, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        return self._verified(key, await super().get(key, prototype, byte_range), byte_range)

    def block_problem(self, key: str) -> str | None:
        """``"missing"``, ``"damaged"`` or ``None`` (intact, or not a block) for ``key``."""
        return self._problem(key, super().get_sync(key), None)

    def _verified(self, key: str, value: Buffer | None, byte_range: ByteRequest | None) -> Buffer | None:
        problem = self._problem(key, value, byte_range)
        if problem is not None:
            raise StoreError(_unreadable(self.root, {key: problem}))
        return value

    def _problem(self, key: str, value: Buffer | None, byte_range: ByteRequest | None) -> str | None:
        block = _BLOCK_KEY.fullmatch(key)
        if block is None:
            return None  # metadata: zarr reads a missing document as "no such node"
        if value is None:
            return "missing"
        whole = byte_range is None  # a part of a block cannot be checked
        if whole and self._has_checksum(block["array"] or "") and not _checksum_matches(value.as_numpy_array()):
            return "damaged"
        return None

    def _has_checksum(self, array: str) -> bool:
        if array not in self._checksummed:
            document = json.loads((self.root / array / "zarr.json").read_bytes())
            codecs = document.get("codecs") or [{}]
            self._checksummed[array] = codecs[-1].get("name") == "crc32c"
        return self._checksummed[array]


def _checksum_matches(block: np.ndarray) -> bool:
    """Whether a block's last 4 bytes (the crc32c codec's, little-endian) are the checksum of
    the bytes before them."""
    return len(block) >= 4 and google_crc32c.value(block[:-4]) == int.from_bytes(block[-4:].tobytes(), "little")


_LISTED = 10  # blocks named in an error; the rest counted


def describe_block_problems(problems: Mapping[str, str]) -> str:
    named = [f"{key!r} ({problem})" for key, problem in itertools.islice(problems.items(), _LISTED)]
    more = f" and {len(problems) - _LISTED} more" if len(problems) > _LISTED else ""
    return f"{len(problems)} chunk(s) missing or damaged: {', '.join(named)}{more}"


def _unreadable(root: Path, problems: Mapping[str, str]) -> str:
    """Why the blocks ``problems`` of the store ``root`` cannot be read, and what to do."""
    if not root.is_dir():
        return (
            f"the prediction store {str(root)!r} no longer exists, so its values cannot be read: it was removed, "
            "by cleanup() of the Predictor or ImpactModel whose scratch directory held it (or at that process's "
            "exit), by a clean-up of the temporary directory, or by hand. Predict again; pass output_dir=... to "
            "keep a store until you delete it."
        )
    return (
        f"the prediction store {str(root)!r} cannot be read: {describe_block_problems(problems)}. Every chunk of a "
        "store is written, so a missing one was deleted since, and a damaged one (its crc32c checksum does not match "
        "its bytes) was changed on the disk; no fill value stands in for either. verify_store(path) names every one; "
        "predict again."
    )
