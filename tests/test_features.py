import pytest
import torch
from conftest import CLASS_COLORS, make_image

from transferlab.data import ImageDataset, build_transform, make_loader
from transferlab.engine import fit, make_optimizer, pick_hardware, predict, seed_everything
from transferlab.features import feature_loaders, split_off_head
from transferlab.images import Sample
from transferlab.models import build_model, trainable_parameters

CLASSES = list(CLASS_COLORS)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    def make(split, n):
        return [Sample(str(make_image(root / split / f"{c}{i}.jpg", color, hash((split, i)) % 99, (64, 48))), c)
                for c, color in CLASS_COLORS.items() for i in range(n)]
    return make("train", 6), make("val", 3)


@pytest.mark.parametrize("name", ["squeezenet", "resnet", "inception", "vit_b_16"])
def test_head_on_embeddings_reproduces_the_model(name):
    built = build_model(name, 2, pretrained=False, train_backbone=False)
    model = built.model.eval()
    head_only = split_off_head(model, built.head_names[-1])
    captured = []
    head_only.head.register_forward_hook(lambda m, inputs, out: captured.append(inputs[0]))
    crop = built.preprocess.crop_size
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, crop, crop))
        assert torch.allclose(head_only(captured[0]), outputs, atol=1e-5)


def test_head_trained_on_cached_embeddings_drives_the_full_model(samples, tmp_path):
    seed_everything(0)
    hw = pick_hardware("cpu", "fp32", True, 0)
    built = build_model("resnet", 2, pretrained=False, train_backbone=False)
    train, val = samples
    head_only, train_loader, val_loader = feature_loaders(built, train, val, CLASSES, 4, 3, hw, 0, tmp_path)
    [features_file] = tmp_path.glob("features-resnet18-*.pt")
    assert len(list(tmp_path.glob("decoded-*.npz"))) == 2  # train and val, decoded once
    assert len(train_loader.dataset) == 3 * len(train) and len(list(train_loader)) == 3  # one view per image
    assert trainable_parameters(head_only) == trainable_parameters(built.model)
    optimizer = make_optimizer(trainable_parameters(head_only), "sgd", 0.01, 0.9, 0.0)
    result = fit(head_only, train_loader, val_loader, optimizer, None, 3, hw)
    head_only.load_state_dict(result.best_state)
    images = ImageDataset(val, CLASSES, build_transform(built.preprocess, False), built.preprocess.resize_size)
    full = predict(built.model, make_loader(images, 4, False, 0), hw).stats
    assert full.accuracy == result.best_val.accuracy
    assert full.loss == pytest.approx(result.best_val.loss, rel=1e-4)
    # A second call reads the cache instead of running the backbone again.
    mtime = features_file.stat().st_mtime_ns
    again = feature_loaders(built, train, val, CLASSES, 4, 3, hw, 0, tmp_path)
    assert torch.equal(again[2].dataset.tensors[0], val_loader.dataset.tensors[0])
    assert features_file.stat().st_mtime_ns == mtime and len(list(tmp_path.glob("features-*"))) == 1
