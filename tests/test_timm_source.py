"""timm_source.py: timm models by name, their heads, preprocessing and weights, offline."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from transferlab.data import ImageSource
from transferlab.features import embed
from transferlab.hardware import pick_hardware
from transferlab.images import Sample
from transferlab.models import HeadSpec, backbone_summary, build_model, preprocess_for, rebuild_model
from transferlab.params import ParamsError, check_weights
from transferlab.store import open_store
from transferlab.timm_source import backbone_kind, resolve

timm = pytest.importorskip("timm")
TINY = "timm/test_vit.r160_in1k"  # timm's own test models: a few thousand weights


def test_names_resolve_or_say_what_timm_has():
    assert resolve("timm/convnext_tiny.fb_in22k") == "timm/convnext_tiny.fb_in22k"
    with pytest.raises(ValueError, match="did you mean timm/convnext_tiny"):
        resolve("timm/convnext_tiyn")
    with pytest.raises(ValueError, match="no pretrained tag 'in99k'; its tags: .*fb_in22k"):
        resolve("timm/convnext_tiny.in99k")


@pytest.mark.parametrize("name, kind", [("timm/vit_small_patch14_dinov2.lvd142m", "self-supervised"),
                                        ("timm/vit_base_patch16_clip_224.openai", "image-text"),
                                        ("timm/convnext_tiny.fb_in22k", "supervised"), ("resnet18", "supervised")])
def test_the_kind_of_backbone_is_read_off_its_name(name, kind):
    assert backbone_kind(name) == kind


@pytest.mark.parametrize("name, size", [("timm/convnext_tiny.fb_in22k", (300, 420)),  # a CNN: crop 0.875
                                        ("timm/vit_small_patch14_dinov2.lvd142m", (700, 560))])  # a ViT: 518, 1.0
def test_our_preprocessing_is_timms_own_eval_transform(tmp_path, name, size):
    """The decode store, then the tensor path's centre crop and normalisation, against timm's
    transform from resolve_data_config, on the same PNG (no JPEG draft decoding)."""
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path = tmp_path / "image.png"
    Image.fromarray(pixels).save(path)
    pre = preprocess_for(name)
    config = timm.data.resolve_data_config({}, pretrained_cfg=timm.get_pretrained_cfg(name[5:]).to_dict())
    expected = timm.data.create_transform(**config)(Image.open(path).convert("RGB"))
    source = ImageSource(open_store([Sample(str(path), "a")], pre.resize_size, tmp_path / "store",
                                    resample=pre.interpolation))
    hw = pick_hardware("cpu", "fp32", False, 0, False, True)
    (ours, _), = list(source.batches([Sample(str(path), "a")], ["a"], pre, 1, False, 0, hw))
    assert ours.shape[1:] == expected.shape
    assert torch.allclose(ours[0], expected, atol=1e-4), (ours[0] - expected).abs().max()


def write_hub_cache(hf_home, name: str, state: dict) -> None:
    """What `hf download` leaves: the repo's snapshot, and refs/main naming it."""
    from safetensors.torch import save_file

    repo, commit = hf_home / "hub" / f"models--{name.replace('/', '--')}", "0" * 40
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, repo / "snapshots" / commit / "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_weights_come_exactly_from_a_local_file_or_the_offline_hub_cache(tmp_path):
    written = {k: torch.randn_like(v) for k, v in timm.create_model(TINY[5:]).state_dict().items()}
    torch.save(written, tmp_path / "weights.pth")
    write_hub_cache(tmp_path / "hub_home", TINY, written)
    backbone = [k for k in written if not k.startswith("head.")]
    built = build_model(TINY, 3, pretrained=True, weights=str(tmp_path / "weights.pth"))
    loaded = built.model.state_dict()
    assert all(torch.equal(loaded[k], written[k]) for k in backbone) and built.weights_id.startswith("weights.pth@")
    assert loaded["head.weight"].shape == (3, written["head.weight"].shape[1])  # a new head, 3 classes
    width = written["head.weight"].shape[1]
    assert backbone_summary(built) == {"kind": "supervised", "embedding_size": width,
                                       "parameters": sum(v.numel() for k, v in written.items() if k in backbone)}
    assert backbone_summary(build_model(TINY, 3, pretrained=False))["kind"] == "random init"
    # The Hugging Face cache is found where HF_HOME says when a stage's process starts.
    code = ("import sys, torch; from transferlab.models import build_model; "
            f"m = build_model({TINY!r}, 3, pretrained=True); torch.save(m.model.state_dict(), sys.argv[1]); "
            "print(m.weights_id)")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hub_home"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "hub.pt")], env=env, capture_output=True,
                         text=True, check=True).stdout
    from_hub = torch.load(tmp_path / "hub.pt", weights_only=True)
    assert out.strip() == TINY and all(torch.equal(from_hub[k], written[k]) for k in backbone)


def test_missing_weights_say_how_to_fetch_them(tmp_path):
    code = f"from transferlab.models import build_model; build_model({TINY!r}, 2, pretrained=True)"
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    failed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and "WeightsUnavailable" in failed.stderr
    assert "hf download timm/test_vit.r160_in1k" in failed.stderr and "weights: /path/to" in failed.stderr


def test_weights_params_are_checked_where_params_load(tmp_path):
    with pytest.raises(ParamsError, match="weights: .* is not a file"):
        check_weights(TINY, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ParamsError, match="has no weights 'IMAGENET9K'; it has IMAGENET1K_V1"):
        check_weights("resnet18", "IMAGENET9K")
    check_weights("vit_b_16", "IMAGENET1K_SWAG_LINEAR_V1")
    swag = preprocess_for("vit_b_16", "IMAGENET1K_SWAG_LINEAR_V1")  # the variant's own preprocessing
    assert (swag.resize_size, swag.interpolation) == (224, "bicubic") != (preprocess_for("vit_b_16").resize_size,
                                                                          preprocess_for("vit_b_16").interpolation)


def test_extract_embeds_the_pre_logits_features():
    """The head's input, as features.embed caches it, is timm's forward_head(..., pre_logits=True)."""
    built = build_model("timm/test_convnext", 2, pretrained=False, freeze="all")
    model = built.model.eval()
    images = torch.randn(3, 3, 160, 160)
    hw = pick_hardware("cpu", "fp32", False, 0)
    (embedded, _), = list(embed(model, model.get_submodule(built.head_names[0]), [(images, torch.zeros(3))], hw))
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(images), pre_logits=True)
    assert torch.allclose(embedded, expected, atol=1e-5)


def test_heads_and_freezing_use_timms_own_layout():
    built = build_model("timm/test_convnext", 4, pretrained=False, freeze="stages.0", head=HeadSpec((8,), 0.2))
    assert built.head_names == ["head.fc"]
    frozen = {name for name, p in built.model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("stages.0.") for n in frozen) and any(n.startswith("stem.") for n in frozen)
    assert not any(n.startswith(("stages.1.", "head.")) for n in frozen)
    assert built.model(torch.randn(1, 3, 160, 160)).shape == (1, 4)
    again = rebuild_model(built.arch, built.arch_kwargs, 4, HeadSpec((8,), 0.2))
    again.load_state_dict(built.model.state_dict())  # a checkpoint's state dict fits the rebuilt model


@pytest.mark.integration
def test_a_timm_model_runs_the_pipeline_the_leaderboard_and_a_learning_curve(tmp_path):
    """model: timm/... through the real tools, its weights from an offline Hugging Face cache."""
    import json

    import yaml
    from conftest import git_commit, run, tiny_project

    project, env = tiny_project(tmp_path, archs=(), epochs=1, batch_size=4)
    written = {k: torch.randn_like(v) for k, v in timm.create_model(TINY[5:]).state_dict().items()}
    write_hub_cache(tmp_path / "hub_home", TINY, written)
    env.update(HF_HOME=str(tmp_path / "hub_home"), HF_HUB_OFFLINE="1")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"] = TINY
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro"], project, env)
    decoded = json.loads((project / "data/decode.json").read_text())
    assert (decoded["min_side"], decoded["interpolation"]) == (168, "bicubic")  # timm's config: 160 / 0.95
    report = json.loads((project / "reports/train/extract.json").read_text())
    assert report["backbone"] == {"kind": "supervised", "embedding_size": written["head.weight"].shape[1],
                                  "parameters": sum(v.numel() for k, v in written.items() if not k.startswith("head."))}
    git_commit(project, "a timm run")
    board = run(["transferlab", "compare", "HEAD"], project, env).stdout
    assert TINY in board and "| supervised |" in board and "| random init |" in board
    curve = yaml.safe_load((project / "curves/params.yaml").read_text())
    curve["curve"].update(images_per_class=[2, "all"], modes=["extract"], seeds=[0])
    (project / "curves/params.yaml").write_text(yaml.safe_dump(curve, sort_keys=False))
    run(["transferlab", "curve"], project, env)
    rows = json.loads((project / "curves/curve.json").read_text())["rows"]
    assert [(r["mode"], r["images_per_class"]) for r in rows] == [("extract", 2), ("extract", "all")]


def test_a_weights_variant_that_changes_the_architecture_builds_it_for_every_mode():
    """SWAG's end-to-end ViT weights are for 384 px: scratch and a rebuilt checkpoint take that
    size too, not the 224 of torchvision's default."""
    built = build_model("vit_b_16", 2, pretrained=False, weights="IMAGENET1K_SWAG_E2E_V1")
    assert built.preprocess.crop_size == 384 and built.arch_kwargs == {"image_size": 384}
    assert built.model(torch.randn(1, 3, 384, 384)).shape == (1, 2)
    rebuild_model(built.arch, built.arch_kwargs, 2).load_state_dict(built.model.state_dict())
