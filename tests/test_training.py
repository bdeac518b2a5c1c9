"""training.py: the pieces the train stage and a learning curve's points share."""
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import CLASS_COLORS, make_image

from transferlab import training
from transferlab.data import ImageSource
from transferlab.hardware import DTYPES, pick_hardware
from transferlab.images import SPLITS, Sample, write_split
from transferlab.models import build_model
from transferlab.params import load_params
from transferlab.store import open_store
from transferlab.training import Subset, prepare, summary, train_mode

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


def fake_decision(chosen: list[str]):
    """A stand-in for hardware.decide that 'measures' the precision `chosen` names, one per call
    (a pruned cache, another GPU, a new torch: a measurement may come out otherwise); like decide,
    it measures only what is still `auto`."""
    def decide(hw, work, cache_dir, key_parts, input_seconds=None):
        if "precision" not in hw.decision.get("auto_fields", []):
            return hw
        precision = chosen.pop(0)
        return replace(hw, amp_dtype=DTYPES[precision], decision={"chosen": precision, "measured_now": True})
    return decide


def test_a_resumed_run_trains_at_the_settings_the_interrupted_one_decided(samples, tmp_path, monkeypatch):
    """`precision: auto` measured fp32 for the first run; measured again after the interruption it
    comes out fp16, whose GradScaler cannot load the disabled one's state. The resumed run keeps
    the decided settings (and ends as an uninterrupted run does)."""
    split_dir = tmp_path / "split"
    for name in SPLITS:
        write_split(split_dir / f"{name}.csv", samples.get(name, samples["val"]))
    real_build = training.build_for_mode
    monkeypatch.setattr(training, "build_for_mode", lambda *args: (lambda built: replace(
        built, preprocess=replace(built.preprocess, resize_size=36, crop_size=32)))(real_build(*args)))
    train = replace(load_params(Path(__file__).resolve().parents[1] / "params.yaml").scratch, batch_size=4,
                    device="cpu", precision="auto", channels_last=False, workers=0, tensor_batches=True, epochs=2,
                    scheduler="none")  # "stopped after epoch 1" is a run of epochs=1: a cosine over it would differ

    def train_scratch(epochs: int, measured: str, identity: str):
        monkeypatch.setattr(training, "decide", fake_decision([measured]))
        return train_mode("mobilenet_v3_small", "scratch", replace(train, epochs=epochs), 0, CLASSES, samples,
                          split_dir, tmp_path / "cache", (tmp_path / "resume", "scratch", [identity]))
    uninterrupted = train_scratch(2, "fp32", "uninterrupted")
    train_scratch(1, "fp32", "interrupted")  # stopped after epoch 1: its resume state stays
    resumed = train_scratch(2, "fp16", "interrupted")
    assert resumed.hw.precision == "fp32" and resumed.hw.decision["kept_from_resume_state"]
    keys = ("train_loss", "train_acc", "val_loss", "val_acc")
    assert [[r[k] for k in keys] for r in resumed.result.history] == \
        [[r[k] for k in keys] for r in uninterrupted.result.history]
    details = summary(resumed.result, resumed.built, resumed.model, resumed.hw, 1.0, resumed.steps_per_epoch)
    assert details["precision"] == "fp32" and details["peak_gpu_memory_mb"] is None  # a CPU: peak_rss_mb says it
    assert details["batchnorm_statistics"] == "over each batch"


def test_mixing_is_refused_for_data_of_one_class_with_a_message():
    from transferlab.errors import UserError

    train = load_params(Path(__file__).resolve().parents[1] / "params.yaml").finetune
    assert training.batch_mixer(train, 2) is None  # off by default
    assert training.batch_mixer(replace(train, cutmix_alpha=1.0), 2)
    with pytest.raises(UserError, match="train.mixup_alpha, train.cutmix_alpha: .*this data has 1; set both to 0"):
        training.batch_mixer(replace(train, mixup_alpha=0.2), 1)
