import shutil
from collections import Counter

import pytest
from conftest import CLASS_COLORS, make_dataset, make_image
from PIL import Image

from transferlab.splits import SplitError, make_splits


def reasons(report: dict) -> dict[str, str]:
    return {row["path"].rsplit("/", 1)[-1]: row["reason"] for row in report["skipped"]}


def test_tutorial_layout_val_folder_is_test_and_val_is_stratified(tmp_path):
    raw = make_dataset(tmp_path / "raw", train_per_class=20, val_per_class=5)
    splits, report = make_splits(raw, val_fraction=0.2, test_fraction=0.3, seed=1)
    assert report["classes"] == ["ants", "bees"]
    assert report["counts"] == {"train": {"ants": 16, "bees": 16}, "val": {"ants": 4, "bees": 4},
                                "test": {"ants": 5, "bees": 5}}
    assert all("/val/" in s.path for s in splits["test"])
    paths = [set(s.path for s in rows) for rows in splits.values()]
    assert not (paths[0] & paths[1]) and not (paths[0] & paths[2]) and not (paths[1] & paths[2])


def test_same_seed_same_split_other_seed_other_split(tmp_path):
    raw = make_dataset(tmp_path / "raw", train_per_class=20)
    first, _ = make_splits(raw, 0.2, 0.2, seed=7)
    again, _ = make_splits(raw, 0.2, 0.2, seed=7)
    other, _ = make_splits(raw, 0.2, 0.2, seed=8)
    assert first == again
    assert first["val"] != other["val"] and first["test"] == other["test"]


def test_train_per_class_shrinks_train_only_and_says_which_classes_had_fewer(tmp_path):
    raw = make_dataset(tmp_path / "raw", train_per_class=20, val_per_class=5)
    for i in range(14):  # bees keep 6 images in train/: fewer than asked for, once val has its share
        (raw / "train/bees" / f"bees_{i:03d}.jpg").unlink()
    full, _ = make_splits(raw, 0.2, 0.2, seed=3)
    bees = sum(s.label == "bees" for s in full["train"])
    small, report = make_splits(raw, 0.2, 0.2, seed=3, train_per_class=7)
    assert small["val"] == full["val"] and small["test"] == full["test"]
    assert set(small["train"]) < set(full["train"])
    assert bees < 7 and report["counts"]["train"] == {"ants": 7, "bees": bees}
    assert report["train_per_class"]["classes_with_fewer"] == {"bees": bees}


def test_one_folder_per_class_gets_test_split_off_stratified(tmp_path):
    raw = tmp_path / "raw"
    for name, color in CLASS_COLORS.items():
        for i in range(10):
            make_image(raw / name / "nested" / f"{i}.png", color, seed=i + len(name) * 100)
    splits, report = make_splits(raw, val_fraction=0.25, test_fraction=0.2, seed=0)
    assert report["layout"] == "one folder per class"
    assert report["counts"]["test"] == {"ants": 2, "bees": 2}
    assert report["counts"]["val"] == {"ants": 2, "bees": 2}
    assert Counter(s.label for s in splits["train"]) == {"ants": 6, "bees": 6}


def test_unusable_files_are_skipped_with_their_reason(tmp_path):
    raw = make_dataset(tmp_path / "raw")
    ants = raw / "train" / "ants"
    Image.new("RGB", (30, 30), "red").save(ants / "imageNotFound.gif")
    good = (ants / "ants_000.jpg").read_bytes()
    (ants / "truncated.jpg").write_bytes(make_image(tmp_path / "big.jpg", (1, 2, 3), 5, (400, 300)).read_bytes()[:2000])
    (ants / "notes.jpg").write_text("not an image")
    (ants / "empty.jpg").write_bytes(b"")
    (ants / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (ants / "readme.txt").write_text("hello")
    (raw / "val" / "bees" / "copy_of_train_ant.jpg").write_bytes(good)
    splits, report = make_splits(raw, 0.2, 0.2, seed=0)
    why = reasons(report)
    assert "ImageFolder" in why["imageNotFound.gif"] and "ImageFolder" in why["readme.txt"]
    assert "decode" in why["truncated.jpg"] and "truncated" in why["truncated.jpg"]
    assert "not an image" in why["notes.jpg"]
    assert why["empty.jpg"] == "empty file (0 bytes)"
    assert why[".DS_Store"] == "hidden file"
    # The test copy is kept; the identical training image is dropped, never trained on.
    assert why["ants_000.jpg"] == f"exact duplicate of {(raw / 'val/bees/copy_of_train_ant.jpg').as_posix()}"
    used = {s.path for rows in splits.values() for s in rows}
    assert not used & {row["path"] for row in report["skipped"]}
    assert sum(map(sum, (c.values() for c in report["counts"].values()))) == 28 + 1 - 1  # copy in, original out


def test_class_names_must_match_between_train_and_val(tmp_path):
    raw = make_dataset(tmp_path / "raw")
    shutil.move(raw / "val" / "bees", raw / "val" / "wasps")
    with pytest.raises(SplitError, match=r"differ between train/ \['ants', 'bees'\] and val/ \['ants', 'wasps'\]"):
        make_splits(raw, 0.2, 0.2, seed=0)


def test_too_little_left_stops_with_a_clear_message(tmp_path):
    raw = make_dataset(tmp_path / "raw")
    shutil.rmtree(raw / "train" / "bees")
    shutil.rmtree(raw / "val" / "bees")
    with pytest.raises(SplitError, match="needs at least 2 class folders"):
        make_splits(raw, 0.2, 0.2, seed=0)
    raw = make_dataset(tmp_path / "raw2", train_per_class=1)
    with pytest.raises(SplitError, match="fewer than 2 usable images"):
        make_splits(raw, 0.2, 0.2, seed=0)


def test_class_folder_without_usable_images_is_reported(tmp_path):
    raw = make_dataset(tmp_path / "raw")
    (raw / "train" / "wasps").mkdir()
    (raw / "train" / "wasps" / "broken.jpg").write_text("nope")
    _, report = make_splits(raw, 0.2, 0.2, seed=0)
    assert report["empty_classes"] == ["wasps"] and report["classes"] == ["ants", "bees"]


def test_odd_but_usable_images_are_used(tmp_path):
    raw = make_dataset(tmp_path / "raw")
    ants, bees = raw / "train" / "ants", raw / "train" / "bees"
    Image.new("RGBA", (40, 30), (200, 60, 40, 128)).save(ants / "alpha.png")
    Image.new("L", (40, 30), 90).save(ants / "gray.jpg")
    Image.new("CMYK", (40, 30), (0, 200, 200, 0)).save(ants / "cmyk.jpg")
    Image.new("RGB", (40, 30), (200, 60, 40)).convert("P").save(bees / "palette.png")
    Image.new("I;16", (40, 30), 40000).save(bees / "deep.png")
    make_image(bees / "sub" / "deeper" / "nested.jpg", (40, 80, 200), seed=3)
    make_image(bees / "abeille_été_蜂.jpg", (40, 80, 200), seed=4)
    splits, report = make_splits(raw, 0.2, 0.2, seed=0)
    used = {s.path.rsplit("/", 1)[-1] for rows in splits.values() for s in rows}
    assert {"alpha.png", "gray.jpg", "cmyk.jpg", "palette.png", "deep.png", "nested.jpg", "abeille_été_蜂.jpg"} <= used
    assert report["skipped"] == []


def test_decompression_bomb_is_skipped_not_decoded(tmp_path, monkeypatch):
    raw = make_dataset(tmp_path / "raw")
    make_image(raw / "train" / "ants" / "huge.jpg", (200, 60, 40), seed=9, size=(400, 300))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # the guard's limit, lowered to fit a test
    _, report = make_splits(raw, 0.2, 0.2, seed=0)
    assert "decompression-bomb guard" in reasons(report)["huge.jpg"]
    assert "120000 pixels" in reasons(report)["huge.jpg"]


def test_the_test_split_of_a_class_folder_layout_stays_with_the_seed(tmp_path):
    raw = tmp_path / "raw"
    for name, color in CLASS_COLORS.items():
        for i in range(20):
            make_image(raw / name / f"{i}.png", color, seed=i + len(name) * 100)
    first, _ = make_splits(raw, 0.2, 0.2, seed=1)
    other, _ = make_splits(raw, 0.2, 0.2, seed=2)
    assert first["test"] == other["test"] and first["val"] != other["val"]
    assert make_splits(raw, 0.2, 0.2, seed=1, test_seed=5)[0]["test"] != first["test"]
