"""ImpactModel.cleanup, cleanup_models and temp_dir: the scratch directory's life."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
from pathlib import Path

from aimz_trainer import ImpactModel
from tests.aimz_api.conftest import NUM_ROWS, data, new_model


def test_created_lazily_and_removed_by_cleanup_then_a_no_op(fitted):
    im, (X, t, _) = fitted
    im.cleanup()
    assert im.temp_dir is None
    im.predict(X[:100], t=t[:100], batch_size=100, progress=False)
    scratch = Path(im.temp_dir)
    assert any(scratch.glob("predict-*"))
    im.cleanup()
    assert not scratch.exists() and im.temp_dir is None
    im.cleanup()  # already removed: nothing happens


def test_cleanup_models_cleans_every_model(fitted):
    im, (X, t, _) = fitted
    other = new_model().set_posterior_sample({"w": im.posterior["w"], "tau": im.posterior["tau"]})
    im.predict(X[:10], t=t[:10], progress=False)
    other.predict(X[:10], t=t[:10], progress=False)
    scratches = [Path(im.temp_dir), Path(other.temp_dir)]
    ImpactModel.cleanup_models()
    assert not any(path.exists() for path in scratches) and im.temp_dir is None and other.temp_dir is None


def test_an_output_dir_is_never_removed(fitted, tmp_path):
    im, (X, t, _) = fitted
    im.cleanup()
    dt = im.predict(X[:100], t=t[:100], batch_size=100, output_dir=tmp_path, progress=False)
    assert im.temp_dir is None
    im.cleanup()
    assert Path(dt.attrs["artifact_path"]).is_dir() and dt["posterior_predictive"]["y"].shape == (1, 40, 100)


def test_removed_when_the_model_and_its_trees_are_collected():
    X, t, y = data()
    im = new_model().fit(X, y, t=t, num_samples=4, batch_size=500, epochs=1, progress=False)
    dt = im.predict(X, t=t, batch_size=1000, progress=False)
    scratch = Path(im.temp_dir)
    del im
    gc.collect()
    assert scratch.exists()  # the tree still reads from it
    assert dt["posterior_predictive"]["y"].values.shape == (1, 4, NUM_ROWS)
    del dt
    gc.collect()
    assert not scratch.exists()


def test_removed_at_interpreter_exit():
    script = textwrap.dedent(
        """
        from tests.aimz_api.conftest import data, new_model
        X, t, y = data()
        im = new_model().fit(X, y, t=t, num_samples=4, batch_size=500, epochs=1, progress=False)
        im.predict(X, t=t, batch_size=1000, progress=False)
        print(im.temp_dir)
        """
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    scratch = Path(completed.stdout.strip().splitlines()[-1])
    assert scratch.name.startswith("aimz-trainer-scratch-") and not scratch.exists()
