"""timm (PyTorch Image Models) as a second source of models beside torchvision: any timm model by
name, `timm/<architecture>[.<pretrained tag>]`, e.g. `timm/convnext_tiny.fb_in22k`,
`timm/vit_small_patch14_dinov2.lvd142m` or `timm/vit_base_patch16_clip_224.openai`.

Everything model-specific comes from timm's own API: `create_model` builds it and loads its
weights (from the Hugging Face cache, which `HF_HUB_OFFLINE=1` keeps offline, or from a local
file through `pretrained_cfg_overlay`), `reset_classifier` puts the new head where the model's
pretrained config says its classifier is, and that config gives the preprocessing (input size,
mean and std, interpolation, crop fraction). The classifier's input is the model's pre-logits
features (`forward_head(..., pre_logits=True)`), which is what extract caches. timm is imported
only when a timm model is named: it costs a stage seconds.
"""
from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only where a model is built: compare reads backbone_kind without it
    from torch import nn

PREFIX = "timm/"

# What kind of pretraining a backbone had, from its name and tag (timm's tags name the data and
# method: lvd142m is DINOv2's, openai and laion2b are CLIP's). Everything else in timm's zoo, and
# torchvision's and lite's ImageNet weights, is supervised.
IMAGE_TEXT_WORDS = ("clip", "siglip", "openai", "laion", "datacomp", "dfn", "webli", "metaclip")
SELF_SUPERVISED_WORDS = ("dino", "lvd142m", "mae", "ijepa", "msn", "mocov3", "simclr", "ibot")


def is_timm(name: str) -> bool:
    return name.startswith(PREFIX)


def resolve(name: str) -> str:
    """`timm/<name>` -> itself if timm has that model (and tag); ValueError naming close ones."""
    import timm

    arch = name.removeprefix(PREFIX)
    base = arch.split(".")[0]
    if timm.is_model(base) and (not _tag(arch) or arch in timm.list_pretrained(f"{base}.*")):
        return name
    if timm.is_model(base):
        tags = timm.list_pretrained(f"{base}.*")
        raise ValueError(f"timm's {base} has no pretrained tag {_tag(arch)!r}; its tags: "
                         f"{', '.join(t.split('.', 1)[1] for t in tags) or 'none'}")
    close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(PREFIX + c for c in close)}?" if close else "see timm.list_models()"
    raise ValueError(f"unknown timm model {arch!r}; {hint}")


def _tag(arch: str) -> str:
    return arch.partition(".")[2]


def create(name: str, pretrained: bool, weights: str = "default") -> tuple[nn.Module, str | None]:
    """The model, with its pretrained weights if `pretrained` (from the Hugging Face cache or hub,
    or the local file `weights`), and what identifies those weights."""
    import timm

    arch = name.removeprefix(PREFIX)
    if not pretrained:
        return timm.create_model(arch, pretrained=False), None
    overlay = {}
    if weights != "default":
        if not Path(weights).is_file():
            raise _unavailable(name, f"weights: {weights} is not a file")
        overlay = {"pretrained_cfg_overlay": {"file": str(Path(weights).resolve())}}
    try:
        model = timm.create_model(arch, pretrained=True, **overlay)
    except (OSError, RuntimeError, ValueError) as err:  # huggingface_hub's errors derive from these
        raise _unavailable(name, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    if overlay:
        from transferlab.models import file_identity

        return model, file_identity(weights)
    return model, model.pretrained_cfg.get("hf_hub_id")


def _unavailable(name: str, why: str):
    import timm

    from transferlab.models import WeightsUnavailable

    repo = getattr(timm.get_pretrained_cfg(name.removeprefix(PREFIX)), "hf_hub_id", None) or name
    return WeightsUnavailable(
        f"pretrained weights for {name} could not be loaded ({why}).\n"
        f"  fetch them into the Hugging Face cache on a machine with network: hf download {repo}\n"
        f"  (HF_HOME moves that cache; HF_HUB_OFFLINE=1 then reads it without network), or name a local "
        f"weights file in params.yaml: weights: /path/to/model.safetensors")


def classifier_names(model: nn.Module) -> list[str]:
    """Where the model's pretrained config says its classifier is (two for distilled models)."""
    names = model.pretrained_cfg.get("classifier") or "head"
    return [names] if isinstance(names, str) else list(names)


def replace_head(model: nn.Module, num_classes: int) -> list[str]:
    """A new `num_classes` classifier through timm's own `reset_classifier` (which keeps the
    model's pooling); returns the classifier's module names."""
    from torch import nn

    model.reset_classifier(num_classes)
    names = classifier_names(model)
    for name in names:
        if not isinstance(model.get_submodule(name), nn.Linear):
            raise ValueError(f"{type(model).__name__}'s classifier {name!r} is not a Linear layer after "
                             f"reset_classifier; this model's head is not supported")
    return names


def data_config(name: str) -> dict:
    """timm's data config of the model's pretrained weights (input size, mean, std, interpolation,
    crop fraction), read without building the model where timm knows the config by name."""
    import timm
    from timm.data import resolve_data_config, resolve_model_data_config

    cfg = timm.get_pretrained_cfg(name.removeprefix(PREFIX))
    if cfg is not None:
        return resolve_data_config({}, pretrained_cfg=cfg.to_dict())
    return resolve_model_data_config(timm.create_model(name.removeprefix(PREFIX), pretrained=False))


def preprocess(name: str):
    """Our Preprocess from timm's data config: resize the short side to floor(crop / crop_pct),
    then the centre crop, as timm's own eval transform does."""
    from transferlab.models import Preprocess

    config = data_config(name)
    height, width = config["input_size"][1:]
    if height != width:
        raise ValueError(f"{name} takes {height}x{width} inputs; transferlab crops squares only")
    if config.get("crop_mode", "center") != "center":
        raise ValueError(f"{name}'s crop_mode is {config['crop_mode']!r}; transferlab crops at the centre only")
    crop_pct = config.get("crop_pct") or 1.0
    return Preprocess(crop_size=width, resize_size=math.floor(width / crop_pct), mean=tuple(config["mean"]),
                      std=tuple(config["std"]), interpolation=config["interpolation"])


def backbone_kind(name: str) -> str:
    """supervised, self-supervised or image-text, from the model's name and pretrained tag."""
    lowered = name.lower()
    if any(word in lowered for word in IMAGE_TEXT_WORDS):
        return "image-text"
    if any(word in lowered for word in SELF_SUPERVISED_WORDS):
        return "self-supervised"
    return "supervised"
