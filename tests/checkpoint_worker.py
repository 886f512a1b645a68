"""One fit of the checkpoint tests, run as its own process (``python -m tests.checkpoint_worker``).

The device count is fixed when JAX starts, so the tests run this module with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``. With ``--kill-step S`` the process
SIGKILLs itself as soon as the checkpoint of step S is complete on disk (no clean-up, no
``on_fit_end``, whatever orbax or Grain still hold); with ``--resume`` it continues from
``ckpt_path="last"``. A fit that finishes writes its losses and parameters to ``--out`` (.npz).
With ``--zarr DIR`` the rows are read from the Zarr stores ``DIR/x.zarr`` and ``DIR/y.zarr`` (the
same data, written by the test) instead of memory.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from pathlib import Path

import jax
import numpy as np

from aimz_trainer import Callback, ModelCheckpoint, Trainer
from tests.conftest import linear_data, linear_svi

NUM_ROWS, BATCH_SIZE, MAX_EPOCHS = 1000, 100, 4
EVERY_N_TRAIN_STEPS = 7  # does not divide the 10-step epoch: checkpoints at 7, 10, 14, 20, 21, ...


class KillAfterCheckpoint(Callback):
    """SIGKILLs the process once the checkpoint of ``step`` is complete on disk.

    At the chunk end of ``step`` it starts a watcher thread, which waits for ``<dirpath>/<step>``
    to hold ``meta`` and ``state`` (orbax renames a finished save into place) and kills the
    process; the fit itself is held at its next hook, before it can start a later save. Where
    this callback runs relative to the ModelCheckpoint does not matter."""

    def __init__(self, dirpath: Path, step: int) -> None:
        self.dirpath = dirpath
        self.step = step
        self.watching = False

    def on_train_chunk_end(self, trainer, progress, losses, steps):
        if self.watching:
            self.hold()
        elif progress.step == self.step:
            self.watching = True
            threading.Thread(target=self.kill_when_saved, daemon=True).start()

    def on_train_epoch_start(self, trainer, progress):
        if self.watching:
            self.hold()

    def hold(self) -> None:
        time.sleep(120)
        raise RuntimeError(f"the checkpoint of step {self.step} never appeared")

    def kill_when_saved(self) -> None:
        step_dir = self.dirpath / str(self.step)
        deadline = time.monotonic() + 60
        while not ((step_dir / "meta").exists() and (step_dir / "state").exists()):
            if time.monotonic() > deadline:
                return
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dirpath", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--kill-step", type=int)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--zarr", type=Path)
    args = parser.parse_args()

    callbacks: list[Callback] = [
        ModelCheckpoint(args.dirpath, every_n_epochs=1, every_n_train_steps=EVERY_N_TRAIN_STEPS, save_top_k=-1)
    ]
    if args.kill_step is not None:
        callbacks.append(KillAfterCheckpoint(args.dirpath, args.kill_step))
    trainer = Trainer(max_epochs=MAX_EPOCHS, rng_key=jax.random.key(0), enable_progress_bar=False, callbacks=callbacks)
    if args.zarr is None:
        data = linear_data(NUM_ROWS)
    else:
        import zarr

        data = {name: zarr.open_array(args.zarr / f"{name}.zarr", mode="r") for name in ("x", "y")}
    result = trainer.fit(
        linear_svi(NUM_ROWS),
        data,
        batch_size=BATCH_SIZE,
        ckpt_path="last" if args.resume else None,
    )
    if args.out is not None:
        params = {f"param_{name}": np.asarray(value) for name, value in result.params.items()}
        np.savez(args.out, losses=result.losses, devices=trainer.mesh.size, **params)


if __name__ == "__main__":
    main()
