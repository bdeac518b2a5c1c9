"""lr_finder.py: Smith's range test finds a planted learning rate, stops at divergence, caches."""
import torch
from torch import nn

from transferlab.lr_finder import cached_range_test, lr_schedule, range_test, smooth, suggest, sweep


def problem(scale: float, seed: int = 0):
    """Least squares on features multiplied by `scale`: the loss's curvature grows with scale², so
    the lr that trains it well shrinks by scale², and SGD diverges past twice its inverse."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(512, 8, generator=g) * scale
    targets = features @ torch.randn(8, 1, generator=g) / scale + 0.1 * torch.randn(512, 1, generator=g)
    torch.manual_seed(seed)
    model = nn.Linear(8, 1)
    batches = lambda: [(features[i:i + 32], targets[i:i + 32]) for i in range(0, 512, 32)]  # noqa: E731
    return model, batches


def mse(model, x, y):
    return nn.functional.mse_loss(model(x), y)


def find(scale: float) -> dict:
    model, batches = problem(scale)
    return range_test(model, batches, lambda lr: torch.optim.SGD(model.parameters(), lr=lr), mse)


def test_the_pick_follows_the_planted_curvature_and_trains_well():
    small, large = find(1.0), find(10.0)
    assert 30 < small["suggestion"] / large["suggestion"] < 300  # scale² = 100, within a factor of 3
    for scale, found in ((1.0, small), (10.0, large)):
        model, batches = problem(scale, seed=1)
        optimizer = torch.optim.SGD(model.parameters(), lr=found["suggestion"])
        first = mse(model, *batches()[0]).item()
        for _ in range(3):
            for x, y in batches():
                loss = mse(model, x, y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        assert loss.item() < first / 3, (scale, found["suggestion"], first, loss.item())
        assert found["stopped_early"]  # it went on to divergence and stopped there


def test_the_sweep_stops_when_the_loss_diverges_and_leaves_the_model_as_it_was():
    model, batches = problem(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    draw = torch.rand(1)
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    range_test(model, batches, lambda lr: torch.optim.SGD(model.parameters(), lr=lr), mse)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.rand(1), expected) and draw.shape == (1,)  # the generators too


def test_the_rule_is_a_tenth_of_the_lowest_smoothed_loss_and_stops_at_four_times_it():
    lrs = lr_schedule(1e-4, 1.0, 40)
    losses = [2.0 - i * 0.04 for i in range(30)] + [10.0 ** k for k in range(1, 11)]
    found = sweep(lambda lr: losses[lrs.index(lr)], lrs)
    assert found["stopped_early"] and len(found["lrs"]) < 40
    assert found["suggestion"] == suggest(found["lrs"], smooth(found["losses"]))
    lowest = min(range(len(found["smoothed"])), key=found["smoothed"].__getitem__)
    assert found["suggestion"] == found["lrs"][lowest] / 10


def test_a_lucky_first_batch_of_a_flat_sweep_is_not_the_pick():
    lrs = lr_schedule(1e-6, 1.0, 100)
    losses = [0.3] + [0.7, 0.72] * 40 + [10.0 ** k for k in range(1, 20)]  # flat, one low first loss
    found = sweep(lambda lr: losses[lrs.index(lr)], lrs)
    smoothed = found["smoothed"]
    assert min(range(len(smoothed)), key=smoothed.__getitem__) == 0  # the first batch alone is lowest
    later = min(range(10, len(smoothed)), key=smoothed.__getitem__)
    assert found["suggestion"] == lrs[later] / 10


def test_an_unchanged_rerun_reads_the_sweep_back(tmp_path):
    runs = []
    def run():
        runs.append(1)
        return {"lrs": [0.1, 1.0], "losses": [1.0, 0.5], "smoothed": [1.0, 0.7], "suggestion": 0.1}
    first = cached_range_test(tmp_path, ["resnet18", "finetune", {"epochs": 3}], run)
    again = cached_range_test(tmp_path, ["resnet18", "finetune", {"epochs": 3}], run)
    other = cached_range_test(tmp_path, ["resnet18", "scratch", {"epochs": 3}], run)
    assert runs == [1, 1] and not first["cached"] and again["cached"] and not other["cached"]
    for path in (tmp_path / "lr_find").glob("lr-find-*.json"):
        path.write_text("{")  # damaged
    assert not cached_range_test(tmp_path, ["resnet18", "finetune", {"epochs": 3}], run)["cached"]
