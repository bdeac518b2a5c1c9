"""The README and docs/ quote one set of numbers: docs/results.json, written by benchmarks/results.py
from one run. Every results block in the text must be what that file renders, and the README may
state no other accuracy."""
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from results import BLOCK, blocks, render  # noqa: E402

RESULTS = json.loads((ROOT / "docs/results.json").read_text())
TEXTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ACCURACY = re.compile(r"(?<![\d.])0\.\d{3}(?!\d)")  # 0.941: how the text writes an accuracy


@pytest.mark.parametrize("path", TEXTS, ids=lambda p: p.name)
def test_every_results_block_is_what_the_results_file_renders(path):
    for name, content in blocks(path.read_text()):
        assert content == render(RESULTS, name), f"{path.name}: results block {name!r} differs from docs/results.json"


def test_the_readme_shows_the_main_run_and_no_other_accuracy():
    readme = (ROOT / "README.md").read_text()
    assert [name for name, _ in blocks(readme)].count("main") == 1
    quoted = set(ACCURACY.findall("".join(render(RESULTS, name) for name, _ in blocks(readme))))
    outside = set(ACCURACY.findall(BLOCK.sub("", readme)))
    assert outside <= quoted, f"accuracies outside the results blocks: {sorted(outside - quoted)}"


def test_a_changed_number_fails_the_check():
    text = f"<!-- results:main -->\n{render(RESULTS, 'main')}<!-- /results -->\n"
    assert [content == render(RESULTS, name) for name, content in blocks(text)] == [True]
    first = RESULTS["runs"][0]["modes"]["finetune"]["accuracy"]
    changed = text.replace(f"{first:.3f}", f"{first - 0.01:.3f}")
    assert [content == render(RESULTS, name) for name, content in blocks(changed)] == [False]


def test_the_results_come_from_the_shipped_params():
    """The quoted run is the project as shipped: params.yaml with lite0 and the local archive, and
    no other key changed (a stale results file, or one run with --set, fails here)."""
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())
    ran = RESULTS["params"]
    assert ran["model"] == "efficientnet_lite0" and RESULTS["sets"] == []
    assert {**ran, "model": shipped["model"], "data": shipped["data"]} == {**shipped, "seed": ran["seed"]}
