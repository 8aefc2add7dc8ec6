"""The `discovery sim ...` commands as a user runs them: options checked, results as JSON."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from discovery.cli.main import app

IN_MS = np.array([[0, 100, 0, 80], [100, 0, 50, 90], [0, 50, 0, 120], [80, 90, 120, 0]], dtype=float)


def test_sim_vivaldi_takes_the_unit_and_refuses_others(tmp_path):
    matrix = tmp_path / "seattle_ms.tsv"
    np.savetxt(matrix, IN_MS)
    runner = CliRunner()
    base = ["sim", "vivaldi", "--matrix", str(matrix), "--rounds", "2", "--neighbours", "2", "--json"]
    told = runner.invoke(app, [*base, "--unit", "ms"])
    assert told.exit_code == 0 and told.stderr == "", told.output
    assert json.loads(told.stdout)["unit"] == "ms"
    guessed = runner.invoke(app, base)
    assert guessed.exit_code == 0 and json.loads(guessed.stdout)["unit"] == "s"
    assert guessed.stderr.count("\n") == 1 and "(--unit ms)" in guessed.stderr
    refused = runner.invoke(app, [*base, "--unit", "us"])
    assert refused.exit_code == 1 and refused.stderr == "error: --unit must be ms or s, not 'us'\n"
    for command in ("spiral", "overlay"):  # the other commands that load a matrix take it too
        assert "--unit" in runner.invoke(app, ["sim", command, "--help"]).stdout


