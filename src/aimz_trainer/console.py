"""The ``aimz-trainer`` console script.

It runs :func:`aimz_trainer.cli.main` in a process whose hash seed is fixed
(:mod:`aimz_trainer.hash_seed`). ``PYTHONHASHSEED`` only takes effect when the interpreter
starts, so a process started without it replaces itself (``exec``, same arguments) with one
that has it, before it imports JAX or anything else it would then import twice.
"""

from __future__ import annotations

import os
import sys

from aimz_trainer.hash_seed import HASH_SEED, with_fixed_hash_seed

__all__ = ["command"]


def command() -> int:
    """The ``aimz-trainer`` command: :func:`aimz_trainer.cli.main` with the hash seed fixed."""
    if HASH_SEED not in os.environ:
        arguments = [sys.executable, "-m", "aimz_trainer.cli", *sys.argv[1:]]
        os.execve(sys.executable, arguments, with_fixed_hash_seed(os.environ))
    from aimz_trainer.cli import main

    return main()
