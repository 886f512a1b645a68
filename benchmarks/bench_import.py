"""Import benchmark: what compiled bytecode saves every process that imports the library.

Every process of the project (the ``aimz-trainer`` command, a recipe, each test's subprocess)
starts by importing ``aimz_trainer``, hence jax, numpyro, flax, optax, orbax and grain. Python
keeps the bytecode it compiles from them in ``__pycache__`` folders, unless it is told not to
write it (``PYTHONDONTWRITEBYTECODE=1``, common on shared machines and set on ours) and the
installer wrote none: then every process compiles them again. ``./dev`` installs with
``UV_COMPILE_BYTECODE=1`` for that reason.

Measured here, in the same run, each in fresh subprocesses (interleaved, ``--repeats`` times,
medians), the time of ``import aimz_trainer`` alone (not the interpreter's start):

- **compiled**: bytecode for every module present (Python's cache redirected by
  ``PYTHONPYCACHEPREFIX`` to a folder filled by one warm-up import: the same files an install
  with compiled bytecode writes);
- **no_bytecode**: none present and none written (``PYTHONPYCACHEPREFIX`` to an empty folder,
  ``PYTHONDONTWRITEBYTECODE=1``): what a venv installed without compiled bytecode costs every
  process;
- **as_installed**: this interpreter's environment as it is (``./dev``'s ``.venv`` when run from
  there), with ``PYTHONDONTWRITEBYTECODE=1``: shows whether it was installed with bytecode.

Run it from the repository root::

    .venv/bin/python benchmarks/bench_import.py [--repeats 5] [--module aimz_trainer]

It prints one JSON line on stdout (seconds, and ``ratio``: no_bytecode / compiled); progress
goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

PROBE = "import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="imports of each kind (medians reported)")
    parser.add_argument("--module", default="aimz_trainer", help="the module to import")
    return parser.parse_args(argv)


def import_seconds(module: str, env: Mapping[str, str]) -> float:
    """The time ``import module`` takes in a fresh interpreter with ``env``."""
    completed = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module)], env=dict(env), capture_output=True, text=True, check=True
    )
    return float(completed.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    base = {key: value for key, value in os.environ.items() if key != "PYTHONPYCACHEPREFIX"}
    with tempfile.TemporaryDirectory() as compiled_cache, tempfile.TemporaryDirectory() as empty_cache:
        # One import that may write: it fills the compiled cache with every module's bytecode.
        import_seconds(args.module, {**base, "PYTHONPYCACHEPREFIX": compiled_cache, "PYTHONDONTWRITEBYTECODE": ""})
        kinds = {
            "compiled": {**base, "PYTHONPYCACHEPREFIX": compiled_cache, "PYTHONDONTWRITEBYTECODE": "1"},
            "no_bytecode": {**base, "PYTHONPYCACHEPREFIX": empty_cache, "PYTHONDONTWRITEBYTECODE": "1"},
            "as_installed": {**base, "PYTHONDONTWRITEBYTECODE": "1"},
        }
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        for repeat in range(args.repeats):
            for kind, env in kinds.items():
                times[kind].append(import_seconds(args.module, env))
            print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
                  file=sys.stderr, flush=True)  # fmt: skip
        assert not os.listdir(empty_cache), "the no-bytecode imports wrote bytecode"
    medians = {f"{kind}_s": round(statistics.median(values), 3) for kind, values in times.items()}
    figures = {
        "benchmark": "import",
        "module": args.module,
        "python": platform.python_version(),
        "repeats": args.repeats,
        **medians,
        "ratio": round(medians["no_bytecode_s"] / medians["compiled_s"], 2),
    }
    print(json.dumps(figures), flush=True)
    return figures


if __name__ == "__main__":
    main()
