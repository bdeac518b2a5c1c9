"""SIGTERM in the middle of training: good outputs stay, and the resumed run ends the same."""
import io
import json
import sys

import pytest
import torch
import yaml
from conftest import PINNED_HARDWARE, copy_project, interrupt, make_dataset, pipeline_env, run

pytestmark = pytest.mark.integration  # through the real tools (make test-integration)

TRAIN = [sys.executable, "-m", "transferlab.stages.train", "scratch"]


def test_sigterm_keeps_good_outputs_and_resume_matches_an_uninterrupted_run(tmp_path):
    project = copy_project(tmp_path / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"] = "resnet"  # scratch mode: random init, no weights file needed
    params["data"]["url"] = str(make_dataset(tmp_path / "tiny", train_per_class=8, val_per_class=4))
    params["train"].update({**PINNED_HARDWARE, "epochs": 6, "batch_size": 4, "workers": 1})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = pipeline_env()
    for stage in ("fetch", "split"):
        run([sys.executable, "-m", f"transferlab.stages.{stage}"], project, env)

    run(TRAIN, project, env)
    outputs = [project / "models/scratch.pt", project / "reports/train/scratch.json"]
    good = [path.read_bytes() for path in outputs]
    uninterrupted = json.loads(good[1])
    assert not list((project / "data/cache/resume").glob("resume-*")), "a finished run leaves no resume file"

    # Four epochs still to go when the signal is sent: it lands mid-training even on a busy machine.
    returncode, stderr = interrupt(TRAIN, project, env, "epoch 2/6")
    assert returncode == 143 and "interrupted by SIGTERM" in stderr
    assert "unchanged, as the last finished run left them: models/scratch.pt, logs/scratch/" in stderr
    assert [path.read_bytes() for path in outputs] == good
    assert len(list((project / "data/cache/resume").glob("resume-scratch-*.pt"))) == 1

    resumed_run = run(TRAIN, project, env)
    assert "resuming after epoch" in resumed_run.stdout
    resumed = json.loads(outputs[1].read_text())
    for key in ("best_epoch", "best_val_accuracy", "best_val_loss", "epochs"):
        assert resumed[key] == uninterrupted[key], key
    before = torch.load(io.BytesIO(good[0]), weights_only=True)["state_dict"]
    after = torch.load(outputs[0], weights_only=True)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (project / "logs/scratch/plots/metrics/val/acc.tsv").read_text().count("\n") == 7  # header + 6 epochs
