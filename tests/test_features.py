from dataclasses import replace

import pytest
import torch
from conftest import CLASS_COLORS, make_image
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

from transferlab import hardware
from transferlab.data import ImageSource, ShareOfBatches, collate_share
from transferlab.distributed import SINGLE
from transferlab.engine import fit, make_optimizer, predict, seed_everything
from transferlab.features import OneViewPerImage, embed, feature_loaders, split_off_head
from transferlab.hardware import Hardware, pick_hardware
from transferlab.images import Sample
from transferlab.models import build_model, trainable_parameters
from transferlab.store import open_store

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
    built = build_model(name, 2, pretrained=False, freeze="all")
    model = built.model.eval()
    head_only = split_off_head(model, built.head_names[-1])
    captured = []
    head_only.head.register_forward_hook(lambda m, inputs, out: captured.append(inputs[0]))
    crop = built.preprocess.crop_size
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, crop, crop))
        assert torch.allclose(head_only(captured[0]), outputs, atol=1e-5)


@pytest.mark.parametrize("tensor_batches", [False, True])
def test_head_trained_on_cached_embeddings_drives_the_full_model(samples, tmp_path, tensor_batches):
    seed_everything(0)
    hw = replace(pick_hardware("cpu", "fp32", True, 0), tensor_batches=tensor_batches)
    built = build_model("resnet", 2, pretrained=False, freeze="all")
    train, val = samples
    source = ImageSource(open_store(train + val, built.preprocess.resize_size, tmp_path))

    def image_batches(split, training):
        return source.batches(split, CLASSES, built.preprocess, 4, training, 0, hw, shuffle=False)
    head_only, train_loader, val_loader = feature_loaders(built, train, val, 4, 3, hw, 0, tmp_path, image_batches)
    [features] = [p for p in tmp_path.glob("features-resnet18-*") if p.is_dir()]
    assert sorted(p.name for p in features.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert len(train_loader.dataset) == 3 * len(train) and len(list(train_loader)) == 3  # one view per image
    assert trainable_parameters(head_only) == trainable_parameters(built.model)
    optimizer = make_optimizer(trainable_parameters(head_only), "sgd", 0.01, 0.9, 0.0)
    result = fit(head_only, train_loader, val_loader, optimizer, None, 3, hw)
    head_only.load_state_dict(result.best_state)
    full = predict(built.model, image_batches(val, False), hw).stats
    assert full.accuracy == result.best_val.accuracy
    assert full.loss == pytest.approx(result.best_val.loss, rel=1e-4)
    # A second call reads the cache instead of running the backbone again.
    mtime = (features / "train.bin").stat().st_mtime_ns
    again = feature_loaders(built, train, val, 4, 3, hw, 0, tmp_path, image_batches)
    assert torch.equal(again[2].dataset.tensors[0], val_loader.dataset.tensors[0])
    assert (features / "train.bin").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("damage", ["truncated", "flipped bytes", "no meta"])
def test_a_damaged_embedding_cache_is_rebuilt(samples, tmp_path, capfd, damage):
    hw = pick_hardware("cpu", "fp32", False, 0)
    built = build_model("resnet", 2, pretrained=False, freeze="all")
    train, val = samples
    source = ImageSource(open_store(train + val, built.preprocess.resize_size, tmp_path))

    def image_batches(split, training):
        return source.batches(split, CLASSES, built.preprocess, 4, training, 0, hw, shuffle=False)
    seed_everything(0)  # the DataLoader path draws its crops from torch's global generator
    first = feature_loaders(built, train, val, 4, 2, hw, 0, tmp_path, image_batches)
    reference = first[1].dataset.tensors[0].clone()
    [features] = [p for p in tmp_path.glob("features-resnet18-*") if p.is_dir()]
    data = (features / "train.bin").read_bytes()
    if damage == "truncated":
        (features / "train.bin").write_bytes(data[:len(data) // 3])
    elif damage == "flipped bytes":
        (features / "train.bin").write_bytes(data[:100] + bytes(b ^ 0xFF for b in data[100:110]) + data[110:])
    else:
        (features / "meta.json").unlink()
    capfd.readouterr()
    seed_everything(0)
    again = feature_loaders(built, train, val, 4, 2, hw, 0, tmp_path, image_batches)
    assert torch.equal(again[1].dataset.tensors[0], reference)
    if damage != "no meta":  # an unfinished cache is simply built; a damaged one is said to be
        assert "damaged embedding cache" in capfd.readouterr().err


def test_every_extract_epoch_takes_each_image_once_as_one_of_its_views():
    sampler = OneViewPerImage(torch.arange(10), images=10, views=3, generator=torch.Generator().manual_seed(0))
    epochs = [list(sampler) for _ in range(4)]
    for rows in epochs:
        assert sorted(row % 10 for row in rows) == list(range(10))  # each image once
        assert all(0 <= row < 30 for row in rows)
    assert len({row // 10 for rows in epochs for row in rows}) == 3  # every view gets drawn
    assert epochs[0] != epochs[1]


def test_a_subset_epoch_takes_only_its_images_as_often_as_listed():
    """A learning-curve point: images 2 and 7 of the cached 10, each listed three times."""
    sampler = OneViewPerImage(torch.tensor([2, 7] * 3), images=10, views=3, generator=torch.Generator().manual_seed(0))
    rows = list(sampler)
    assert sorted(row % 10 for row in rows) == [2, 2, 2, 7, 7, 7]
    assert all(0 <= row < 30 for row in rows)


def test_views_are_cached_in_the_images_order(samples, tmp_path):
    """Row i of every view is image i: what lets an epoch take each image once."""
    hw = pick_hardware("cpu", "fp32", False, 0)
    built = build_model("resnet", 2, pretrained=False, freeze="all")
    train, val = samples
    source = ImageSource(open_store(train + val, built.preprocess.resize_size, tmp_path))
    loaders = feature_loaders(built, train, val, 4, 2, hw, 0, tmp_path, lambda split, augment: source.batches(
        split, CLASSES, built.preprocess, 4, augment, 0, hw, shuffle=False))
    targets = loaders[1].dataset.tensors[1].view(2, len(train))
    expected = torch.tensor([CLASSES.index(s.label) for s in train])
    assert torch.equal(targets[0], expected) and torch.equal(targets[1], expected)


def test_a_resumed_extract_run_ends_with_the_weights_of_an_uninterrupted_one(samples, tmp_path):
    hw = pick_hardware("cpu", "fp32", False, 0)
    train, val = samples

    def run(epochs, resume_path):
        seed_everything(0)
        built = build_model("resnet", 2, pretrained=False, freeze="all")
        source = ImageSource(open_store(train + val, built.preprocess.resize_size, tmp_path / "store"))
        head, train_loader, val_loader = feature_loaders(
            built, train, val, 4, 2, hw, 0, tmp_path / "cache", lambda split, augment: source.batches(
                split, CLASSES, built.preprocess, 4, augment, 0, hw, shuffle=False))
        optimizer = make_optimizer(trainable_parameters(head), "sgd", 0.05, 0.9, 0.0)
        fit(head, train_loader, val_loader, optimizer, None, epochs, hw, resume_path=resume_path)
        return head.state_dict()
    whole = run(4, None)
    run(2, tmp_path / "resume.pt")  # stopped after epoch 2, its state saved
    resumed = run(4, tmp_path / "resume.pt")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_the_backbone_embeds_in_passes_of_the_inference_size_whatever_the_batches():
    """Ten images in batches of 4, passes of 6: the backbone sees 6 and 6 (the last padded, one
    shape for cuDNN to tune), and the embeddings are those of the batches, in order."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Linear(5, 2))
    seen = []
    model.register_forward_pre_hook(lambda module, inputs: seen.append(len(inputs[0])))
    images, targets = torch.randn(10, 3, 2, 2), torch.arange(10)
    loader = [(images[i:i + 4], targets[i:i + 4]) for i in range(0, 10, 4)]
    hw = pick_hardware("cpu", "fp32", False, 0)
    one_by_one = list(embed(model, model[2], loader, hw))
    assert seen == [4, 4, 2]
    seen.clear()
    passes = list(embed(model, model[2], loader, replace(hw, inference_images=6)))
    assert seen == [6, 6]
    assert torch.equal(torch.cat([t for _, t in passes]), targets)
    assert torch.allclose(torch.cat([e for e, _ in passes]), torch.cat([e for e, _ in one_by_one]), atol=1e-6)


def reference_loaders(train_x, train_y, val_x, val_y, batch_size, rows, views, seed):
    """The DataLoaders extract's head trained on before (row by row, collated): the reference."""
    generator = torch.Generator().manual_seed(seed)
    sampler = OneViewPerImage(rows, len(train_y) // views, views, generator)
    train = DataLoader(TensorDataset(train_x, train_y), batch_sampler=ShareOfBatches(
        BatchSampler(sampler, batch_size, False), SINGLE), collate_fn=collate_share, generator=generator)
    val = DataLoader(TensorDataset(val_x, val_y), batch_sampler=ShareOfBatches(
        BatchSampler(SequentialSampler(val_x), batch_size, False), SINGLE), collate_fn=collate_share)
    return train, val


def test_head_only_batches_are_taken_batch_wise_with_the_data_loaders_draws(samples, tmp_path, monkeypatch):
    hw = pick_hardware("cpu", "fp32", False, 0)
    built = build_model("resnet", 2, pretrained=False, freeze="all")
    train, val = samples
    source = ImageSource(open_store(train + val, built.preprocess.resize_size, tmp_path))
    _, train_loader, val_loader = feature_loaders(built, train, val, 4, 2, hw, 0, tmp_path, lambda split, augment: (
        source.batches(split, CLASSES, built.preprocess, 4, augment, 0, hw, shuffle=False)))
    reference = reference_loaders(*train_loader.dataset.tensors, *val_loader.dataset.tensors, 4,
                                  torch.arange(len(train)), 2, 0)
    torch.manual_seed(5)  # the val DataLoader draws a seed from torch's own generator each epoch: so must ours
    theirs = [list(loader) for _ in range(2) for loader in reference]
    after_theirs = torch.get_rng_state()
    torch.manual_seed(5)
    ours = [list(loader) for _ in range(2) for loader in (train_loader, val_loader)]
    assert torch.equal(torch.get_rng_state(), after_theirs)
    assert [len(epoch) for epoch in ours] == [len(epoch) for epoch in theirs] == [3, 2, 3, 2]
    for epoch, reference_epoch in zip(ours, theirs):
        for batch, reference_batch in zip(epoch, reference_epoch):
            assert all(torch.equal(a, b) for a, b in zip(batch, reference_batch, strict=True))
    fetched = []
    monkeypatch.setattr(TensorDataset, "__getitem__", lambda self, i: fetched.append(i))
    for loader in (train_loader, val_loader):
        list(loader)
    assert fetched == []  # one index per batch, no fetch of row after row


def test_an_embedding_cache_that_fits_the_device_is_uploaded_there(samples, tmp_path, monkeypatch):
    cpu = pick_hardware("cpu", "fp32", False, 0)
    built = build_model("resnet", 2, pretrained=False, freeze="all")
    train, val = samples
    source = ImageSource(open_store(train + val, built.preprocess.resize_size, tmp_path))

    def loaders(hw):
        return feature_loaders(built, train, val, 4, 2, hw, 0, tmp_path, lambda split, augment: source.batches(
            split, CLASSES, built.preprocess, 4, augment, 0, cpu, shuffle=False))
    loaders(cpu)  # the cache, built on the CPU
    meta = Hardware(torch.device("meta"), None, False, 0, pin_memory=False, keep_freed_memory=False)
    monkeypatch.setitem(hardware.FREE_MEMORY, "meta", lambda device: 1 << 40)
    _, train_loader, val_loader = loaders(meta)
    for loader in (train_loader, val_loader):
        assert {t.device.type for batch in loader for t in batch} == {"meta"}
    monkeypatch.setitem(hardware.FREE_MEMORY, "meta", lambda device: 1000)  # too little: stays mapped
    _, train_loader, _ = loaders(meta)
    assert {t.device.type for batch in train_loader for t in batch} == {"cpu"}


def test_augmented_views_are_cached_apart_and_plain_ones_keep_their_key():
    from dataclasses import replace as change

    from transferlab.features import _cache_key
    from transferlab.hardware import pick_hardware
    from transferlab.models import build_model

    built = build_model("squeezenet", 2, pretrained=False)
    hw = change(pick_hardware("cpu", "fp32", False, 0), tensor_batches=True)
    keys = {name: _cache_key(built, [], [], 2, 0, hw, 4, name) for name in ("none", "trivialaugment", "randaugment")}
    assert len(set(keys.values())) == 3 and keys["none"] == _cache_key(built, [], [], 2, 0, hw, 4)
