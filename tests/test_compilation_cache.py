"""The persistent compilation cache (aimz_trainer.compilation_cache): where it goes, who decides,
which directories it refuses, and that a run reads every program back, with the same results.

The test session has its own JAX cache (tests/conftest.py), which is "the user's" here: the
in-process tests set it aside while they run, the processes they start get an environment without
it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from aimz_trainer import compilation_cache
from aimz_trainer.compilation_cache import (
    DEFAULT_MAX_BYTES,
    default_directory,
    private_directory_problem,
    requested_directory,
    trim,
    use_compilation_cache,
)
from aimz_trainer.errors import PerformanceWarning

ROOT = Path(__file__).resolve().parent.parent
JAX_FLAGS = (
    "jax_compilation_cache_dir",
    "jax_compilation_cache_max_size",
    "jax_persistent_cache_min_compile_time_secs",
)


@pytest.fixture
def no_user_cache(monkeypatch):
    """This process as if the user had set no JAX cache and no entry point had run; put back
    after the test."""
    saved = {flag: getattr(jax.config, flag) for flag in JAX_FLAGS}
    monkeypatch.setattr(compilation_cache, "_ours", None)
    monkeypatch.setattr(compilation_cache, "_explicit", False)
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    jax_cache.reset_cache()
    for flag, value in saved.items():
        jax.config.update(flag, value)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


class TestWhere:
    def test_default_directory_per_platform(self):
        home = {"HOME": "/home/me"}
        version = f"jax-{jax.__version__}"
        assert default_directory(home, "linux") == Path("/home/me/.cache/aimz_trainer", version)
        assert default_directory({**home, "XDG_CACHE_HOME": "/fast"}, "linux") == Path("/fast/aimz_trainer", version)
        # XDG: a relative XDG_CACHE_HOME is to be ignored.
        assert default_directory({**home, "XDG_CACHE_HOME": "rel"}, "linux").parent == Path(
            "/home/me/.cache/aimz_trainer"
        )
        assert default_directory(home, "darwin") == Path("/home/me/Library/Caches/aimz_trainer", version)

    @pytest.mark.parametrize("value", ["0", "off", "False", "no"])
    def test_environment_variable_turns_it_off(self, value):
        assert requested_directory(True, {"AIMZ_TRAINER_COMPILATION_CACHE": value}) is None

    def test_environment_variable_moves_it_and_the_argument_wins(self, tmp_path):
        environ = {"AIMZ_TRAINER_COMPILATION_CACHE": str(tmp_path / "env"), "HOME": str(tmp_path)}
        assert requested_directory(True, environ) == tmp_path / "env"
        assert requested_directory(tmp_path / "arg", environ) == tmp_path / "arg"
        assert requested_directory(False, environ) is None
        assert requested_directory(True, {"AIMZ_TRAINER_COMPILATION_CACHE": "1", "HOME": "/h"}).is_relative_to("/h")


class TestPrivate:
    def test_created_private(self, tmp_path):
        directory = tmp_path / "a" / "cache"
        assert private_directory_problem(directory) is None
        assert directory.is_dir() and mode(directory) == 0o700

    @pytest.mark.parametrize("bits", [0o770, 0o707, 0o777])
    def test_group_or_other_writable_is_refused(self, tmp_path, bits):
        directory = tmp_path / "shared"
        directory.mkdir()
        directory.chmod(bits)
        assert "group or others can write to it" in private_directory_problem(directory)

    @pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="only root can give a folder away")
    def test_another_users_directory_is_refused(self, tmp_path):
        directory = tmp_path / "theirs"
        directory.mkdir(mode=0o700)
        os.chown(directory, os.getuid() + 4242, -1)
        assert "belongs to another user" in private_directory_problem(directory)

    def test_a_file_is_refused(self, tmp_path):
        (tmp_path / "file").write_text("")
        assert private_directory_problem(tmp_path / "file") is not None

    def test_refused_with_a_warning_and_no_cache(self, tmp_path, no_user_cache):
        directory = tmp_path / "shared"
        directory.mkdir(mode=0o777)
        directory.chmod(0o777)
        with pytest.warns(PerformanceWarning, match="group or others can write to it"):
            assert use_compilation_cache(directory, environ={}) is None
        assert jax.config.jax_compilation_cache_dir is None


class TestWhoDecides:
    def test_jax_config_of_the_user_wins(self, tmp_path):
        # conftest set the session's cache through jax.config: it stays, whatever is asked.
        users = jax.config.jax_compilation_cache_dir
        assert users is not None
        assert use_compilation_cache(tmp_path / "ours", environ={}) == Path(users)
        assert use_compilation_cache(False, environ={}) == Path(users)
        assert jax.config.jax_compilation_cache_dir == users and not (tmp_path / "ours").exists()

    def test_jax_environment_variable_of_the_user_wins(self, tmp_path, no_user_cache):
        environ = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "users")}
        assert use_compilation_cache(tmp_path / "ours", environ=environ) == tmp_path / "users"
        assert jax.config.jax_compilation_cache_dir is None and not (tmp_path / "ours").exists()

    def test_on_by_default_moved_and_off(self, tmp_path, no_user_cache):
        environ = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
        default = use_compilation_cache(environ=environ)
        assert default == tmp_path / "xdg" / "aimz_trainer" / f"jax-{jax.__version__}"
        assert jax.config.jax_compilation_cache_dir == str(default) and mode(default) == 0o700
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
        moved = {**environ, "AIMZ_TRAINER_COMPILATION_CACHE": str(tmp_path / "moved")}
        assert use_compilation_cache(environ=moved) == tmp_path / "moved"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "moved")
        assert use_compilation_cache(False, environ=environ) is None
        assert jax.config.jax_compilation_cache_dir is None

    def test_a_choice_holds_for_the_default_calls_after_it(self, tmp_path, no_user_cache):
        # ImpactModel(compilation_cache=False) builds its Trainer and Predictor with the default.
        assert use_compilation_cache(False, environ={}) is None
        assert use_compilation_cache(environ={"XDG_CACHE_HOME": str(tmp_path)}) is None
        assert use_compilation_cache(tmp_path / "there", environ={}) == tmp_path / "there"
        assert use_compilation_cache(environ={}) == tmp_path / "there"


class TestSize:
    def test_trim_removes_the_least_recently_written(self, tmp_path):
        for age, name in enumerate(["new", "middle", "old"]):
            entry = tmp_path / f"{name}-cache"
            entry.write_bytes(b"x" * 100)
            os.utime(entry, ns=(0, 10**9 * (10 - age)))
        (tmp_path / "old-atime").write_bytes(b"t")
        trim(tmp_path, 250)
        assert sorted(path.name for path in tmp_path.iterdir()) == ["middle-cache", "new-cache"]

    def test_bounded_by_default(self, tmp_path, no_user_cache):
        use_compilation_cache(tmp_path, environ={})
        try:
            import filelock  # noqa: F401  JAX's own bound needs it
        except ImportError:
            assert jax.config.jax_compilation_cache_max_size == -1  # trimmed by us instead
        else:
            assert jax.config.jax_compilation_cache_max_size == DEFAULT_MAX_BYTES


# -- whole runs in fresh processes -------------------------------------------------------------


def worker_env(cache_home: Path, hash_seed: str) -> dict[str, str]:
    """The test's environment without the session's JAX cache settings: the process decides as a
    user's would, in ``cache_home``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("JAX_", "AIMZ_TRAINER_"))}
    return {**env, "JAX_PLATFORMS": "cpu", "XDG_CACHE_HOME": str(cache_home), "PYTHONHASHSEED": hash_seed}


def start(out_dir: Path, cache_home: Path, hash_seed: str, *options: str) -> subprocess.Popen:
    out_dir.mkdir(parents=True)
    return subprocess.Popen(
        [sys.executable, "-m", "tests.compilation_cache_worker", str(out_dir), *options],
        cwd=ROOT,
        env=worker_env(cache_home, hash_seed),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def outputs(directory: Path) -> dict[str, bytes]:
    """The bytes of each array a worker wrote, by file name."""
    arrays = {path.name: np.load(path).tobytes() for path in directory.glob("*.npy")}
    assert "losses.npy" in arrays
    return arrays


def assert_same_outputs(first: Path, second: Path) -> None:
    first_arrays, second_arrays = outputs(first), outputs(second)
    assert sorted(first_arrays) == sorted(second_arrays)
    for name, values in first_arrays.items():
        assert values == second_arrays[name], name


@pytest.mark.slow
def test_a_warm_run_reads_every_program_back_with_the_same_results(tmp_path):
    # Under another hash seed: NumPyro's ELBO loops over a set of site names, which the trainer
    # traces in an order of its own (step.independent_of_hash_seed), so every program is the same.
    cache_home = tmp_path / "home"
    cold = finish(start(tmp_path / "cold", cache_home, hash_seed="1"))
    directory = cache_home / "aimz_trainer" / f"jax-{jax.__version__}"
    assert cold["cache_dir"] == str(directory) and mode(directory) == 0o700
    assert cold["hits"] == 0 and cold["misses"] > 0 and cold["compiled"] == cold["misses"]
    entries = sorted(directory.glob("*-cache"))
    # What the run compiled before its Trainer was built too (the cache is on from the import).
    assert any(entry.name.startswith("jit__truncated_normal-") for entry in entries)
    warm = finish(start(tmp_path / "warm", cache_home, hash_seed="2"))
    assert warm["misses"] == 0 and warm["hits"] == cold["misses"]
    assert warm["compiled"] == 0  # nothing compiled twice
    assert sorted(directory.glob("*-cache")) == entries
    assert_same_outputs(tmp_path / "cold", tmp_path / "warm")


@pytest.mark.slow
def test_two_processes_fill_one_empty_cache_at_once(tmp_path):
    # Under different hash seeds, which change nothing (see the test above).
    cache_home = tmp_path / "home"
    first, second = start(tmp_path / "a", cache_home, "2"), start(tmp_path / "b", cache_home, "3")
    outcomes = [finish(first), finish(second)]
    assert all(outcome["cache_dir"] == outcomes[0]["cache_dir"] for outcome in outcomes)
    assert_same_outputs(tmp_path / "a", tmp_path / "b")


@pytest.mark.slow
@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to choose from"
)
def test_a_program_read_back_computes_as_one_compiled_on_the_cores_of_the_process_that_runs_it(tmp_path):
    # XLA's CPU runtime splits a matrix product's sum over the threads it has, so on CPU a fit's
    # last bits follow the cores a process may use. A cache entry is the program, not its thread
    # count: read back by a process on 1 core, a program written by one on 2 computes as a
    # program compiled on 1 core does.
    filled = tmp_path / "filled"
    finish(start(tmp_path / "two_cores", filled, "0", "--dense", "--cores", "2"))
    finish(start(tmp_path / "one_core", tmp_path / "empty", "0", "--dense", "--cores", "1"))
    if outputs(tmp_path / "two_cores") == outputs(tmp_path / "one_core"):
        pytest.skip("this XLA computes the dense layer's fit to the same bits on 1 core as on 2")
    warm = finish(start(tmp_path / "warm_one_core", filled, "0", "--dense", "--cores", "1"))
    assert warm["misses"] == 0 and warm["compiled"] == 0 and warm["hits"] > 0
    assert_same_outputs(tmp_path / "one_core", tmp_path / "warm_one_core")
