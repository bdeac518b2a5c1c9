"""A second, synthetic dataset: four shapes, so the defaults can be checked on data they were not tuned on.

    python benchmarks/shapes_data.py DEST [--per-class 60] [--seed 0]

Writes DEST/<class>/<class>_NNNN.jpg in ImageFolder layout (one sub-folder per class), which
params.yaml's data.url accepts as it is (`dvc exp run -S data.url=DEST`). Classes: circle, square,
triangle, cross. Each 96x96 RGB image holds one filled shape spanning 25-60% of the side, fully
inside at a random position, rotated at random (all but the circle), in a random colour on a
random-colour background, under a few random distractor lines and Gaussian pixel noise: colour says
nothing of the class, so a model must use shape.

Deterministic: image i of a class depends only on (--seed, class, i), so a smaller --per-class
writes the first images of a larger one.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "square", "triangle", "cross")
SIDE = 96
SPAN = (0.25, 0.60)       # the shape's extent (its enclosing circle's diameter), as a share of the side
NOISE_STD = 12.0          # Gaussian pixel noise, in 0-255 units
LINES = (2, 5)            # distractor lines per image: at least 2, fewer than 5
MIN_CONTRAST = 120        # shape and background colours differ by at least this (sum over RGB)

# Outlines around the origin, before rotation and scaling (each is scaled to fit its circle).
OUTLINES = {
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": [(math.cos(a), math.sin(a)) for a in (math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))],
    "cross": [(-1, -1 / 3), (-1 / 3, -1 / 3), (-1 / 3, -1), (1 / 3, -1), (1 / 3, -1 / 3), (1, -1 / 3),
              (1, 1 / 3), (1 / 3, 1 / 3), (1 / 3, 1), (-1 / 3, 1), (-1 / 3, 1 / 3), (-1, 1 / 3)],
}


def random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def contrasting_colour(rng: np.random.Generator, background: tuple[int, int, int]) -> tuple[int, int, int]:
    """A random colour far enough from `background` that the shape is visible."""
    while True:
        colour = random_colour(rng)
        if sum(abs(a - b) for a, b in zip(colour, background)) >= MIN_CONTRAST:
            return colour


def polygon(kind: str, centre: tuple[float, float], radius: float, angle: float) -> list[tuple[float, float]]:
    """`kind`'s outline rotated by `angle`, scaled so its farthest corner is `radius` from `centre`."""
    points = OUTLINES[kind]
    scale = radius / max(math.hypot(x, y) for x, y in points)
    cos, sin = math.cos(angle), math.sin(angle)
    return [(centre[0] + scale * (x * cos - y * sin), centre[1] + scale * (x * sin + y * cos)) for x, y in points]


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, colour: tuple[int, int, int], rng: np.random.Generator) -> None:
    """One filled `kind`, its enclosing circle fully inside the image (so any rotation fits)."""
    radius = rng.uniform(*SPAN) * SIDE / 2
    cx, cy = rng.uniform(radius, SIDE - radius, 2)
    if kind == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    else:
        draw.polygon(polygon(kind, (cx, cy), radius, rng.uniform(0, 2 * math.pi)), fill=colour)


def draw_lines(draw: ImageDraw.ImageDraw, rng: np.random.Generator) -> None:
    """A few thin lines of random colours between random points: clutter that is no class."""
    for _ in range(rng.integers(*LINES)):
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, SIDE, 4))
        draw.line((x0, y0, x1, y1), fill=random_colour(rng), width=int(rng.integers(1, 3)))


def add_noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, NOISE_STD, (SIDE, SIDE, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def make_image(kind: str, rng: np.random.Generator) -> Image.Image:
    background = random_colour(rng)
    image = Image.new("RGB", (SIDE, SIDE), background)
    draw = ImageDraw.Draw(image)
    draw_shape(draw, kind, contrasting_colour(rng, background), rng)
    draw_lines(draw, rng)
    return add_noise(image, rng)


def write_dataset(dest: Path, per_class: int, seed: int) -> int:
    """Write `per_class` JPEGs of every class under dest/<class>/; returns how many were written."""
    for index, kind in enumerate(CLASSES):
        folder = dest / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, index, i])
            make_image(kind, rng).save(folder / f"{kind}_{i:04d}.jpg", quality=90)
    return per_class * len(CLASSES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", type=Path, help="a new (or empty) folder")
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.per_class < 1:
        parser.error("--per-class must be at least 1")
    if args.dest.exists() and any(args.dest.iterdir()):
        # Images left from another run would join the dataset, since data.url takes the whole folder.
        parser.error(f"{args.dest} exists and is not empty; name a new folder or remove that one")
    count = write_dataset(args.dest, args.per_class, args.seed)
    print(f"wrote {count} images to {args.dest}: {args.per_class} per class ({', '.join(CLASSES)}), "
          f"{SIDE}x{SIDE} RGB JPEG, seed {args.seed}")


if __name__ == "__main__":
    main()
