"""How fast do timm's backbones run here, against torchvision's resnet50 in the same run?

    python benchmarks/zoo.py [--rounds 3] [--threads N]

Random weights (no network needed): timm's ViT-S/16 and ConvNeXt-T, and torchvision's resnet50,
each built by transferlab's model factory with a new two-class head. Per model: images/s of
extract's embedding pass (eval, no grad, batch 32, the model's own crop) and of finetune's training
(forward, backward and an SGD step at batch 8), fp32 in the plain layout. The models take turns,
round after round, each timing after an untimed step, so that a load which comes and goes hits
them alike; the median round counts. Ratios are to resnet50 measured in the same run.
"""
import argparse
import statistics
import time

import torch

from transferlab.hardware import machine_name
from transferlab.models import build_model

MODELS = ["resnet50", "timm/vit_small_patch16_224.augreg_in21k_ft_in1k", "timm/convnext_tiny.fb_in1k"]


def steppers(name: str) -> dict:
    built = build_model(name, 2, pretrained=False)
    model, crop = built.model, built.preprocess.crop_size
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    embed_in, train_in, targets = torch.randn(32, 3, crop, crop), torch.randn(8, 3, crop, crop), torch.zeros(8).long()

    @torch.no_grad()
    def embed() -> int:
        model.eval()
        model(embed_in)
        return len(embed_in)

    def train() -> int:
        model.train()
        loss = torch.nn.functional.cross_entropy(model(train_in), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return len(train_in)
    return {"embed": embed, "train": train}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    phases = {name: steppers(name) for name in MODELS}
    rates = {(name, phase): [] for name in MODELS for phase in ("embed", "train")}
    for _ in range(args.rounds):
        for name, steps in phases.items():
            for phase, step in steps.items():
                step()  # untimed: what the previous model left in the caches is paid here
                start = time.perf_counter()
                images = step()
                rates[name, phase].append(images / (time.perf_counter() - start))
    print(f"{machine_name(torch.device('cpu'))}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, fp32, median of {args.rounds} rounds")
    print("| model | embedding pass img/s | vs resnet50 | finetune training img/s | vs resnet50 |")
    print("|---|---|---|---|---|")
    base = {phase: statistics.median(rates[MODELS[0], phase]) for phase in ("embed", "train")}
    for name in MODELS:
        embed, train = (statistics.median(rates[name, phase]) for phase in ("embed", "train"))
        print(f"| {name} | {embed:.1f} | {embed / base['embed']:.2f}x | {train:.1f} | {train / base['train']:.2f}x |")


if __name__ == "__main__":
    main()
