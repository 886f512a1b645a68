"""Python's string hash seed, fixed for the processes this library starts.

Light on purpose (the standard library only): the ``aimz-trainer`` command consults it before
it imports anything else, and starts over with the seed fixed when it is not.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["HASH_SEED", "with_fixed_hash_seed"]

HASH_SEED = "PYTHONHASHSEED"


def with_fixed_hash_seed(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` with ``PYTHONHASHSEED`` set: kept when it is set, else ``"0"``.

    Python's string hashing decides the order in which JAX lowers some of a model's constants,
    and XLA fuses (and so rounds) the float sums of the step differently for each order. Two
    processes with random hash seeds can therefore compute a loss that differs in its last bits:
    a resumed fit would no longer continue bit for bit, and the processes of one run would hold
    slightly different copies of the parameters. The seed only takes effect when a process
    starts, so it is set where processes are started:
    :func:`~aimz_trainer.distributed.launch` and the ``aimz-trainer`` command
    (:mod:`aimz_trainer.console`).

    Example:
        >>> with_fixed_hash_seed({"HOME": "/root"})
        {'HOME': '/root', 'PYTHONHASHSEED': '0'}
        >>> with_fixed_hash_seed({"PYTHONHASHSEED": "7"})
        {'PYTHONHASHSEED': '7'}
    """
    return {**environ, HASH_SEED: environ.get(HASH_SEED, "0")}
