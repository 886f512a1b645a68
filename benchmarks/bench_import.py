"""Import benchmark: what compiled bytecode saves every process that imports the library.

Every process of the project (the ``aimz-trainer`` command, a recipe, each test's subprocess)
starts by importing ``aimz_trainer``, hence jax and numpyro (and, as a fit goes, optax, orbax
and grain). Python keeps the bytecode it compiles from them in ``__pycache__`` folders, unless
it is told not to write it (``PYTHONDONTWRITEBYTECODE=1``, common on shared machines and set on
ours) and the installer wrote none: then every process compiles them again. ``./dev`` installs
with ``UV_COMPILE_BYTECODE=1`` for that reason.

Measured here, in the same run, each in fresh subprocesses (interleaved, ``--repeats`` times,
medians), the time of ``import aimz_trainer`` alone (not the interpreter's start):

- **compiled**: bytecode for every module present (Python's cache redirected by
  ``PYTHONPYCACHEPREFIX`` to a folder filled by one warm-up import: the same files an install
  with compiled bytecode writes);
- **no_bytecode**: none present and none written (``PYTHONPYCACHEPREFIX`` to an empty folder,
  ``PYTHONDONTWRITEBYTECODE=1``): what a venv installed without compiled bytecode costs every
  process;
- **as_installed**: this interpreter's environment as it is (``./dev``'s ``.venv`` when run from
  there), with ``PYTHONDONTWRITEBYTECODE=1``: shows whether it was installed with bytecode;
- **jax_numpyro**: ``import jax, numpyro`` alone, compiled: what the library cannot avoid.
  ``beyond_jax_numpyro_s`` (the median over the repeats of compiled - jax_numpyro, measured one
  after the other) is what the library adds to it: the libraries only some runs use (orbax,
  Grain, TensorBoard's writer, xarray, ...) are imported where first needed, so it stays small.

``slowest_imports`` lists the modules whose import took longest, their own imports included
(``python -X importtime``, compiled, one more import): where to look when it grows.

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
import re
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

PROBE = "import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
BASELINE = "jax, numpyro"
# A line of ``-X importtime``: "import time: <self us> | <cumulative us> | <indent><module>".
IMPORTTIME_LINE = re.compile(r"import time:\s*(\d+) \|\s*(\d+) \| *(\S+)")


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


def slowest_imports(module: str, env: Mapping[str, str], count: int = 10) -> list[tuple[str, float]]:
    """The ``count`` modules whose import took longest (seconds, their own imports included)
    in one ``import module`` under ``python -X importtime``."""
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        env=dict(env),
        capture_output=True,
        text=True,
        check=True,
    )
    cumulative = [(m[3], int(m[2]) / 1e6) for m in map(IMPORTTIME_LINE.match, completed.stderr.splitlines()) if m]
    return [(name, round(seconds, 3)) for name, seconds in sorted(cumulative, key=lambda item: -item[1])[:count]]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    base = {key: value for key, value in os.environ.items() if key != "PYTHONPYCACHEPREFIX"}
    with tempfile.TemporaryDirectory() as compiled_cache, tempfile.TemporaryDirectory() as empty_cache:
        # One import that may write: it fills the compiled cache with every module's bytecode.
        import_seconds(args.module, {**base, "PYTHONPYCACHEPREFIX": compiled_cache, "PYTHONDONTWRITEBYTECODE": ""})
        compiled = {**base, "PYTHONPYCACHEPREFIX": compiled_cache, "PYTHONDONTWRITEBYTECODE": "1"}
        # (module imported, environment) of each kind; jax_numpyro right after compiled, so that
        # each repeat's difference of the two sees the same load on the machine.
        kinds = {
            "compiled": (args.module, compiled),
            "jax_numpyro": (BASELINE, compiled),
            "no_bytecode": (args.module, {**base, "PYTHONPYCACHEPREFIX": empty_cache, "PYTHONDONTWRITEBYTECODE": "1"}),
            "as_installed": (args.module, {**base, "PYTHONDONTWRITEBYTECODE": "1"}),
        }
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        for repeat in range(args.repeats):
            for kind, (module, env) in kinds.items():
                times[kind].append(import_seconds(module, env))
            print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()),
                  file=sys.stderr, flush=True)  # fmt: skip
        slowest = slowest_imports(args.module, compiled)
        assert not os.listdir(empty_cache), "the no-bytecode imports wrote bytecode"
    medians = {f"{kind}_s": round(statistics.median(values), 3) for kind, values in times.items()}
    differences = [ours - alone for ours, alone in zip(times["compiled"], times["jax_numpyro"], strict=True)]
    figures = {
        "benchmark": "import",
        "module": args.module,
        "python": platform.python_version(),
        "repeats": args.repeats,
        **medians,
        "ratio": round(medians["no_bytecode_s"] / medians["compiled_s"], 2),
        "beyond_jax_numpyro_s": round(statistics.median(differences), 3),
        "slowest_imports": slowest,
    }
    print(json.dumps(figures), flush=True)
    return figures


if __name__ == "__main__":
    main()
