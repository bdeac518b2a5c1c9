"""training.py: the pieces the train stage and a learning curve's points share."""
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import CLASS_COLORS, make_image

from transferlab.data import ImageSource
from transferlab.hardware import pick_hardware
from transferlab.images import Sample
from transferlab.models import build_model
from transferlab.params import load_params
from transferlab.store import open_store
from transferlab.training import Subset, prepare

CLASSES = list(CLASS_COLORS)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    def make(split, n):
        return [Sample(str(make_image(root / split / f"{c}{i}.jpg", color, i, (40, 40))), c)
                for c, color in CLASS_COLORS.items() for i in range(n)]
    return {"train": make("train", 5), "val": make("val", 2)}


def test_a_curves_points_of_every_size_share_one_hardware_decision(samples, tmp_path):
    """With `budget: epochs` a point of 1 image per class trains on fewer batches than one of 5:
    the decision still rests on the whole training set's shapes, so it is measured once and every
    size trains at the same settings."""
    built = build_model("squeezenet", 2, pretrained=False)
    built = replace(built, preprocess=replace(built.preprocess, resize_size=36, crop_size=32))
    train = replace(load_params(Path(__file__).resolve().parents[1] / "params.yaml").finetune, batch_size=4)
    source = ImageSource(open_store(samples["train"] + samples["val"], 36, tmp_path / "store"))
    decisions = []
    for rows in ([0, 5], list(range(10))):  # 1 and 5 images per class
        hw = pick_hardware("cpu", "auto", False, 0, False, True)
        decided, *_ = prepare(built, CLASSES, samples, train, hw, 0, source, tmp_path / "cache",
                              subset=Subset(rows, embed_seed=0))
        decisions.append(decided.decision)
    assert decisions[0]["measured_now"] and not decisions[1]["measured_now"]
    assert decisions[0]["chosen"] == decisions[1]["chosen"]
