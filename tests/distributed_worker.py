"""A process of a multi-process fit over loopback (tests/test_distributed.py starts them).

Usage: python -m tests.distributed_worker MODE OUTPUT_DIR, with the AIMZ_* variables of
:mod:`aimz_trainer.distributed` set (or none: a single process). Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from aimz_trainer import distributed

HEARTBEAT_S = 5


def main(argv: list[str]) -> None:
    mode, directory = argv
    distributed.initialize(timeout_s=60, heartbeat_timeout_s=HEARTBEAT_S)
    import jax
    import numpy as np

    from aimz_trainer import Callback, ModelCheckpoint, Trainer
    from aimz_trainer.errors import DistributedError

    from .conftest import linear_data, linear_svi

    class FailInProcessOne(Callback):
        def on_train_epoch_end(self, trainer, progress):
            if jax.process_index() == 1 and progress.epoch == 1:
                raise RuntimeError("process 1 failed on purpose")

    class KillAfterTheSecondCheckpoint(Callback):
        """SIGKILLs this process as epoch 2 starts, once the step-20 checkpoint is complete."""

        def on_train_epoch_start(self, trainer, progress):
            if progress.epoch != 2:
                return
            saved = Path(directory) / "20"
            deadline = time.monotonic() + 60
            while not ((saved / "meta").exists() and (saved / "state").exists()) and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)

    if mode == "zarr":
        zarr_fit(directory)
        return
    # "mismatch": process 1 is given fewer rows than process 0.
    num_rows = 1080 if mode == "mismatch" and jax.process_index() == 1 else 1200
    callbacks = {"fail": [FailInProcessOne()], "kill": [KillAfterTheSecondCheckpoint()]}.get(mode, [])
    if mode in ("checkpoint", "kill", "resume"):
        callbacks.append(ModelCheckpoint(directory, every_n_epochs=1))
    trainer = Trainer(max_epochs=4, rng_key=jax.random.key(0), enable_progress_bar=False, callbacks=callbacks)
    try:
        result = trainer.fit(
            linear_svi(num_rows), linear_data(num_rows), batch_size=120, ckpt_path="last" if mode == "resume" else None
        )
    except DistributedError as error:
        print(json.dumps({"process": jax.process_index(), "error": str(error)}), flush=True)
        return
    print(json.dumps({
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "losses": np.asarray(result.losses).tolist(),
        "params": {k: np.asarray(v).tolist() for k, v in result.params.items()},
    }), flush=True)  # fmt: skip


def zarr_fit(directory: str) -> None:
    """Fit from the Zarr store tests/test_lazy_data.py wrote in ``directory``, then predict from
    it into ``directory/predictions``, counting the rows this process reads in each."""
    import jax
    import numpy as np
    import zarr

    from aimz_trainer import Trainer

    from .conftest import linear_svi
    from .test_lazy_data import CountingRows, zarr_predictor

    data = {name: CountingRows(zarr.open_array(Path(directory) / f"{name}.zarr", mode="r")) for name in ("x", "y")}
    num_rows = data["x"].shape[0]
    trainer = Trainer(max_epochs=2, rng_key=jax.random.key(0), enable_progress_bar=False)
    result = trainer.fit(linear_svi(num_rows), data, batch_size=num_rows // 10)
    rows_read = {name: source.rows_read().tolist() for name, source in data.items()}
    for source in data.values():
        source.reads.clear()
    tree = zarr_predictor(trainer.mesh).predict(data, batch_size=960, output_dir=Path(directory) / "predictions")
    print(json.dumps({
        "process": jax.process_index(),
        "placement": trainer.placement,
        "losses": np.asarray(result.losses).tolist(),
        "rows_read": rows_read,
        "prediction_reads": {name: [[a, b] for a, b in source.reads] for name, source in data.items()},
        "store": tree.attrs["store_path"],
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
