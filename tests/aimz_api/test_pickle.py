"""A fitted ImpactModel round-trips through cloudpickle, into a fresh process too, and
predicts the same draws for the same key (what the MLflow flavor relies on)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import cloudpickle
import jax
import numpy as np


def test_a_fitted_model_round_trips_and_predicts_the_same(fitted, tmp_path):
    im, (X, t, _) = fitted
    key = jax.random.key(5)
    expected = im.predict_on_batch(X[:50], t=t[:50], rng_key=key, return_datatree=False)["y"]
    restored = cloudpickle.loads(cloudpickle.dumps(im))
    assert restored.is_fitted() and restored.temp_dir is None
    np.testing.assert_array_equal(jax.random.key_data(restored.rng_key), jax.random.key_data(im.rng_key))
    np.testing.assert_array_equal(restored.vi_result.losses, im.vi_result.losses)
    got = restored.predict_on_batch(X[:50], t=t[:50], rng_key=key, return_datatree=False)["y"]
    np.testing.assert_array_equal(got, expected)
    (tmp_path / "model.pkl").write_bytes(cloudpickle.dumps(im))
    np.save(tmp_path / "X.npy", X[:50])
    np.save(tmp_path / "t.npy", t[:50])
    script = textwrap.dedent(
        f"""
        import pickle, jax, numpy as np
        im = pickle.loads(open({str(tmp_path / "model.pkl")!r}, "rb").read())
        X, t = np.load({str(tmp_path / "X.npy")!r}), np.load({str(tmp_path / "t.npy")!r})
        y = im.predict_on_batch(X, t=t, rng_key=jax.random.key(5), return_datatree=False)["y"]
        np.save({str(tmp_path / "y.npy")!r}, y)
        from tests.aimz_api.conftest import data
        X, t, y = data()
        more = im.fit(X, y, t=t, num_samples=3, progress=False)  # training continues too
        print(more.vi_result.losses.shape)
        """
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), expected)
    assert completed.stdout.strip().splitlines()[-1] == "(1,)"
