"""Multi-process runs over loopback: 2 processes x 2 CPU devices against 1 process x 4.

Every run is bounded by a timeout, so a hang fails the test instead of stalling CI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from aimz_trainer import distributed
from aimz_trainer.checkpoint import read_meta, resolve_checkpoint
from aimz_trainer.errors import ConfigurationError

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 180

pytestmark = [pytest.mark.slow, pytest.mark.multidevice]


def start(mode: str, directory: Path, num_processes: int, local_devices: int) -> list[subprocess.Popen]:
    port = distributed.free_port()
    processes = []
    for rank in range(num_processes):
        env = {
            **os.environ,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={local_devices}",
            "JAX_PLATFORMS": "cpu",
            "PYTHONHASHSEED": "0",  # one hash seed in every process, as distributed.initialize requires
        }
        if num_processes > 1:
            env.update({
                distributed.ENV_ADDRESS: f"127.0.0.1:{port}",
                distributed.ENV_NUM_PROCESSES: str(num_processes),
                distributed.ENV_PROCESS_ID: str(rank),
            })  # fmt: skip
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.distributed_worker", mode, str(directory)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return processes


def finish(processes: list[subprocess.Popen]) -> list[tuple[int, dict | None, str]]:
    results = []
    deadline = time.monotonic() + TIMEOUT_S
    for process in processes:
        try:
            out, err = process.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            pytest.fail(f"a process of the run hung for {TIMEOUT_S} s")
        lines = [line for line in out.splitlines() if line.startswith("{")]
        results.append((process.returncode, json.loads(lines[-1]) if lines else None, err))
    return results


def run(mode: str, directory: Path, num_processes: int, local_devices: int) -> list[dict]:
    results = finish(start(mode, directory, num_processes, local_devices))
    for code, _, err in results:
        assert code == 0, err[-3000:]
    return [result for _, result, _ in results]


@pytest.fixture(scope="module")
def one_by_four(tmp_path_factory):
    return run("plain", tmp_path_factory.mktemp("one"), 1, 4)[0]


def test_two_processes_agree_with_one_process_of_four_devices(one_by_four, tmp_path):
    results = run("plain", tmp_path, 2, 2)
    assert [(r["process"], r["processes"], r["devices"]) for r in results] == [(0, 2, 4), (1, 2, 4)]
    assert one_by_four["devices"] == 4
    for result in results:
        np.testing.assert_allclose(result["losses"], one_by_four["losses"], rtol=1e-6)
        for name, value in one_by_four["params"].items():
            np.testing.assert_allclose(result["params"][name], value, rtol=1e-5, atol=1e-6)
    assert results[0]["losses"] == results[1]["losses"]  # the processes agree exactly


def test_a_killed_two_process_run_resumes_bitwise(tmp_path):
    uninterrupted = run("plain", tmp_path / "plain", 2, 2)
    killed = finish(start("kill", tmp_path / "checkpoints", 2, 2))
    assert all(code == -9 for code, _, _ in killed), [code for code, _, _ in killed]
    resumed = run("resume", tmp_path / "checkpoints", 2, 2)
    for process in (0, 1):
        assert resumed[process]["losses"] == uninterrupted[process]["losses"]
        assert resumed[process]["params"] == uninterrupted[process]["params"]
    meta = read_meta(resolve_checkpoint(tmp_path / "checkpoints"))
    assert meta["step"] == 40
    assert len(meta["process_loader_states"]) == 2  # each process's Grain iterator state


def test_different_data_in_one_process_fails_before_training(tmp_path):
    results = run("mismatch", tmp_path, 2, 1)
    for result in results:
        assert "given different training data or batch sizes" in result["error"]
        assert "process 0: {'batch_size': 120, 'data'" in result["error"] and "'rows': 1080" in result["error"]


def test_a_failed_process_brings_the_others_down(tmp_path):
    started = time.monotonic()
    results = finish(start("fail", tmp_path, 2, 1))
    elapsed = time.monotonic() - started
    codes = [code for code, _, _ in results]
    assert all(code != 0 for code in codes), codes
    assert "process 1 failed on purpose" in results[1][2]
    assert elapsed < 90  # the heartbeat (5 s) ends the wait, not a timeout of minutes


def test_an_unreachable_coordinator_fails_in_bounded_time_naming_it(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    address = f"127.0.0.1:{distributed.free_port()}"
    script = f"from aimz_trainer import distributed\ndistributed.initialize({address!r}, 2, 1, timeout_s=3)\n"
    started = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode != 0
    assert (
        "DistributedError" in completed.stderr and f"reach the coordinator at {address} within 3 s" in completed.stderr
    )
    assert time.monotonic() - started < 60


def initialize_in_processes(sizes: list[str], hash_seeds: list[str | None]) -> list[tuple[int, dict | None, str]]:
    """``distributed.initialize`` in one process per entry: told that run size, with that hash seed."""
    port = distributed.free_port()
    script = (
        "import sys\nfrom aimz_trainer import distributed\n"
        f"distributed.initialize('127.0.0.1:{port}', int(sys.argv[1]), int(sys.argv[2]), timeout_s=30)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "PYTHONHASHSEED"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, size, str(rank)],
            cwd=ROOT,
            env={**env, "JAX_PLATFORMS": "cpu", **({"PYTHONHASHSEED": seed} if seed is not None else {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank, (size, seed) in enumerate(zip(sizes, hash_seeds, strict=True))
    ]
    return finish(processes)


def test_processes_told_different_sizes_all_fail():
    for code, _, err in initialize_in_processes(["2", "3"], ["0", "0"]):
        assert code != 0
        assert "the processes disagree on the run's size: told [2, 3]" in err


@pytest.mark.parametrize("hash_seeds", [["0", "1"], [None, None]], ids=["different", "unset"])
def test_processes_without_one_hash_seed_all_fail_naming_the_fix(hash_seeds):
    # Different hash seeds can compile the step into differently rounded float sums: the
    # processes would hold slightly different copies of the parameters.
    shown = str([seed for seed in hash_seeds])
    for code, _, err in initialize_in_processes(["2", "2"], hash_seeds):
        assert code != 0
        assert f"the processes of this run have PYTHONHASHSEED {shown}" in err
        assert "export PYTHONHASHSEED=0" in err


def test_launch_gives_every_process_one_hash_seed(capfd):
    # One write per line: process 0 writes to our stdout itself, beside the relayed lines.
    command = [
        sys.executable,
        "-c",
        "import os; os.write(1, f\"hash seed {os.environ['PYTHONHASHSEED']}\\n\".encode())",
    ]
    unset = {key: value for key, value in os.environ.items() if key != "PYTHONHASHSEED"}
    assert distributed.launch(command, 2, environ=unset) == 0
    assert distributed.launch(command, 2, environ={**unset, "PYTHONHASHSEED": "7"}) == 0
    lines = sorted(line for line in capfd.readouterr().out.splitlines() if "hash seed" in line)
    assert lines == ["[process 1] hash seed 0", "[process 1] hash seed 7", "hash seed 0", "hash seed 7"]


CHILD_WAITING_FOR_A_SIGNAL = """
import os, signal, sys, time
rank = os.environ["AIMZ_PROCESS_ID"]
def stop(signum, frame):
    os.write(1, f"process {rank} got {signum}\\n".encode())
    sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGUSR1, stop)
os.write(1, f"ready {rank}\\n".encode())
time.sleep(120)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_launch_passes_a_preemption_signal_on_to_every_process(signum):
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from aimz_trainer import distributed; "
            f"sys.exit(distributed.launch([sys.executable, '-c', {CHILD_WAITING_FOR_A_SIGNAL!r}], 2))",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    ready = set()
    while len(ready) < 2:
        line = launcher.stdout.readline()
        assert line, "the launcher ended before its processes were ready"
        ready.add(line.split()[-1])
    launcher.send_signal(signum)
    rest = launcher.stdout.read()
    assert launcher.wait(timeout=60) == 128 + signum
    got = sorted(line.removeprefix("[process 1] ") for line in rest.splitlines() if " got " in line)
    assert got == [f"process 0 got {int(signum)}", f"process 1 got {int(signum)}"]  # each heard it itself
    launcher.stdout.close()


def test_cluster_spec_sources():
    env = {"AIMZ_COORDINATOR_ADDRESS": "10.0.0.1:1234", "AIMZ_NUM_PROCESSES": "3", "AIMZ_PROCESS_ID": "2"}
    spec = distributed.cluster_spec(environ=env)
    assert (spec.coordinator_address, spec.num_processes, spec.process_id, spec.source) == (
        "10.0.0.1:1234", 3, 2, "environment"
    )  # fmt: skip
    slurm = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_JOB_NODELIST": "a100-[003-004,9],cpu1"}
    assert distributed.cluster_spec(environ={**slurm, "AIMZ_COORDINATOR_PORT": "7000"}).coordinator_address == (
        "a100-003:7000"
    )
    assert distributed.first_host("node7") == "node7"
    assert distributed.cluster_spec(environ={"SLURM_NTASKS": "1"}) is None
    explicit = distributed.cluster_spec("h:1", 2, 0, environ=env)
    assert explicit.source == "arguments" and explicit.num_processes == 2
    with pytest.raises(ConfigurationError, match=r"process_id must be in \[0, 2\) for 2 processes; got 2"):
        distributed.cluster_spec("h:1", 2, 2)
    with pytest.raises(ConfigurationError, match="coordinator_address must be 'host:port'"):
        distributed.cluster_spec(environ={"AIMZ_NUM_PROCESSES": "2", "AIMZ_PROCESS_ID": "0"})
    with pytest.raises(ConfigurationError, match="together"):
        distributed.cluster_spec("h:1")


def ephemeral_ports() -> range | None:
    """The ports this Linux machine hands out by itself (binding port 0, connecting), if known."""
    path = Path("/proc/sys/net/ipv4/ip_local_port_range")
    if not path.exists():
        return None
    low, high = map(int, path.read_text().split())
    return range(low, high + 1)


def test_a_free_port_is_one_the_system_does_not_hand_out_by_itself():
    # A port the system picked could go to another socket (a connection of a run beside this
    # one) before the coordinator binds it: a two-process test once failed so on CI.
    ports = {distributed.free_port() for _ in range(20)}
    assert all(port in distributed.COORDINATOR_PORTS for port in ports) and len(ports) > 1  # drawn
    system = ephemeral_ports()
    if system is not None and not (set(system) & set(distributed.COORDINATOR_PORTS)):
        assert not any(port in system for port in ports)
    for port in ports:  # free on every address, as the coordinator binds
        with socket.socket() as probe:
            probe.bind(("", port))


def test_a_port_in_use_is_drawn_again(monkeypatch):
    taken_port = distributed.free_port()
    free = next(port for port in iter(distributed.free_port, None) if port != taken_port)
    draws = iter([taken_port, free])
    monkeypatch.setattr(distributed.random.SystemRandom, "choice", lambda self, ports: next(draws))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", taken_port))
        taken.listen()
        assert distributed.free_port() == free
