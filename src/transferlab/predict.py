"""Using a trained model: everything it needs comes from its checkpoint (architecture, classes,
preprocessing), and images are prepared exactly as evaluate prepares the test images.

    from transferlab import Classifier
    classifier = Classifier.load("models/finetune.pt")
    for p in classifier.predict(["bee.jpg", "photos/"]): print(p.path, p.label, p.confidence)
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from transferlab.errors import UserError
from transferlab.files import load_checkpoint
from transferlab.images import is_image_file, load_image

# Checkpoint formats this version reads; the train stage writes the last one.
FORMATS = (1,)
CHECKPOINT_KEYS = ("format", "arch", "arch_kwargs", "classes", "preprocess", "state_dict")


@dataclass
class Prediction:
    path: str
    label: str | None = None             # the most likely class; None if the image could not be read
    confidence: float | None = None
    top: list[tuple[str, float]] = field(default_factory=list)  # the k most likely classes, most likely first
    error: str | None = None


def expand(inputs: list[str]) -> list[str]:
    """Files, folders (searched recursively for image files) and glob patterns -> file paths, in order.
    A name that matches nothing is kept, so that it is reported rather than silently dropped."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            paths += sorted(str(p) for p in Path(item).rglob("*") if p.is_file() and is_image_file(p))
        elif any(ch in item for ch in "*?["):
            paths += sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        else:
            paths.append(item)
    return paths


class Classifier:
    """A trained checkpoint, ready to classify images."""

    def __init__(self, checkpoint: dict, device: str = "auto"):
        from transferlab.models import Preprocess, head_of, rebuild_model

        self.checkpoint = checkpoint
        self.classes: list[str] = checkpoint["classes"]
        self.preprocess = Preprocess(**checkpoint["preprocess"])
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = rebuild_model(checkpoint["arch"], checkpoint["arch_kwargs"], len(self.classes),
                                   head_of(checkpoint))
        self.model.load_state_dict(checkpoint["state_dict"])
        self.model.to(self.device).eval()

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> Classifier:
        """Load a checkpoint written by the train stage (tensors and plain values only, no code)."""
        if not Path(path).is_file():
            raise UserError(f"{path}: no such checkpoint; the train stage writes models/MODE.pt (dvc repro)")
        checkpoint = load_checkpoint(path)
        missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
        if missing or checkpoint.get("format") not in FORMATS:
            made_by = checkpoint.get("versions", {}).get("transferlab", "an unknown version")
            raise UserError(f"{path}: not a checkpoint this transferlab reads (format {checkpoint.get('format')}, "
                            f"made by transferlab {made_by}; this version reads format {FORMATS[-1]}"
                            f"{', and it lacks ' + ', '.join(missing) if missing else ''}); retrain it with dvc repro")
        return cls(checkpoint, device)

    def transform(self):
        from transferlab.data import build_transform

        return build_transform(self.preprocess, train=False)

    @torch.no_grad()
    def predict(self, images: list[str | Path], top_k: int = 3, batch_size: int = 16) -> list[Prediction]:
        """Class, confidence and top-k per image (files, folders, globs); unreadable ones are
        returned with `error` set, never raised."""
        transform, results, batch = self.transform(), [], []
        for path in expand([str(i) for i in images]):
            prediction = Prediction(path)
            results.append(prediction)
            try:
                image = load_image(path, self.preprocess.resize_size, self.preprocess.interpolation)
            except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as err:
                prediction.error = _reason(path, err)
                continue
            batch.append((prediction, transform(image)))
            if len(batch) == batch_size:
                self._classify(batch, top_k)
                batch = []
        if batch:
            self._classify(batch, top_k)
        return results

    def _classify(self, batch: list, top_k: int) -> None:
        from transferlab.engine import split_outputs

        images = torch.stack([tensor for _, tensor in batch]).to(self.device)
        logits, _ = split_outputs(self.model(images))
        probs = logits.float().cpu().double().softmax(1)  # float64 on the host: an Apple GPU has none
        values, indices = probs.topk(min(top_k, len(self.classes)), dim=1)
        for (prediction, _), p, i in zip(batch, values.tolist(), indices.tolist()):
            prediction.top = [(self.classes[c], v) for c, v in zip(i, p)]
            prediction.label, prediction.confidence = prediction.top[0]


def _reason(path: str, err: Exception) -> str:
    if isinstance(err, FileNotFoundError):
        return "no such file"
    if isinstance(err, UnidentifiedImageError):
        return "not an image Pillow can decode"
    return f"cannot be read: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
