"""A checkpoint -> an ONNX file that carries its class names and preprocessing, and a check of it
with onnxruntime against PyTorch's own outputs (timm's export-then-validate habit).

The ONNX graph takes normalised images (batch, 3, crop, crop), any batch size, and returns the
logits; its metadata says how to get there: `transferlab.preprocess` (resize, crop, mean, std,
interpolation) and `transferlab.classes`, both JSON. Exported with torch's TorchScript-based
exporter (`dynamo=False`), which needs only the `onnx` package; the dynamo-based one would also
need onnxscript. TorchScript itself is not offered: torch has deprecated it.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from transferlab.errors import UserError
from transferlab.files import atomic_path
from transferlab.predict import Classifier

OPSET = 18


def export_onnx(checkpoint_path: str | Path, out_path: str | Path) -> Path:
    """Write the checkpoint's model as ONNX, with its classes and preprocessing in the metadata."""
    try:
        import onnx
    except ImportError:
        raise UserError("exporting needs the onnx package, which the project installs: pip install -e .") from None
    classifier = Classifier.load(checkpoint_path, device="cpu")
    crop = classifier.preprocess.crop_size
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracing notices
        torch.onnx.export(classifier.model, (torch.zeros(1, 3, crop, crop),), str(tmp), input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=OPSET, dynamo=False)
        model = onnx.load(str(tmp))
        ckpt = classifier.checkpoint
        for key, value in {"classes": classifier.classes, "preprocess": ckpt["preprocess"], "arch": ckpt["arch"],
                           "mode": ckpt.get("mode"), "model": ckpt.get("model")}.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = f"transferlab.{key}", json.dumps(value)
        onnx.save(model, str(tmp))
    return out_path


def validate_onnx(checkpoint_path: str | Path, onnx_path: str | Path, images: torch.Tensor | None = None,
                  rtol: float = 1e-3) -> float:
    """Largest difference between onnxruntime's and PyTorch's logits on `images` (random ones if
    None), relative to the logits' scale; UserError if it exceeds `rtol`."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("validating needs onnxruntime, which the project installs: pip install -e .") from None
    classifier = Classifier.load(checkpoint_path, device="cpu")
    crop = classifier.preprocess.crop_size
    if images is None:
        images = torch.randn(3, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ours = session.run(None, {"image": images.numpy()})[0]
    from transferlab.engine import split_outputs

    with torch.no_grad():
        reference = split_outputs(classifier.model(images))[0].numpy()
    error = float(np.abs(ours - reference).max() / max(np.abs(reference).max(), 1e-6))
    if error > rtol:
        raise UserError(f"{onnx_path}: onnxruntime's outputs differ from PyTorch's by {error:.2g} of their scale "
                        f"(more than {rtol}); this architecture does not export faithfully")
    return error


def read_metadata(onnx_path: str | Path) -> dict:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return {p.key.removeprefix("transferlab."): json.loads(p.value) for p in model.metadata_props
            if p.key.startswith("transferlab.")}
