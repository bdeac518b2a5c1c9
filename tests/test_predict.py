"""Using a trained model: the Python API and `transferlab predict`, from the checkpoint alone."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_image

from transferlab.data import ImageDataset, build_transform, make_loader
from transferlab.errors import UserError
from transferlab.files import save_checkpoint
from transferlab.hardware import pick_hardware
from transferlab.images import Sample
from transferlab.models import build_for_mode, describe
from transferlab.store import open_store

CLASSES = ["ants", "bees", "wasps"]


def write_checkpoint(path, name="squeezenet", **changes):
    """A checkpoint as the train stage writes it (random weights: only the plumbing is tested)."""
    torch.manual_seed(0)
    built = build_for_mode(name, len(CLASSES), "scratch")
    checkpoint = {**describe(built), "format": 1, "mode": "scratch", "model": name, "classes": CLASSES,
                  "state_dict": built.model.state_dict(), "versions": {"transferlab": "0.1.0"}, **changes}
    save_checkpoint(path, checkpoint)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "scratch.pt")


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "photos"
    paths = [make_image(folder / "sub" / f"{i}.jpg", (40 * i, 90, 200 - 30 * i), i, (300 + 10 * i, 260))
             for i in range(5)]
    (folder / "notes.jpg").write_text("not an image")
    return folder, paths


def test_three_lines_from_checkpoint_to_predictions(checkpoint, images):
    from transferlab import Classifier

    classifier = Classifier.load(checkpoint)
    results = classifier.predict([images[0], images[0] / "missing.jpg"], top_k=2)
    by_name = {os.path.basename(r.path): r for r in results}
    assert len(results) == 6 + 1 - 0  # five photos, notes.jpg, the missing one
    assert by_name["notes.jpg"].error == "not an image Pillow can decode" and by_name["notes.jpg"].label is None
    assert by_name["missing.jpg"].error == "no such file"
    good = [r for r in results if r.error is None]
    assert len(good) == 5 and all(r.label in CLASSES and len(r.top) == 2 for r in good)
    assert all(r.top[0] == (r.label, r.confidence) and r.top[0][1] >= r.top[1][1] for r in good)


@pytest.mark.parametrize("name", ["squeezenet", "timm/test_vit.r160_in1k"])  # bilinear; bicubic, timm's config
def test_predictions_match_what_evaluate_computes(name, images, tmp_path):
    from transferlab import Classifier

    classifier = Classifier.load(write_checkpoint(tmp_path / "model.pt", name), device="cpu")
    _, paths = images
    ours = classifier.predict(paths, top_k=3)
    samples = [Sample(str(p), "ants") for p in paths]
    store = open_store(samples, classifier.preprocess.resize_size, tmp_path / "cache",
                       resample=classifier.preprocess.interpolation)
    dataset = ImageDataset(samples, CLASSES, build_transform(classifier.preprocess, False), store)
    loader = make_loader(dataset, 2, False, 0)
    from transferlab.engine import predict
    reference = predict(classifier.model, loader, pick_hardware("cpu", "fp32", False, 0, False)).probs
    for prediction, probs in zip(ours, reference):
        assert prediction.label == CLASSES[probs.argmax()]
        assert prediction.confidence == pytest.approx(probs.max(), abs=1e-6)


@pytest.mark.parametrize("changes, words", [({"format": 2}, "format 2"), ({"classes": None}, "")])
def test_a_checkpoint_from_another_version_is_refused_clearly(tmp_path, changes, words):
    from transferlab import Classifier

    path = write_checkpoint(tmp_path / "other.pt", **changes)
    if changes.get("classes", "") is None:
        checkpoint = torch.load(path, weights_only=True)
        del checkpoint["classes"]
        torch.save(checkpoint, path)
        words = "lacks classes"
    with pytest.raises(UserError, match=f"not a checkpoint this transferlab reads.*{words}.*retrain it"):
        Classifier.load(path)
    with pytest.raises(UserError, match="no such checkpoint"):
        Classifier.load(tmp_path / "nope.pt")


@pytest.mark.integration
def test_predict_command_writes_table_csv_json_and_grid(checkpoint, images, tmp_path):
    folder, _ = images
    command = [os.path.join(os.path.dirname(sys.executable), "transferlab"), "predict", str(checkpoint),
               str(folder), str(folder / "sub" / "*.jpg"), "--top-k", "2", "--csv", str(tmp_path / "p.csv"),
               "--json", str(tmp_path / "p.json"), "--grid", str(tmp_path / "grid.png")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "notes.jpg  skipped: not an image Pillow can decode" in result.stdout
    assert "10 images classified, 1 skipped" in result.stderr  # the folder's five and the glob's five
    rows = json.loads((tmp_path / "p.json").read_text())
    assert len(rows) == 11 and sum(r["error"] is not None for r in rows) == 1
    assert (tmp_path / "p.csv").read_text().count("\n") == 12
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.integration
def test_predict_command_with_a_bad_checkpoint_says_so(tmp_path):
    (tmp_path / "fake.pt").write_text("not a checkpoint")
    command = [os.path.join(os.path.dirname(sys.executable), "transferlab"), "predict", str(tmp_path / "fake.pt"),
               "x.jpg"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "refused to load" in result.stderr
