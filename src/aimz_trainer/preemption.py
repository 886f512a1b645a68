"""Preemption: SIGTERM or SIGUSR1 stops a fit at the next chunk boundary, with a checkpoint.

Job schedulers announce the end of a job with a signal and kill it a grace period later:
Kubernetes and ``docker stop`` send SIGTERM, SLURM sends SIGTERM on ``scancel`` and at the time
limit, and SIGUSR1 (or another signal) ``--signal=USR1@90`` seconds before it. A process running
:meth:`Trainer.fit <aimz_trainer.Trainer.fit>` turns either signal into a checkpoint and a clean
exit; ``fit(..., ckpt_path="last")`` in the next job continues the fit bit for bit, as from any
checkpoint (:mod:`aimz_trainer.resume`).

1. **The handlers.** :func:`catch_preemption` installs a handler for :data:`PREEMPTION_SIGNALS`
   for the duration of a fit, in the main thread only (Python runs signal handlers there; a fit
   in another thread installs none and leaves the signals to the process), and afterwards puts
   back what was there, also after an error: the process's own handler, not only Python's view of
   it. (A multi-process JAX run has a handler Python does not know of: ``jax.distributed``
   installs one for SIGTERM that only notes the signal, so SIGTERM does not end such a process.)
   The handler only records the signal and asks the fit to stop (``FitContext.request_stop``);
   the chunk loop acts on it. A handler the process had is not called during the fit
   (``FitPreempted`` takes its place: catch it to act on the signal), and a signal the process
   ignores (``SIG_IGN``) stays ignored. The handlers are in place from compilation to ``teardown``; before
   (checking the arguments, placing the data) the signals keep their usual effect: there is
   nothing to save yet.
2. **Where the fit stops.** At the next chunk boundary, like any stop request: the chunk the
   devices are computing runs to its end, its results are dropped (the loop's speculative chunk,
   :mod:`aimz_trainer.loop`), and the fit ends on the state of the last chunk whose hooks ran.
   That state is consistent: step, parameters, optimizer and loader state, losses and every
   callback's state belong to one boundary, and it is the state saved. The loop also stops after
   an epoch's ``on_train_epoch_start`` hooks; a stop there saves the fit as that epoch's start,
   like a mid-epoch checkpoint 0 steps into it (a resumed fit starts its epoch again, as after
   any mid-epoch checkpoint).
3. **Several processes agree.** :func:`stop_at_boundary` is the loop's one rule for stopping at
   a boundary. With one process it reads ``fit.should_stop`` and costs nothing. With several,
   every process states whether it wants to stop, once per boundary: any process asking stops
   them all at that same boundary, so one process getting the signal (or getting it a chunk
   later than another) is enough, and a stop request that may differ between processes (a time
   limit) is agreed on too. The lowest-numbered asking process gives the reason; the
   lowest-numbered process that received a signal gives the signal, so every process ends
   alike. The exchange goes through the distributed runtime's key-value store (a barrier, then
   one read of the entries the asking processes wrote: about a millisecond over loopback), not
   through a collective on the devices, which would queue behind the chunk in flight and make the
   host wait for it, undoing the loop's pipelining (orbax's barriers take the same path, see
   :class:`~aimz_trainer.callbacks.ModelCheckpoint`). Every process calls it at the same
   boundaries, as the loop does.
4. **How the fit ends.** :func:`save_on_preemption` has every
   :class:`~aimz_trainer.callbacks.ModelCheckpoint` of the fit write the state it stopped at,
   outside its schedule (``ModelCheckpoint.save_now``); then ``on_fit_end`` runs (it waits for
   the save to be complete on disk) and ``fit`` raises :class:`~aimz_trainer.errors.FitPreempted`,
   which ``on_exception`` sees (loggers mark the run killed) before ``teardown``. No posterior is
   drawn: the grace period is short. ``FitPreempted`` is a ``SystemExit`` with exit status
   ``128 + signal`` (143 for SIGTERM), what a scheduler sees of a process the signal killed, so a
   job pipeline never takes a preempted fit for a finished one, and an uncaught one exits without
   a traceback. Every process of a multi-process fit raises it, with the same status.
5. **Nothing new, nothing saved.** A fit stopped before its first chunk finished has nothing new
   to save (a fresh fit's step 0 is not worth a checkpoint; a resumed fit's checkpoint is already
   on disk): ``FitPreempted.checkpoint`` is then ``None``, or the checkpoint it resumed from.
6. **A signal the fit does not act on is handed on.** One that arrives after the fit's last
   boundary (it had nothing left to stop) or while the fit ends on an error is raised again once
   the previous handlers are back, so the process reacts to it as it would have without the fit
   (by default, SIGTERM and SIGUSR1 end it). A second signal while the fit is already stopping
   on one changes nothing.

The fit reacts at chunk boundaries only: a scheduler's grace period must cover a chunk, its
hooks and a save (a chunk ends at least every ``log_every_n_steps`` steps).

Example:
    >>> import signal
    >>> signal.SIGTERM in PREEMPTION_SIGNALS
    True
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax

from aimz_trainer.callbacks.base import Callback
from aimz_trainer.callbacks.context import FitContext
from aimz_trainer.callbacks.model_checkpoint import ModelCheckpoint
from aimz_trainer.distributed import allgather_json
from aimz_trainer.errors import DistributedError, FitPreempted

__all__ = ["PREEMPTION_SIGNALS", "catch_preemption", "save_on_preemption", "stop_at_boundary"]

#: The signals that stop a fit: SIGTERM, and SIGUSR1 where the platform has it.
PREEMPTION_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name)
)


# -- the handlers --------------------------------------------------------------------------------


@contextlib.contextmanager
def catch_preemption(fit: FitContext) -> Iterator[None]:
    """Within the block, :data:`PREEMPTION_SIGNALS` ask ``fit`` to stop at its next chunk boundary
    (and are recorded: ``fit.stop_signal`` is set where the fit stops on one); afterwards the
    previous handlers are back, and a signal the fit did not stop on is raised again for them.
    Outside the main thread nothing is installed, nor for a signal the process ignores.

    Example:
        >>> from aimz_trainer.callbacks.context import FitContext
        >>> fit = FitContext(None, None, None, False, None, {}, print)  # what a Trainer builds
        >>> seen = []
        >>> before = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
        >>> with catch_preemption(fit):
        ...     signal.raise_signal(signal.SIGUSR1)
        ...     print(fit.should_stop, fit.stop_reason)
        True received SIGUSR1
        >>> seen == [signal.SIGUSR1]  # no chunk loop stopped on it: handed on to the handler before
        True
        >>> _ = signal.signal(signal.SIGUSR1, before)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        # The record first: the loop reads should_stop, then the record.
        if fit._received_signal is None:
            fit._received_signal = signum
        if not fit.should_stop:
            fit.request_stop(f"received {signal.Signals(signum).name}", force=True)

    previous: list[_Handler] = []
    try:
        for signum in PREEMPTION_SIGNALS:
            if signal.getsignal(signum) is signal.SIG_IGN:  # the process chose to ignore it
                continue
            previous.append(_current_handler(signum))
            signal.signal(signum, handler)
        yield
    finally:
        for saved in reversed(previous):
            _restore_handler(saved)
        received = fit._received_signal
        if received is not None and fit.stop_signal is None:
            signal.raise_signal(received)  # not acted on: for the handler the process had


class _Handler(NamedTuple):
    """A signal's disposition before the fit: Python's view (``signal.getsignal``: ``None`` for a
    handler installed outside Python) and the process's own ``struct sigaction`` (``None`` where
    it cannot be read)."""

    signum: int
    python: Any
    native: ctypes.Array[ctypes.c_char] | None


# Larger than any platform's struct sigaction (glibc: 152 bytes, macOS: 16): the bytes are only
# read and written back, never interpreted.
_SIGACTION_BYTES = 1024


def _sigaction() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).sigaction
    except (AttributeError, OSError):  # no sigaction (Windows)
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    return function


_SIGACTION = _sigaction()


def _current_handler(signum: int) -> _Handler:
    native = None
    if _SIGACTION is not None:
        buffer = ctypes.create_string_buffer(_SIGACTION_BYTES)
        if _SIGACTION(signum, None, buffer) == 0:
            native = buffer
    return _Handler(signum, signal.getsignal(signum), native)


def _restore_handler(saved: _Handler) -> None:
    # Python's view first (it cannot express a handler installed outside Python, such as JAX's
    # SIGTERM handler in a multi-process run: the default stands for it, as before the fit)...
    signal.signal(saved.signum, saved.python if saved.python is not None else signal.SIG_DFL)
    # ... then the process's own handler, exactly as it was.
    if saved.native is not None:
        _SIGACTION(saved.signum, saved.native, None)


# -- agreeing on a stop --------------------------------------------------------------------------

# Every process makes the same calls in the same order, so the n-th exchange has one name in all.
_EXCHANGES = itertools.count()
_KEY_PREFIX = "aimz_trainer/stop"
# Processes reach a boundary within milliseconds of each other; a process that is gone is noticed
# by the runtime's heartbeat sooner. Past this, one is stuck (a hook that never returns).
_AGREEMENT_TIMEOUT_MS = 60 * 60 * 1000


class _Request(NamedTuple):
    """What one process asks for at a boundary: its stop reason and the signal it received."""

    process: int
    reason: str | None
    signal: int | None
    forced: bool = False


def stop_at_boundary(fit: FitContext) -> bool:
    """Whether the fit stops at this chunk boundary: with one process, ``fit.stop_due``; with
    several, whether any process's fit asks to (a collective: every process calls it at the same
    boundaries), and the stop is forced or the Trainer's ``min_steps``/``min_epochs`` are done
    (:meth:`~aimz_trainer.callbacks.FitContext.request_stop`). When the fit stops, every process's
    ``fit`` holds the agreed ``stop_reason`` and, when a process received a preemption signal,
    ``stop_signal``.

    Example:
        >>> from aimz_trainer.callbacks.context import FitContext
        >>> fit = FitContext(None, None, None, False, None, {}, print)
        >>> stop_at_boundary(fit)
        False
        >>> fit.request_stop("out of time", force=True); stop_at_boundary(fit), fit.stop_signal
        (True, None)
    """
    own = None
    if fit.should_stop:  # read before the record of the signal: the handler writes them the other way round
        own = _Request(jax.process_index(), fit.stop_reason, fit._received_signal, fit.stop_forced)
    requests = [own] if jax.process_count() == 1 else _exchange(own, fit.state.step)
    asking = [r for r in requests if r is not None]
    if not asking:
        return False
    fit.should_stop, fit.stop_reason = True, asking[0].reason
    fit.stop_forced = any(r.forced for r in asking)
    signals = [r.signal for r in asking if r.signal is not None]
    if signals:
        fit.stop_signal = signals[0]
    return fit.stop_due  # before min_steps/min_epochs, an unforced stop waits


def _exchange(own: _Request | None, step: int) -> list[_Request | None]:
    """Every process's request (``None``: it does not ask), in process order."""
    # jax has no public handle on the distributed runtime's client; orbax uses the same one.
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:  # not started by jax.distributed: a collective on the devices will do
        return [None if r is None else _Request(*r) for r in allgather_json(own)]
    name = f"{_KEY_PREFIX}/{next(_EXCHANGES)}"
    try:
        if own is not None:  # only the asking processes write: usually, nobody does
            client.key_value_set(f"{name}/{own.process}", json.dumps(own))
        client.wait_at_barrier(name, _AGREEMENT_TIMEOUT_MS)
        entries = client.key_value_dir_get(f"{name}/")
    except Exception as error:  # the runtime raises XlaRuntimeError
        raise DistributedError(
            f"process {jax.process_index()} could not agree with the others whether to stop at the chunk boundary "
            f"at step {step} ({type(error).__name__}: {error}). Another process failed or is stuck in a hook; see its "
            "output."
        ) from error
    requests: list[_Request | None] = [None] * jax.process_count()
    for _, value in entries:
        request = _Request(*json.loads(value))
        requests[request.process] = request
    return requests


# -- ending a preempted fit ------------------------------------------------------------------------


def save_on_preemption(fit: FitContext, callbacks: Sequence[Callback]) -> FitPreempted | None:
    """After the chunk loop: ``None`` unless the fit stopped on a signal; then every
    :class:`~aimz_trainer.callbacks.ModelCheckpoint` of the fit saves the state it stopped at, and
    the :class:`~aimz_trainer.errors.FitPreempted` to raise once ``on_fit_end`` has waited for the
    saves is returned."""
    if fit.stop_signal is None:
        return None
    saved: list[Path | None] = [c.save_now(fit) for c in callbacks if isinstance(c, ModelCheckpoint)]
    return FitPreempted(fit.stop_signal, fit.state.step, saved[0] if saved else None)
