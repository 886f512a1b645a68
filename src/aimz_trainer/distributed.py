"""Multi-process runs on JAX's own distributed runtime (``jax.distributed``).

One process per host (or per GPU), all running the same program: :func:`initialize` connects
them through a coordinator, after which ``jax.devices()`` lists every device of every process,
the Trainer's mesh spans them all, each process feeds only its share of every global batch, and
the compiled step is the same function as on one host. :func:`launch` starts N such processes
on this machine over loopback (CPU collectives through gloo), for testing a cluster setup
without a cluster: ``aimz-trainer run RECIPE --num-processes 2``.

Where the cluster's shape comes from, first match wins:

1. the arguments of :func:`initialize`;
2. ``AIMZ_COORDINATOR_ADDRESS``, ``AIMZ_NUM_PROCESSES``, ``AIMZ_PROCESS_ID`` (set by
   :func:`launch`, or by hand);
3. SLURM: ``SLURM_NTASKS`` processes, this one ``SLURM_PROCID``, the coordinator on the first
   host of ``SLURM_STEP_NODELIST`` (or ``SLURM_JOB_NODELIST``) at port
   ``AIMZ_COORDINATOR_PORT`` (default 61234).

Without any of them the run is a single process and :func:`initialize` does nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import jax
import numpy as np
from jax.experimental import multihost_utils

from aimz_trainer._checks import is_int_at_least
from aimz_trainer.errors import ConfigurationError, DistributedError
from aimz_trainer.hash_seed import HASH_SEED, with_fixed_hash_seed

__all__ = [
    "ClusterSpec",
    "allgather_json",
    "cluster_spec",
    "initialize",
    "launch",
    "require_agreement",
    "with_fixed_hash_seed",
]

ENV_ADDRESS = "AIMZ_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "AIMZ_NUM_PROCESSES"
ENV_PROCESS_ID = "AIMZ_PROCESS_ID"
ENV_PORT = "AIMZ_COORDINATOR_PORT"
DEFAULT_PORT = 61234


@dataclass(frozen=True)
class ClusterSpec:
    """Where the coordinator is, how many processes there are and which one this is.

    Attributes:
        source: ``"arguments"``, ``"environment"`` or ``"slurm"``.
    """

    coordinator_address: str
    num_processes: int
    process_id: int
    source: str


def cluster_spec(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> ClusterSpec | None:
    """The cluster this process belongs to (see the module docstring), or ``None`` for a
    single-process run.

    Example:
        >>> cluster_spec(environ={"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_STEP_NODELIST": "gpu[07-10]"})
        ClusterSpec(coordinator_address='gpu07:61234', num_processes=4, process_id=2, source='slurm')
        >>> cluster_spec(environ={}) is None
        True
    """
    env = os.environ if environ is None else environ
    if coordinator_address is not None or num_processes is not None or process_id is not None:
        if coordinator_address is None or num_processes is None or process_id is None:
            raise ConfigurationError(
                "pass coordinator_address, num_processes and process_id together (or none of them, to read "
                f"{ENV_ADDRESS}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID} or SLURM's variables)."
            )
        return _checked(coordinator_address, num_processes, process_id, "arguments")
    if ENV_NUM_PROCESSES in env:
        return _checked(
            env.get(ENV_ADDRESS, ""), _int_env(env, ENV_NUM_PROCESSES), _int_env(env, ENV_PROCESS_ID), "environment"
        )
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        address = f"{first_host(nodes)}:{env.get(ENV_PORT, DEFAULT_PORT)}"
        return _checked(address, _int_env(env, "SLURM_NTASKS"), _int_env(env, "SLURM_PROCID"), "slurm")
    return None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``"node[03-05,9],gpu1"`` -> ``"node03"``)."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?", nodelist.strip())
    if not match or (not match.group(1) and not match.group(2)):
        raise ConfigurationError(f"cannot read the first host of the SLURM node list {nodelist!r}.")
    prefix, ranges = match.group(1), match.group(2)
    return prefix + (re.split(r"[,-]", ranges)[0] if ranges else "")


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except (KeyError, ValueError) as error:
        raise ConfigurationError(f"{name} must be set to an integer; got {env.get(name)!r}.") from error


def _checked(address: str, num_processes: int, process_id: int, source: str) -> ClusterSpec:
    if not re.fullmatch(r".+:\d+", address or ""):
        raise ConfigurationError(f"coordinator_address must be 'host:port'; got {address!r} (from {source}).")
    if not is_int_at_least(num_processes, 1):
        raise ConfigurationError(f"num_processes must be a positive int; got {num_processes!r} (from {source}).")
    if isinstance(process_id, bool) or not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise ConfigurationError(
            f"process_id must be in [0, {num_processes}) for {num_processes} processes; got {process_id!r} "
            f"(from {source})."
        )
    return ClusterSpec(address, num_processes, process_id, source)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = 60,
    heartbeat_timeout_s: int = 30,
    local_device_ids: Sequence[int] | None = None,
) -> ClusterSpec | None:
    """Join the cluster (``jax.distributed.initialize``) before anything else uses JAX.

    Args:
        coordinator_address: ``"host:port"`` of process 0's coordinator service.
        num_processes: processes in the run.
        process_id: this process, from 0.
        timeout_s: how long to wait for every process to reach the coordinator; past it,
            :class:`~aimz_trainer.errors.DistributedError` names the address.
        heartbeat_timeout_s: how long a silent process (crashed, killed) may go unnoticed; the
            others then stop with an error instead of waiting for it in a collective forever.
        local_device_ids: this process's devices (default: all it sees).

    Returns:
        The cluster's :class:`ClusterSpec`, or ``None`` for a single process (nothing done).

    Example:
        >>> initialize() is None  # no arguments, no AIMZ_*/SLURM variables: one process
        True
    """
    spec = cluster_spec(coordinator_address, num_processes, process_id)
    if spec is None or spec.num_processes == 1:
        return spec
    if spec.process_id != 0:
        # The runtime aborts the whole process (no Python exception) when the coordinator
        # never answers: reach it first, so the failure can say where it looked.
        _wait_for_coordinator(spec, timeout_s)
    # CPU devices of several processes talk through gloo (TCP); accelerators use their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=spec.coordinator_address,
            num_processes=spec.num_processes,
            process_id=spec.process_id,
            local_device_ids=local_device_ids,
            initialization_timeout=timeout_s,
            heartbeat_timeout_seconds=heartbeat_timeout_s,
            shutdown_timeout_seconds=heartbeat_timeout_s,
        )
    except Exception as error:  # the runtime raises XlaRuntimeError, RuntimeError, ...
        raise DistributedError(
            f"process {spec.process_id} of {spec.num_processes} could not join the run through the coordinator "
            f"at {spec.coordinator_address} ({type(error).__name__}: {error})."
        ) from error
    # Every process states how many it was told there are: all of them fail alike when the
    # launch commands disagree (the runtime admits a process counting on another number).
    claims = allgather_json(spec.num_processes)
    if jax.process_count() != spec.num_processes or len(set(claims)) > 1:
        raise DistributedError(
            f"the processes disagree on the run's size: told {claims} (in process order), the runtime has "
            f"{jax.process_count()} processes. Start every process with the same num_processes."
        )
    seeds = allgather_json(os.environ.get(HASH_SEED))
    if None in seeds or len(set(seeds)) > 1:
        raise DistributedError(
            f"the processes of this run have PYTHONHASHSEED {seeds} (in process order; None: not set, so random), "
            "and processes with different hash seeds can compile the same step into different float sums (see "
            "with_fixed_hash_seed). Set PYTHONHASHSEED to one value in every process's environment (e.g. "
            "`export PYTHONHASHSEED=0` in the job script), or start the run with `aimz-trainer run ... "
            "--num-processes N` or distributed.launch, which set it."
        )
    return spec


def _wait_for_coordinator(spec: ClusterSpec, timeout_s: float) -> None:
    host, port = spec.coordinator_address.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError as error:
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"process {spec.process_id} of {spec.num_processes} could not reach the coordinator at "
                    f"{spec.coordinator_address} within {timeout_s} s ({error}). Check that process 0 runs and "
                    "that the address is reachable from here."
                ) from error
            time.sleep(0.2)


def allgather_json(value: object) -> list[object]:
    """Every process's ``value`` (JSON-serializable), in process order; a collective: every
    process must call it at the same point. One process: ``[value]``.

    Example:
        >>> allgather_json({"rows": 10})
        [{'rows': 10}]
    """
    if jax.process_count() == 1:
        return [json.loads(json.dumps(value))]
    encoded = np.frombuffer(json.dumps(value, sort_keys=True).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.asarray([encoded.size], np.int64))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[: encoded.size] = encoded
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[: int(size)]).decode()) for row, size in zip(gathered, np.ravel(sizes), strict=True)]


def require_agreement(view: Mapping[str, object], given: str, advice: str) -> None:
    """Raise :class:`DistributedError` in every process unless every process passed the same
    ``view`` (JSON-serializable); a collective, like :func:`allgather_json`. The message lists
    each process's view, says they were given different ``given`` and ends with ``advice``.

    Example:
        >>> require_agreement({"rows": 10}, "data", "Give every process the same arrays.")
    """
    seen = allgather_json(view)
    if any(other != seen[0] for other in seen):
        raise DistributedError(
            f"the processes of this run were given different {given}: "
            + "; ".join(f"process {rank}: {other}" for rank, other in enumerate(seen))
            + f". {advice}"
        )


# Ports the system never hands out on its own: below the ephemeral ranges (Linux 32768-60999,
# macOS and Windows 49152-65535), above the well-known and common service ports.
COORDINATOR_PORTS = range(10_000, 32_768)


def free_port() -> int:
    """A TCP port free on every address of this machine now (for a local coordinator), drawn
    from :data:`COORDINATOR_PORTS`.

    A port the system picked (binding port 0) is an ephemeral one: between this check and the
    coordinator's bind, the system may give it to another socket, a connection of another run
    on this machine say, and the coordinator then fails to start ("address already in use").
    The system gives out no port of this range by itself; another run choosing the same one
    at the same time is unlikely (a random draw of 22,768).
    """
    draw = random.SystemRandom()
    for _ in range(100):
        port = draw.choice(COORDINATOR_PORTS)
        with socket.socket() as probe:
            try:
                probe.bind(("", port))  # every address: the coordinator listens on all of them
            except OSError:
                continue
        return port
    raise DistributedError(f"no free TCP port found in {COORDINATOR_PORTS} after 100 draws")


def launch(
    command: Sequence[str],
    num_processes: int,
    *,
    local_devices: int = 1,
    grace_s: float = 60.0,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Run ``command`` as ``num_processes`` processes of one run on this machine, over loopback.

    Each process gets ``AIMZ_COORDINATOR_ADDRESS`` (a free local port), ``AIMZ_NUM_PROCESSES``
    and ``AIMZ_PROCESS_ID``, ``local_devices`` CPU devices and one ``PYTHONHASHSEED`` (see
    :func:`with_fixed_hash_seed`). Process 0's output is shown as
    is; the others' output lines are prefixed with their number. When a process fails, the
    others get ``grace_s`` seconds to stop on their own (they notice through the runtime's
    heartbeat), then are terminated, and killed after as long again (a process of a
    ``jax.distributed`` run outside a fit may not act on SIGTERM). SIGTERM and SIGUSR1 sent to
    the launcher are passed on to every process, so a preempted run checkpoints and exits as
    one (:mod:`aimz_trainer.preemption`).

    Returns:
        0 when every process succeeded, else the first failure's exit status.
    """
    if not is_int_at_least(num_processes, 1):
        raise ConfigurationError(f"num_processes must be a positive int; got {num_processes!r}.")
    base = with_fixed_hash_seed(os.environ if environ is None else environ)
    address = f"127.0.0.1:{free_port()}"
    flags = " ".join(f for f in base.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f)
    processes = []
    for rank in range(num_processes):
        env = {
            **base,
            ENV_ADDRESS: address,
            ENV_NUM_PROCESSES: str(num_processes),
            ENV_PROCESS_ID: str(rank),
            # First: XLA stops reading its flags at the first one it does not know.
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={local_devices} {flags}".strip(),
        }
        output = None if rank == 0 else subprocess.PIPE
        processes.append(subprocess.Popen(list(command), env=env, stdout=output, stderr=output, text=True, bufsize=1))
    relays = [
        thread
        for rank, process in enumerate(processes[1:], start=1)
        for thread in _relay(process, f"[process {rank}] ")
    ]
    status, failed_at = 0, None
    with _signals_passed_on(processes):
        while any(p.poll() is None for p in processes):
            codes = [p.poll() for p in processes]
            if failed_at is None and any(code not in (None, 0) for code in codes):
                failed_at = time.monotonic()
            waited = 0.0 if failed_at is None else time.monotonic() - failed_at
            for p in processes:
                if p.poll() is None and waited > 2 * grace_s:
                    p.kill()
                elif p.poll() is None and waited > grace_s:
                    p.terminate()
            time.sleep(0.1)
    for thread in relays:  # the pipes are closed: the last lines are being copied
        thread.join()
    for rank, process in enumerate(processes):
        if process.returncode != 0:
            print(f"aimz-trainer: process {rank} of {num_processes} exited with {process.returncode}", file=sys.stderr)
            status = status or process.returncode
    return status


@contextlib.contextmanager
def _signals_passed_on(processes: Sequence[subprocess.Popen[str]]) -> Iterator[None]:
    """Inside: SIGTERM and SIGUSR1 received by this process are sent to every child still
    running (main thread only: elsewhere Python cannot set handlers); the previous handlers
    are put back on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def pass_on(signum: int, frame: object) -> None:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    previous = {signum: signal.signal(signum, pass_on) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _relay(process: subprocess.Popen[str], prefix: str) -> list[threading.Thread]:
    """Copy a child's stdout and stderr to ours, line by line, each line prefixed (one write per
    line); returns the copying threads, which end when the child's pipes close."""

    def copy(stream: object, sink: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            print(prefix + line, end="", file=sink, flush=True)  # type: ignore[arg-type]

    threads = [
        threading.Thread(target=copy, args=(stream, sink), daemon=True)
        for stream, sink in [(process.stdout, sys.stdout), (process.stderr, sys.stderr)]
    ]
    for thread in threads:
        thread.start()
    return threads
