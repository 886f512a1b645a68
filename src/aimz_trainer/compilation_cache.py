"""The persistent compilation cache: the compiled programs of a run, kept on disk for the next.

A short run is mostly compilation (a small fit on a CPU spends most of its seconds compiling
its programs). JAX can keep compiled programs in a directory and read them back in the next
process instead of compiling again; :func:`use_compilation_cache`, which every entry point calls
(``Trainer``, ``Predictor``, ``ImpactModel``, and through them the command and the recipes),
turns that on. Importing an entry point calls it too, as the environment says: what a script
compiles before it builds one (a network's initialisation, eager operations on its data) is read
back by the next process as well; the entry point's ``compilation_cache`` argument then moves
the cache or turns it off for what follows.

- where: ``<user cache dir>/aimz_trainer/jax-<jax version>``, the user cache dir being
  ``$XDG_CACHE_HOME`` or ``~/.cache`` on Linux, ``~/Library/Caches`` on macOS,
  ``%LOCALAPPDATA%`` on Windows. Created private (mode 0700). A directory that another user
  owns, or that group or others can write to, is not used (a :class:`PerformanceWarning` says
  why): what the cache holds is code this process runs.
- who decides: a cache the user set through JAX itself (``JAX_COMPILATION_CACHE_DIR``, or
  ``jax.config.update("jax_compilation_cache_dir", ...)`` before the entry point) is left as it
  is, with JAX's own settings. Otherwise the entry point's ``compilation_cache`` argument
  (``True``, the default: ours; ``False``: none; a path: that directory), and when it is
  ``True``, the environment variable ``AIMZ_TRAINER_COMPILATION_CACHE`` (``0``, ``off``,
  ``false`` or ``no``: none; a path: that directory).
- how big: at most :data:`DEFAULT_MAX_BYTES` (JAX's ``JAX_COMPILATION_CACHE_MAX_SIZE``, in
  bytes, sets another bound): JAX evicts the least recently used programs when a new one would
  pass it. JAX's bound needs the ``filelock`` package; without it, the least recently written
  programs past the bound are removed when the cache is turned on.
- several processes at once: with ``filelock``, JAX reads and writes the entries under a lock
  file in the directory, so a process never reads a half-written entry. Without it, a program
  is written by one ``write`` call and a process that reads one being written fails to
  decompress it, warns, and compiles instead: never a wrong program. Only process 0 of a
  multi-process run writes (JAX's rule); each host reads its own user's directory, so the other
  hosts of a multi-host run gain from the cache only when the user points every host at one
  shared directory (``compilation_cache="/shared/path"``, or ``JAX_COMPILATION_CACHE_DIR``).

Which programs are kept: all of them (:data:`MIN_COMPILE_SECONDS`): even the tiny ones a run
compiles by the dozen are read back faster than they compile.

A program's cache key is its text, which is the same in every process: the one place where a
fit's programs followed ``PYTHONHASHSEED``, NumPyro's ELBO, is traced in a fixed order
(:func:`aimz_trainer.step.independent_of_hash_seed`).
"""

from __future__ import annotations

import importlib.util
import os
import stat
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from aimz_trainer.errors import PerformanceWarning

__all__ = ["DEFAULT_MAX_BYTES", "ENV_VAR", "MIN_COMPILE_SECONDS", "CompilationCache", "use_compilation_cache"]

CompilationCache = bool | str | os.PathLike
"""An entry point's ``compilation_cache`` argument: ``True`` (ours, or the environment's),
``False`` (none) or a directory."""

ENV_VAR = "AIMZ_TRAINER_COMPILATION_CACHE"
OFF = ("0", "off", "false", "no")
ON = ("", "1", "on", "true", "yes")
DEFAULT_MAX_BYTES = 2**30
"""1 GiB: the programs of some hundreds of fits (a small fit and prediction: 0.65 MB)."""
MIN_COMPILE_SECONDS = 0.0
"""Every program is kept. Measured on a 2-core CPU (a 3-site model, a 2-epoch fit with validation
and 20 posterior draws, then a prediction): 30 programs compiled in 8.2 s, 5 of them (training
chunk, validation, init, draws, prediction) 0.5-2.6 s each and 25 tiny ones (random keys,
eager operations) 0.01-0.19 s, 1.2 s together; the next process read each back in 1.5 ms (median;
0.3 s for all of them), so even the tiniest pays several times over, at ~3 KB on disk each. A threshold
above 0 would also leave the programs that compile in about that time cached in one process and
not in the next, as their compile time varies."""

_ours: Path | None = None  # the directory this module set in JAX's config, if any
_explicit = False  # whether a call chose with False or a path: later default calls keep that


def use_compilation_cache(setting: CompilationCache = True, environ: Mapping[str, str] | None = None) -> Path | None:
    """Turn JAX's persistent compilation cache on (or off, or move it) as ``setting`` and the
    environment say; returns the directory in use (``None``: no cache). Cheap when nothing
    changes, so every entry point calls it.

    Args:
        setting: ``True``: what an earlier ``False`` or path of this process chose, else the
            directory ``AIMZ_TRAINER_COMPILATION_CACHE`` names, else the default one (see the
            module's description); ``False``: none; a path: that directory. A cache set through
            JAX itself wins over all of them.
        environ: the environment (default: ``os.environ``).

    Example:
        >>> directory = use_compilation_cache()
        >>> directory is None or directory.is_dir()
        True
    """
    global _ours, _explicit
    environ = os.environ if environ is None else environ
    current = jax.config.jax_compilation_cache_dir
    if environ.get("JAX_COMPILATION_CACHE_DIR") or (current is not None and Path(current) != _ours):
        return Path(current or environ["JAX_COMPILATION_CACHE_DIR"])  # the user's: left alone
    if setting is True and _explicit:
        return _ours  # ImpactModel(compilation_cache=False)'s own Trainer and Predictor keep it off
    _explicit = setting is not True
    wanted = requested_directory(setting, environ)
    if wanted == _ours:
        return wanted
    problem = None if wanted is None else private_directory_problem(wanted)
    if problem is not None:
        warnings.warn(
            f"the compilation cache {wanted} is not used: {problem}. Its programs would run in this process. "
            f"Programs compile anew; pass compilation_cache=False or set {ENV_VAR}=0 to go without a cache, or "
            "name a private directory.",
            PerformanceWarning,
            stacklevel=3,
        )
        wanted = None
    if _ours is not None:
        jax_cache.reset_cache()  # JAX opens its cache once; a new directory needs a new one
    jax.config.update("jax_compilation_cache_dir", None if wanted is None else str(wanted))
    _ours = wanted
    if wanted is not None:
        bound = bounded(wanted, environ)
        set_unless_user_set("jax_compilation_cache_max_size", bound, environ)
        set_unless_user_set("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS, environ)
    return wanted


def requested_directory(setting: CompilationCache, environ: Mapping[str, str]) -> Path | None:
    """The directory ``setting`` asks for (``None``: no cache).

    Example:
        >>> requested_directory(True, {"AIMZ_TRAINER_COMPILATION_CACHE": "off"}) is None
        True
        >>> requested_directory("/tmp/c", {"AIMZ_TRAINER_COMPILATION_CACHE": "/elsewhere"})
        PosixPath('/tmp/c')
    """
    if setting is False:
        return None
    if setting is not True:
        return Path(setting).expanduser()
    value = environ.get(ENV_VAR, "").strip()
    if value.lower() in OFF:
        return None
    if value.lower() in ON:
        return default_directory(environ)
    return Path(value).expanduser()


def default_directory(environ: Mapping[str, str], platform: str = sys.platform) -> Path:
    """``<user cache dir>/aimz_trainer/jax-<version>``: per user and per JAX version (another
    version cannot read the programs).

    Example:
        >>> default_directory({"XDG_CACHE_HOME": "/scratch/me"}, "linux").parent
        PosixPath('/scratch/me/aimz_trainer')
    """
    home = Path(environ.get("HOME") or Path.home())
    if platform == "darwin":
        root = home / "Library" / "Caches"
    elif platform == "win32":
        root = Path(environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    else:
        xdg = environ.get("XDG_CACHE_HOME", "")
        root = Path(xdg) if os.path.isabs(xdg) else home / ".cache"  # a relative one is to be ignored (XDG)
    return root / "aimz_trainer" / f"jax-{jax.__version__}"


def private_directory_problem(directory: Path) -> str | None:
    """Create ``directory`` (mode 0700) unless it exists; why it must not hold the cache, or
    ``None`` when it is this user's own and only this user can write to it."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = directory.stat()
    except OSError as error:
        return f"it cannot be created ({error})"
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a directory"
    if os.name != "posix":
        return None  # no owner and mode bits to check
    if info.st_uid != os.getuid():
        return f"it belongs to another user (uid {info.st_uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"group or others can write to it (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def bounded(directory: Path, environ: Mapping[str, str]) -> int:
    """The size bound to give JAX: the user's ``JAX_COMPILATION_CACHE_MAX_SIZE``, else
    :data:`DEFAULT_MAX_BYTES`; ``-1`` (none: JAX's bound needs ``filelock``) after removing the
    least recently written entries past the bound."""
    bound = int(environ.get("JAX_COMPILATION_CACHE_MAX_SIZE", DEFAULT_MAX_BYTES))
    if bound < 0 or importlib.util.find_spec("filelock") is not None:
        return bound
    trim(directory, bound)
    return -1


def trim(directory: Path, max_bytes: int) -> None:
    """Remove the least recently written entries of a JAX cache ``directory`` until the rest
    take at most ``max_bytes``. An entry another process removes meanwhile is skipped."""
    entries = []
    for path in directory.glob("*-cache"):
        try:
            info = path.stat()
        except FileNotFoundError:
            continue
        entries.append((info.st_mtime_ns, info.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= max_bytes:
            break
        path.unlink(missing_ok=True)
        path.with_name(path.name.removesuffix("-cache") + "-atime").unlink(missing_ok=True)
        total -= size


def set_unless_user_set(flag: str, value: float, environ: Mapping[str, str]) -> None:
    """``jax.config.update(flag, value)`` unless the environment sets the flag (JAX reads
    ``FLAG_NAME`` at import)."""
    if flag.upper() not in environ:
        jax.config.update(flag, value)
