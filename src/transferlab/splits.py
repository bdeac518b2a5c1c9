"""A fetched folder -> stratified, seeded train/val/test lists, with every skipped file explained."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import train_test_split

from transferlab.errors import UserError
from transferlab.images import Sample, file_digest, is_image_file, load_image
from transferlab.near_duplicates import near_copies
from transferlab.subsets import per_class_subset, sorted_by_path

# Decoding at a small scale still reads every byte of the file, so truncation is caught, cheaply.
_CHECK_SIDE = 64


class SplitError(UserError):
    """What is left after skipping unusable files cannot make a valid split."""


def image_problem(path: Path) -> str | None:
    """Why `path` cannot be used as an image, or None if it decodes."""
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    try:
        load_image(path, _CHECK_SIDE)
    except Image.DecompressionBombError as err:
        return f"refused by Pillow's decompression-bomb guard: {err}"
    except UnidentifiedImageError:
        return "not an image Pillow can decode (wrong extension or corrupt header)"
    except (OSError, ValueError, SyntaxError) as err:
        return f"fails to decode: {err}"
    return None


def scan_classes(folder: Path) -> tuple[list[Sample], list[dict]]:
    """Usable images under `folder/<class>/**` and the files skipped, each with its reason."""
    samples, skipped = [], []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(p for p in class_dir.rglob("*") if p.is_file()):
            reason = _skip_reason(path, class_dir)
            if reason:
                skipped.append({"path": path.as_posix(), "reason": reason})
            else:
                samples.append(Sample(path.as_posix(), class_dir.name))
    return samples, skipped


def _skip_reason(path: Path, class_dir: Path) -> str | None:
    if any(part.startswith(".") for part in path.relative_to(class_dir).parts):
        return "hidden file"
    if not is_image_file(path):
        return f"extension {path.suffix or '(none)'!r} is not one torchvision's ImageFolder loads"
    return image_problem(path)


def drop_duplicates(groups: list[list[Sample]]) -> tuple[list[list[Sample]], list[dict]]:
    """Keep the first copy of each byte-identical image, scanning `groups` in order.

    Putting the test group first guarantees that no copy of a test image is trained on.
    """
    first_seen: dict[bytes, str] = {}
    kept_groups, skipped = [], []
    for group in groups:
        kept = []
        for sample in group:
            digest = file_digest(sample.path)
            if digest in first_seen:
                skipped.append({"path": sample.path, "reason": f"exact duplicate of {first_seen[digest]}"})
            else:
                first_seen[digest] = sample.path
                kept.append(sample)
        kept_groups.append(kept)
    return kept_groups, skipped


def stratified_split(samples: list[Sample], fraction: float, seed: int, name: str) -> tuple[list[Sample], list[Sample]]:
    """Split off `fraction` of `samples`, stratified by label; same seed, same split."""
    labels = [s.label for s in samples]
    too_few = sorted(label for label, n in Counter(labels).items() if n < 2)
    if too_few:
        raise SplitError(f"cannot split off a {name} set: classes {too_few} have fewer than 2 usable "
                         f"images; add images or remove those class folders")
    try:
        rest, part = train_test_split(samples, test_size=fraction, stratify=labels, random_state=seed)
    except ValueError as err:
        raise SplitError(f"cannot split off {fraction:.0%} as a {name} set stratified by class: {err}; "
                         f"change split.{name}_fraction in params.yaml or add images") from None
    return sorted_by_path(rest), sorted_by_path(part)


def make_splits(raw: Path, val_fraction: float, test_fraction: float, seed: int, test_seed: int = 0,
                near_distance: int | None = None, cache_dir: Path | None = None,
                train_per_class: int | None = None) -> tuple[dict[str, list[Sample]], dict]:
    """Split the fetched folder `raw` into train/val/test and describe what was done.

    `raw/train` and `raw/val` (the tutorial's layout): test = val/, val = a stratified part of
    train/. Otherwise `raw/<class>/` folders: test and val are both split off, test with its own
    `test_seed`, so that runs with different `seed`s are scored on the same test images. With
    `near_distance` (perceptual-hash bits), near-copies of a test image leave train and val, and a
    val image with a near-copy in train, or in val images moved so, moves to train (the best epoch is
    not picked on copies).
    With `train_per_class`, train keeps at most that many images of each class (per_class_subset).
    """
    if (raw / "train").is_dir():
        layout = "train/ and val/ folders" if (raw / "val").is_dir() else "train/ folder only"
        pool, skipped = scan_classes(raw / "train")
        test, test_skipped = scan_classes(raw / "val") if (raw / "val").is_dir() else ([], [])
        skipped += test_skipped
        _check_same_classes(pool, test, raw)
    else:
        layout = "one folder per class"
        (pool, skipped), test = scan_classes(raw), []
    (test, pool), duplicates = drop_duplicates([test, pool])
    skipped += duplicates
    classes = sorted({s.label for s in pool})
    if len(classes) < 2:
        examples = "; ".join(f"{row['path']}: {row['reason']}" for row in skipped[:3])
        raise SplitError(f"{raw}: found {len(classes)} class(es) with usable images ({classes}); a "
                         f"classifier needs at least 2 class folders. {len(skipped)} files were "
                         f"skipped{', e.g. ' + examples if examples else ''}")
    if not test:
        pool, test = stratified_split(pool, test_fraction, test_seed, "test")
    near = {"threshold": "off" if near_distance is None else near_distance, "pairs": []}
    if near_distance is not None:
        pool, left_out = drop_near_copies(pool, test, near_distance, cache_dir)
        skipped += [{"path": row["path"], "reason": f"near-copy of test image {row['twin']} (perceptual-hash "
                     f"distance {row['distance']})"} for row in left_out]
        near["pairs"] += [{**row, "action": "left out of train and val"} for row in left_out]
    train, val = stratified_split(pool, val_fraction, seed, "val")
    if near_distance is not None:
        train, val, moved = move_near_copies(train, val, near_distance, cache_dir)
        near["pairs"] += [{**row, "action": "moved from val to train"} for row in moved]
    train, subset = per_class_subset(train, train_per_class, seed)
    splits = {"train": train, "val": val, "test": sorted_by_path(test)}
    report = {
        "layout": layout,
        "classes": classes,
        "counts": {name: _counts(rows, classes) for name, rows in splits.items()},
        "skipped": sorted(skipped, key=lambda row: row["path"]),
        "empty_classes": _empty_classes(raw, classes),
        "near_duplicates": near,
        "train_per_class": subset,
    }
    return splits, report


def drop_near_copies(pool: list[Sample], test: list[Sample], distance: int,
                     cache_dir: Path | None) -> tuple[list[Sample], list[dict]]:
    """`pool` without the near-copies of test images, and those left out (with twin and distance)."""
    found = near_copies(pool, test, distance, cache_dir)
    out = {row["path"] for row in found}
    return [s for s in pool if s.path not in out], found


def move_near_copies(train: list[Sample], val: list[Sample], distance: int,
                     cache_dir: Path | None) -> tuple[list[Sample], list[Sample], list[dict]]:
    """Val images with a near-copy in train, moved to train, and then those with a near-copy among the
    moved ones, until none is added: val then holds no copy of a training image (a twin's row names
    the image, in train by then, that it copies)."""
    found = near_copies(val, train, distance, cache_dir, chained=True)
    moving = {row["path"] for row in found}
    return (sorted_by_path(train + [s for s in val if s.path in moving]), [s for s in val if s.path not in moving],
            found)


def _check_same_classes(train: list[Sample], test: list[Sample], raw: Path) -> None:
    train_classes, test_classes = {s.label for s in train}, {s.label for s in test}
    if test and train_classes != test_classes:
        raise SplitError(f"{raw}: class folders differ between train/ {sorted(train_classes)} and val/ "
                         f"{sorted(test_classes)}; rename the folders so both hold the same classes")


def _empty_classes(raw: Path, classes: list[str]) -> list[str]:
    """Class folders whose files were all skipped: they are left out of the classifier."""
    folders = raw / "train" if (raw / "train").is_dir() else raw
    return sorted(p.name for p in folders.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.name not in classes)


def _counts(rows: list[Sample], classes: list[str]) -> dict[str, int]:
    counts = Counter(s.label for s in rows)
    return {name: counts[name] for name in classes}


