"""ONNX export of a checkpoint, checked with onnxruntime against PyTorch, for each tutorial family."""
import os
import subprocess
import sys

import pytest
from test_predict import CLASSES, write_checkpoint

from transferlab.export import export_onnx, read_metadata, validate_onnx

# One model of each tutorial family, and EfficientNet-Lite; vgg's smallest has 0.5 GB of weights,
# so its export (20 s here) runs with the slow tier.
FAMILIES = ["resnet", "alexnet", pytest.param("vgg", marks=pytest.mark.slow), "squeezenet", "densenet", "inception",
            "efficientnet_lite0", "timm/test_vit.r160_in1k", "timm/test_convnext"]


@pytest.mark.parametrize("name", FAMILIES)
def test_exported_onnx_matches_pytorch_and_carries_classes_and_preprocessing(tmp_path, name):
    checkpoint = write_checkpoint(tmp_path / f"{name}.pt", name)
    onnx_path = export_onnx(checkpoint, tmp_path / f"{name}.onnx")
    assert validate_onnx(checkpoint, onnx_path) < 1e-3
    meta = read_metadata(onnx_path)
    assert meta["classes"] == CLASSES and meta["preprocess"]["crop_size"] in (224, 299, 160)
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.integration
def test_export_command(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "squeezenet.pt", "squeezenet")
    command = [os.path.join(os.path.dirname(sys.executable), "transferlab"), "export", str(checkpoint),
               "--out", str(tmp_path / "squeezenet.onnx")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "onnxruntime matches PyTorch within" in result.stdout
    assert read_metadata(tmp_path / "squeezenet.onnx")["classes"] == CLASSES
