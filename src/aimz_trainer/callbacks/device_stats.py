"""DeviceStatsMonitor: the memory of each local device, and of the host process, logged to
every logger."""

from __future__ import annotations

import os
import resource
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from aimz_trainer.callbacks.base import Callback
from aimz_trainer.plan import Every

if TYPE_CHECKING:
    from aimz_trainer.callbacks.context import FitContext, FitProgress

__all__ = ["DEVICE_MEMORY_STATS", "DeviceStatsMonitor", "device_memory", "host_memory"]

# What an accelerator's allocator reports (``Device.memory_stats()``) that is worth a curve:
# the memory held now, the most held so far, and what the allocator may hold at most.
DEVICE_MEMORY_STATS = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")


def host_memory() -> dict[str, float]:
    """This process's memory in bytes: ``rss_bytes`` now (where ``/proc`` tells it: Linux) and
    ``peak_rss_bytes`` (the most it held, from ``getrusage``).

    Example:
        >>> memory = host_memory()
        >>> memory["peak_rss_bytes"] > 0
        True
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    memory = {"peak_rss_bytes": float(peak if sys.platform == "darwin" else peak * 1024)}  # macOS: bytes; else KiB
    try:
        with open("/proc/self/statm", "rb") as statm:  # pages: size, resident, ...
            memory["rss_bytes"] = float(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return memory  # no /proc here: the peak alone
    # The kernel updates its high-water mark lazily: it can trail the current size.
    memory["peak_rss_bytes"] = max(memory["peak_rss_bytes"], memory["rss_bytes"])
    return memory


def device_memory(device: Any) -> dict[str, float]:
    """The :data:`DEVICE_MEMORY_STATS` that ``device``'s allocator reports, in bytes; empty
    where it reports none (CPU devices: their arrays are the process's memory, see
    :func:`host_memory`).

    Example:
        >>> import jax
        >>> sorted(device_memory(jax.devices()[0])) in ([], sorted(DEVICE_MEMORY_STATS))
        True
    """
    try:
        stats = device.memory_stats()
    except RuntimeError:  # a backend without the query raises (XlaRuntimeError) instead of returning None
        return {}
    return {key: float(stats[key]) for key in DEVICE_MEMORY_STATS if stats and key in stats}


class DeviceStatsMonitor(Callback):
    """Logs memory through ``fit.log``, so every logger records it:

    - ``device_stats/<device>/<stat>`` for each of this process's devices whose allocator
      reports memory (GPUs, TPUs): :data:`DEVICE_MEMORY_STATS` (``bytes_in_use``,
      ``peak_bytes_in_use``, ``bytes_limit`` where the backend has them); ``<device>`` is the
      platform and id, e.g. ``gpu0``;
    - ``device_stats/host/rss_bytes`` and ``device_stats/host/peak_rss_bytes``: the process's
      resident memory now and at most (:func:`host_memory`), which is where a CPU device's
      arrays live (CPU devices report no memory of their own).

    Cadence: at the start of a fresh fit (after compilation and data placement: the baseline,
    at step 0; a resumed fit's logs have it already) and at every chunk that ends on a logging
    step (a multiple of the Trainer's ``log_every_n_steps``). Reading the allocators' counters
    is a host call: no device work and no sync. Only process 0 writes, so a multi-process fit
    records process 0's devices.

    Example:
        >>> from aimz_trainer import Trainer
        >>> trainer = Trainer(max_epochs=1, callbacks=[DeviceStatsMonitor()], enable_progress_bar=False)
    """

    def on_fit_start(self, fit: FitContext, progress: FitProgress) -> None:
        if progress.step == 0:
            self._log(fit)

    def on_train_chunk_end(self, fit: FitContext, progress: FitProgress, losses: np.ndarray, steps: range) -> None:
        if Every(steps=fit.log_every_n_steps).at_step(steps.stop):
            self._log(fit)

    def _log(self, fit: FitContext) -> None:
        values = {f"device_stats/host/{name}": value for name, value in host_memory().items()}
        for device in fit.mesh.local_devices:
            for name, value in device_memory(device).items():
                values[f"device_stats/{device.platform}{device.id}/{name}"] = value
        fit.log_dict(values)
