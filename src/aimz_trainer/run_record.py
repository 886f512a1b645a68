"""What a run directory records about the run, before it trains: the resolved config
(``config.yaml``) and, in ``run.json``, every launch's command line, versions and device and
process layout; and the config flattened into the hyperparameters TensorBoard shows.

``config.yaml`` is the config of the latest launch, complete (``aimz-trainer fit --config
<run dir>/config.yaml`` reruns it; ``... --ckpt_path last`` continues it); ``run.json`` keeps one
entry per launch (a resume adds one), so the history of a run that was continued with changed
settings is not lost.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from aimz_trainer._version import library_version

__all__ = ["CONFIG_FILE", "RUN_FILE", "flat_hparams", "layout", "versions", "write_run_record"]

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
# The distributions whose versions decide what a run computes.
DEPENDENCIES = (
    "jax",
    "jaxlib",
    "numpyro",
    "flax",
    "optax",
    "grain",
    "orbax-checkpoint",
    "numpy",
    "zarr",
    "xarray",
    "tensorboardX",
    "jsonargparse",
)


def versions() -> dict[str, str]:
    """Python's, the library's and its main dependencies' versions (``"not installed"`` for an
    optional one that is missing).

    Example:
        >>> sorted(versions())[:3]
        ['aimz-trainer', 'flax', 'grain']
    """
    found = {"aimz-trainer": library_version(), "python": platform.python_version()}
    for name in DEPENDENCIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def layout() -> dict[str, Any]:
    """This process's place in the run and the devices it sees (initializes JAX's backend).

    Example:
        >>> layout()["process_count"]
        1
    """
    devices = jax.devices()
    return {
        "host": socket.gethostname(),
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "local_device_count": jax.local_device_count(),
        "python_hash_seed": os.environ.get("PYTHONHASHSEED"),
    }


def write_run_record(output_dir: Path, config_yaml: str, argv: Sequence[str]) -> None:
    """Write ``config.yaml`` (replaced) and add this launch to ``run.json`` in ``output_dir``.

    Call it in process 0 only (every process would write the same files).

    Example:
        >>> import tempfile
        >>> run = Path(tempfile.mkdtemp())
        >>> write_run_record(run, "seed: 0\\n", ["aimz-trainer", "fit", "--seed", "0"])
        >>> sorted(json.loads((run / "run.json").read_text())["launches"][0])
        ['command', 'cwd', 'layout', 'started', 'versions']
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    record_path = output_dir / RUN_FILE
    launches: list[Any] = []
    if record_path.is_file():
        try:
            launches = list(json.loads(record_path.read_text())["launches"])
        except (ValueError, KeyError, TypeError):  # a damaged record: start it again, keep the config
            launches = []
    launches.append(
        {
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": list(argv),
            "cwd": os.getcwd(),
            "versions": versions(),
            "layout": layout(),
        }
    )
    _write_atomically(output_dir / CONFIG_FILE, config_yaml)
    _write_atomically(record_path, json.dumps({"launches": launches}, indent=2) + "\n")


def _write_atomically(path: Path, text: str) -> None:
    """A reader never sees half a file: written beside, then renamed over."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)


def flat_hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """The config as TensorBoard hyperparameters: nested keys joined with ``.``, list items by
    index, ``None`` left out (TensorBoard has no null), other values as strings.

    Example:
        >>> flat_hparams({"model": {"hidden": 32, "rows": None}, "trainer": {"callbacks": [{"x": 1}]}})
        {'model.hidden': 32, 'trainer.callbacks.0.x': 1}
    """
    flat: dict[str, bool | int | float | str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, list | tuple):
            flat.update(flat_hparams({str(index): item for index, item in enumerate(value)}, f"{name}."))
        elif value is None:
            continue
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
