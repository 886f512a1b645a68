"""The reference tutorial's code, with n reduced and the import swapped, runs here and gives the
DataTree the tutorial shows. The code is ``benchmarks/tutorial_workflow.py`` (the same file the
full-size workflow benchmark runs), so the test and the benchmark cannot drift apart."""

from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL_RST = ROOT.parent / "shared" / "reference" / "tutorial.rst"
sys.path.insert(0, str(ROOT / "benchmarks"))

import tutorial_workflow  # noqa: E402

NUM_ROWS = 20_000
SITES = ("nn_p_linear1.kernel", "nn_p_linear1.bias", "nn_p_linear2.kernel", "nn_p_linear3.kernel")


@pytest.mark.slow
def test_the_tutorial_runs_and_returns_its_datatree():
    phases = tutorial_workflow.Phases()
    outcome = tutorial_workflow.run_tutorial("aimz_trainer", NUM_ROWS, phases)
    assert outcome["shapes"] == {"y": [1, 500, NUM_ROWS], "p": [1, 500, NUM_ROWS]}
    layout = outcome["layout"]
    assert set(layout) == {"posterior_predictive", "posterior"}
    assert layout["posterior_predictive"] == {"y": ["chain", "draw", "data"], "p": ["chain", "draw", "data"]}
    for site in SITES:
        assert layout["posterior"][site][:2] == ["chain", "draw"]
    assert "p" not in layout["posterior"]  # the guide's prototype-batch p is not a posterior draw
    assert outcome["num_losses"] == 10 * NUM_ROWS // 2000  # epochs x steps per epoch
    assert set(phases.figures) == {"imports", "data", "model", "fit", "predict", "cleanup"}


def tutorial_code_lines() -> list[str]:
    """The code lines of the tutorial's cells, less those the workflow leaves out (the notebook
    display and plotting lines, see its docstring)."""
    text = TUTORIAL_RST.read_text()
    cells = re.findall(r"\.\. jupyter-execute::\n(?:  :hide-output:\n)?\n((?:  .*\n|\n)+)", text)
    lines = [" ".join(line.split()) for cell in cells for line in cell.splitlines() if line.strip()]
    left_out = ("%config", "import matplotlib", "fig, ax", "ax.", "from aimz import", "n = 1_000_000")
    return [line for line in lines if not line.startswith(left_out) and line != "dt"]


@pytest.mark.skipif(not TUTORIAL_RST.exists(), reason="the reference tutorial is not beside this checkout")
def test_the_workflow_holds_every_line_of_the_tutorial():
    # Compared with runs of spaces collapsed: the formatter aligns comments its own way.
    ours = {" ".join(line.split()) for line in inspect.getsource(tutorial_workflow.run_tutorial).splitlines()}
    lines = tutorial_code_lines()
    assert len(lines) > 50
    missing = [line for line in lines if line not in ours]
    assert missing == []
