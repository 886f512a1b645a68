"""The same fit on 1 and on 4 (forced CPU) devices: per-step losses agree to float32 tolerance.

Each run is a fresh subprocess because XLA fixes the device count when JAX starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multidevice]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax
    from tests.conftest import linear_data, linear_svi
    from aimz_trainer import Trainer

    placement = sys.argv[1]
    trainer = Trainer(max_epochs=2, rng_key=jax.random.key(0), enable_progress_bar=False, steps_per_chunk=4)
    result = trainer.fit(linear_svi(1000), linear_data(1000), batch_size=80, num_samples=5, data_placement=placement)
    print(json.dumps({
        "devices": trainer.mesh.size,
        "placement": trainer.placement,
        "losses": result.losses.tolist(),
        "w_loc": float(result.params["w_auto_loc"]),
        "posterior_w": list(result.posterior["w"].shape),
    }))
    """
)


def run_fit(device_count: int, placement: str) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={device_count}", "JAX_PLATFORMS": "cpu"}
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT, placement], cwd=root, env=env, capture_output=True, text=True, timeout=240
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("placement", ["device", "host"])
def test_four_devices_agree_with_one(placement):
    one, four = run_fit(1, placement), run_fit(4, placement)
    assert (one["devices"], four["devices"]) == (1, 4)
    assert one["placement"] == four["placement"] == placement
    assert len(one["losses"]) == len(four["losses"]) == 26  # 13 steps per epoch (1000 rows, batch 80)
    np.testing.assert_allclose(four["losses"], one["losses"], rtol=2e-5)
    np.testing.assert_allclose(four["w_loc"], one["w_loc"], rtol=1e-4)
    assert four["posterior_w"] == [5]
