"""ImpactModel.describe: the kernel and the posterior as plain values, as aimz 0.17.0 reports."""

from __future__ import annotations

import json

from tests.aimz_api.conftest import new_model


def test_a_fitted_model_is_described_in_plain_values(fitted):
    im, _ = fitted
    described = im.describe()
    json.dumps(described)  # plain Python values only
    assert {k: described[k] for k in ("kernel", "arguments", "param_input", "param_output", "inference")} == {
        "kernel": "model", "arguments": ["X", "t", "y"], "param_input": "X", "param_output": "y", "inference": "SVI",
    }  # fmt: skip
    assert (described["fitted"], described["num_chains"], described["num_samples"]) == (True, 1, 40)
    sites = described["sites"]
    assert sites["w"] == {"kind": "latent", "dims": None, "draw_shape": []}
    assert sites["y"] == {"kind": "observed", "dims": ["data"]}
    assert sites["mu"] == {"kind": "deterministic", "dims": ["data"]}
    assert sites["t"]["kind"] == "observed"


def test_an_unfitted_model_knows_no_sites():
    described = new_model().describe()
    assert described["fitted"] is False and described["sites"] == {} and described["num_samples"] == 0
