"""recipes.py: the stopping rule, the smoothed loss, mixing, the weight average, augmentation."""
import pytest
import torch
from torch import nn

from transferlab.recipes import BatchMixer, EarlyStopping, augmenter, averaged, criterion


def test_patience_stops_after_that_many_checks_without_a_better_val():
    stop = EarlyStopping(patience=2)
    verdicts = [stop.should_stop(acc, loss) for acc, loss in
                [(0.5, 1.0), (0.6, 0.9), (0.6, 0.95), (0.55, 0.8), (0.7, 0.7)]]
    assert verdicts == [False, False, False, True, False]
    again = EarlyStopping(patience=2)
    again.load_state_dict(stop.state_dict())
    assert again == stop
    assert not any(EarlyStopping(patience=0).should_stop(0.5, 1.0) for _ in range(10))  # 0: never


def test_min_epochs_holds_patience_back_until_then():
    """Val flat at chance from the first epoch (as scratch sits while it starts to learn): patience
    2 alone stops at the third check; with min_epochs 6, at the sixth, and a better check before
    then starts the wait afresh."""
    flat = [(0.5, 0.7)] * 10
    alone = EarlyStopping(patience=2)
    assert [alone.should_stop(*v) for v in flat[:3]] == [False, False, True]
    stop = EarlyStopping(patience=2, min_epochs=6)
    assert [stop.should_stop(*v) for v in flat[:6]] == [False] * 5 + [True]
    learning = EarlyStopping(patience=2, min_epochs=6)
    checks = [(0.5, 0.7)] * 4 + [(0.8, 0.5)] + [(0.5, 0.7)] * 2  # better at the fifth: stops at the seventh
    assert [learning.should_stop(*v) for v in checks] == [False] * 6 + [True]
    again = EarlyStopping(patience=2, min_epochs=6)
    again.load_state_dict(learning.state_dict())
    assert again == learning


def test_label_smoothing_changes_the_loss_as_its_definition_says():
    logits, targets = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])
    plain, smoothed = criterion(0.0)(logits, targets), criterion(0.3)(logits, targets)
    log_p = logits.log_softmax(1)[0]
    assert plain == pytest.approx(-log_p[0].item())
    assert smoothed == pytest.approx(-(0.7 * log_p[0] + 0.3 * log_p.mean()).item(), rel=1e-6)


def test_mixing_makes_soft_targets_that_sum_to_one_and_is_refused_for_one_class():
    torch.manual_seed(0)
    images, targets = torch.rand(8, 3, 16, 16), torch.arange(8) % 3
    mixed, soft = BatchMixer(3, mixup_alpha=0.4)(images, targets)
    assert soft.shape == (8, 3) and torch.allclose(soft.sum(1), torch.ones(8))
    assert not torch.equal(mixed, images) and (soft.max(1).values < 1).all()
    cut, soft = BatchMixer(3, cutmix_alpha=1.0)(images, targets)
    changed = (cut != images).any(1)  # cutmix pastes a box: some pixels as they were
    assert changed.any() and not changed.all()
    assert not BatchMixer(3) and BatchMixer(3, 0.2, 1.0)
    with pytest.raises(ValueError, match="two classes or more; this data has 1"):
        BatchMixer(1, mixup_alpha=0.2)


def test_the_weight_average_warms_up_then_moves_by_one_minus_decay_per_update():
    model = nn.Linear(2, 1)
    ema = averaged(model, decay=0.9)
    ema.update_parameters(model)  # the first update takes the weights as they are
    expected = model.weight.detach().clone()
    for t in range(1, 120):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update_parameters(model)
        decay = min(0.9, (1 + t) / (10 + t))  # t updates before this one: 2/11 at the second; 0.9 from t = 80
        expected = expected * decay + model.weight.detach() * (1 - decay)
        assert torch.allclose(ema.module.weight, expected), t


@pytest.mark.parametrize("name", ["trivialaugment", "randaugment"])
def test_augmentation_is_seeded_per_image_and_leaves_other_draws_alone(name):
    image = (torch.rand(3, 32, 32) * 255).to(torch.uint8)
    first, second = augmenter(name, 7), augmenter(name, 7)
    torch.manual_seed(0)
    out = [first(image) for _ in range(6)]
    after = torch.rand(1)
    torch.manual_seed(0)
    assert all(torch.equal(a, second(image)) for a in out) and torch.equal(torch.rand(1), after)
    assert out[0].dtype == torch.uint8 and any(not torch.equal(o, image) for o in out)
    assert augmenter("none", 0) is None
    with pytest.raises(ValueError, match="valid: none, trivialaugment, randaugment"):
        augmenter("autoaugment", 0)
