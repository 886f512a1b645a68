"""One fit of the preemption tests, run as its own process (``python -m tests.preemption_worker``).

Usage: ``python -m tests.preemption_worker DIRPATH [--out OUT] [--resume] [--hold-at STEP]
[--hold-process N]``, with the AIMZ_* variables of :mod:`aimz_trainer.distributed` set for a
multi-process run (or none: one process).

The fit: 1000 rows in batches of 100 (10 steps an epoch), 4 epochs, ``log_every_n_steps=3``, so
chunks end at steps 3, 6, 9, 10, 12, 15, ...; a ModelCheckpoint saves at every epoch end and
keeps all. With ``--hold-at STEP``, process ``--hold-process`` prints ``holding STEP`` once the
chunk ending at STEP has run its hooks and waits there until the fit is asked to stop: the test
sends the signal then, so the fit stops at STEP whenever the signal arrives (the other processes
go on to that boundary and wait for it there). A fit that finishes writes its losses and
parameters to ``OUT.<process>.npz``; a preempted one prints its FitPreempted as a JSON line and
exits with it, as a script that does not catch it would.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from aimz_trainer import distributed

NUM_ROWS, BATCH_SIZE, MAX_EPOCHS, LOG_EVERY_N_STEPS = 1000, 100, 4, 3
HOLD_S = 120


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dirpath", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--hold-at", type=int)
    parser.add_argument("--hold-process", type=int, default=0)
    args = parser.parse_args(argv)
    distributed.initialize(timeout_s=60, heartbeat_timeout_s=5)  # before anything else uses JAX
    import jax
    import numpy as np

    from aimz_trainer import Callback, FitPreempted, ModelCheckpoint, Trainer

    from .conftest import linear_data, linear_svi

    class HoldForTheSignal(Callback):
        def on_train_chunk_end(self, fit, progress, losses, steps):
            if progress.step != args.hold_at or jax.process_index() != args.hold_process:
                return
            print(f"holding {progress.step}", flush=True)
            deadline = time.monotonic() + HOLD_S
            while not fit.should_stop:  # the signal handler runs in this thread, during the sleep
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no signal came within {HOLD_S} s")
                time.sleep(0.01)

    callbacks: list[Callback] = [ModelCheckpoint(args.dirpath, every_n_epochs=1, save_top_k=-1)]
    if args.hold_at is not None:
        callbacks.insert(0, HoldForTheSignal())
    trainer = Trainer(
        max_epochs=MAX_EPOCHS,
        rng_key=jax.random.key(0),
        enable_progress_bar=False,
        callbacks=callbacks,
        log_every_n_steps=LOG_EVERY_N_STEPS,
    )
    try:
        result = trainer.fit(
            linear_svi(NUM_ROWS),
            linear_data(NUM_ROWS),
            batch_size=BATCH_SIZE,
            ckpt_path="last" if args.resume else None,
        )
    except FitPreempted as preempted:
        report = {"signal": int(preempted.signal), "step": preempted.step, "checkpoint": str(preempted.checkpoint)}
        print(json.dumps(report), flush=True)
        raise
    if args.out is not None:
        params = {f"param_{name}": np.asarray(value) for name, value in result.params.items()}
        np.savez(f"{args.out}.{jax.process_index()}.npz", losses=result.losses, **params)


if __name__ == "__main__":
    main(sys.argv[1:])
