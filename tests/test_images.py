import subprocess
import sys

import numpy as np
import pytest
from conftest import make_image
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from transferlab.images import IMAGE_EXTENSIONS, Sample, load_image, read_split, write_split


def test_image_files_are_those_imagefolder_accepts():
    assert IMAGE_EXTENSIONS == IMG_EXTENSIONS


def test_light_stages_start_without_torch():
    code = ("import sys, transferlab.stages.fetch, transferlab.stages.split, transferlab.stages.plot, "
            "transferlab.stages.curve, transferlab.compare; "
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_stages_that_train_and_score_efficientnet_lite0_start_without_torchvision():
    """Importing torchvision costs each stage process a second or more; lite0 does not need it."""
    code = ("import sys, transferlab.stages.train, transferlab.stages.evaluate, transferlab.stages.curve_point; "
            "from transferlab.models import build_for_mode; build_for_mode('efficientnet_lite0', 2, 'scratch'); "
            "print('torchvision' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK", "I;16", "1"])
def test_every_pillow_mode_becomes_8bit_rgb(tmp_path, mode):
    path = tmp_path / f"image.{'jpg' if mode == 'CMYK' else 'png'}"
    Image.new("RGB", (30, 20), (250, 128, 10)).convert(mode).save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (30, 20)


def test_16bit_png_is_rescaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(path)
    assert load_image(path).getpixel((0, 0)) == (128, 128, 128)


def test_transparency_lands_on_white(tmp_path):
    path = tmp_path / "alpha.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(path)
    assert load_image(path).getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (60, 20), (10, 200, 10)).save(path, exif=exif)
    assert load_image(path).size == (20, 60)


def test_decoded_once_at_the_size_the_transforms_need(tmp_path):
    path = make_image(tmp_path / "big.jpg", (100, 150, 200), seed=0, size=(800, 600))
    small = load_image(path, min_side=40)
    assert min(small.size) == 40 and small.size == (53, 40)
    assert load_image(path, min_side=1000).size == (800, 600)  # never enlarged


def test_split_csv_round_trip(tmp_path):
    rows = [Sample("data/raw/train/ants/ä b.jpg", "ants"), Sample("x,y.jpg", "bees")]
    write_split(tmp_path / "train.csv", rows)
    assert read_split(tmp_path / "train.csv") == rows
