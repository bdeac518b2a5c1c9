"""Which hardware switches pay off here? Training and inference throughput of one model per
precision (fp32, bf16 autocast) and memory format (contiguous, channels-last), in one run.

    python benchmarks/hardware.py [--models squeezenet resnet efficientnet_lite0]

Synthetic batches of 8 at each model's input size (decoding is not what is measured here);
ratios are against fp32 contiguous, measured in the same run.
"""
import argparse
import time

import torch
from torch import nn

from transferlab.engine import Hardware, split_outputs
from transferlab.models import build_model

CONFIGS = [("fp32", None, False), ("fp32 + channels-last", None, True), ("bf16", torch.bfloat16, False),
           ("bf16 + channels-last", torch.bfloat16, True)]


def throughput(model: nn.Module, hw: Hardware, crop: int, train: bool, steps: int, batch: int = 8) -> float:
    """Images per second over `steps` batches, after two warm-up batches."""
    hw.prepare(model)
    model.train(train)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    images, targets = torch.randn(batch, 3, crop, crop), torch.randint(0, 2, (batch,))
    for step in range(steps + 2):
        if step == 2:
            start = time.perf_counter()
        with torch.set_grad_enabled(train), hw.autocast():
            logits, _ = split_outputs(model(hw.to_device(images)))
            loss = nn.functional.cross_entropy(logits.float(), targets)
        if train:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["squeezenet", "resnet", "efficientnet_lite0"])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | setting | train img/s | ratio | inference img/s | ratio |\n|---|---|---|---|---|---|")
    for name in args.models:
        base = None
        for label, dtype, channels_last in CONFIGS:
            hw = Hardware(torch.device("cpu"), dtype, channels_last, workers=0, pin_memory=False)
            built = build_model(name, 2, pretrained=False)
            crop = built.preprocess.crop_size
            rates = (throughput(built.model, hw, crop, True, args.steps),
                     throughput(built.model, hw, crop, False, args.steps * 2))
            base = base or rates
            print(f"| {name} | {label} | {rates[0]:.1f} | {rates[0] / base[0]:.2f}x | {rates[1]:.1f} | "
                  f"{rates[1] / base[1]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
