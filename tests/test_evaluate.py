"""stages/evaluate.py through the real `dvc exp run`: evaluate.tta's views, recorded per mode, and
a view it does not know refused before anything is written."""
import json
import subprocess
from pathlib import Path

import pytest
from conftest import copy_finished, run

pytestmark = pytest.mark.integration  # through the real tools (make test-integration)

MODES = ("finetune", "extract", "scratch")
EVALUATED = ["metrics/eval.json", "reports/eval.json", *(f"metrics/predictions/{m}.csv" for m in MODES)]
TRAINED = [f"models/{m}.pt" for m in MODES]


def files(project: Path, paths: list[str]) -> dict[str, bytes]:
    return {path: (project / path).read_bytes() for path in paths}


def tta_of(project: Path) -> dict[str, list[str]]:
    report = json.loads((project / "reports/eval.json").read_text())
    return {mode: report[mode]["tta"] for mode in MODES}


def test_tta_through_dvc_exp_run_is_recorded_and_a_bad_view_changes_nothing(finished_project, tmp_path):
    project, env = copy_finished(finished_project, tmp_path / "project")
    assert tta_of(project) == {mode: ["center"] for mode in MODES}  # params.yaml's default
    good, trained = files(project, EVALUATED), files(project, TRAINED)

    result = run(["dvc", "exp", "run", "-S", "evaluate.tta=[bogus]"], project, env, check=False)
    subprocess.run(["git", "checkout", "--", "params.yaml"], cwd=project, check=True)  # the test's copy
    assert result.returncode != 0
    message = result.stderr + result.stdout
    assert "params.yaml: evaluate.tta: 'bogus' is not a view; valid views: center, hflip" in message
    assert "transferlab evaluate: unchanged, as the last finished run left them: metrics/eval.json" in message
    assert files(project, EVALUATED) == good

    run(["dvc", "exp", "run", "-S", "evaluate.tta=[center,hflip]"], project, env)
    assert tta_of(project) == {mode: ["center", "hflip"] for mode in MODES}
    assert files(project, TRAINED) == trained  # evaluate's params retrain nothing
    metrics = json.loads((project / "metrics/eval.json").read_text())
    assert set(metrics) == set(MODES) and all(0 <= metrics[m]["accuracy"] <= 1 for m in MODES)
