"""Which hardware switches pay off here? Training and inference throughput of one model per
precision (fp32, bf16 autocast), memory format (contiguous, channels-last) and allocator setting
(glibc's default, or keeping freed memory: `train.keep_freed_memory`), in one run.

    python benchmarks/hardware.py [--models squeezenet resnet efficientnet_lite0]

Synthetic batches of 8 at each model's input size (decoding is not what is measured here); each
setting in a fresh process, since the allocator setting cannot be undone in one; ratios are
against fp32 contiguous with the default allocator, measured in the same run.
"""
import argparse
import json
import subprocess
import sys
import time

import torch
from torch import nn

from transferlab.engine import split_outputs
from transferlab.hardware import pick_hardware
from transferlab.models import build_model

# label: (precision, channels_last, keep_freed_memory)
SETTINGS = {"fp32": ("fp32", False, False), "fp32 + channels-last": ("fp32", True, False),
            "bf16": ("bf16", False, False), "bf16 + channels-last": ("bf16", True, False),
            "bf16 + channels-last + keep freed memory": ("bf16", True, True)}


def throughput(model: nn.Module, hw, crop: int, train: bool, steps: int, batch: int = 8) -> float:
    """Images per second over `steps` batches, after three warm-up batches."""
    hw.prepare(model)
    model.train(train)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    images, targets = torch.randn(batch, 3, crop, crop), torch.randint(0, 2, (batch,))
    for step in range(steps + 3):
        if step == 3:
            start = time.perf_counter()
        with torch.set_grad_enabled(train), hw.autocast():
            logits, _ = split_outputs(model(hw.to_device(images)))
            loss = nn.functional.cross_entropy(logits.float(), targets)
        if train:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return steps * batch / (time.perf_counter() - start)


def measure(name: str, label: str, steps: int) -> list[float]:
    """(train img/s, inference img/s) of one model and setting, in this process."""
    precision, channels_last, keep_memory = SETTINGS[label]
    hw = pick_hardware("cpu", precision, channels_last, 0, keep_memory)
    built = build_model(name, 2, pretrained=False)
    crop = built.preprocess.crop_size
    return [throughput(built.model, hw, crop, True, steps), throughput(built.model, hw, crop, False, steps * 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["squeezenet", "resnet", "efficientnet_lite0"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args.steps)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | setting | train img/s | ratio | inference img/s | ratio |\n|---|---|---|---|---|---|")
    for name in args.models:
        base = None
        for label in SETTINGS:
            out = subprocess.run([sys.executable, __file__, "--one", name, label, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True).stdout
            rates = json.loads(out.strip().splitlines()[-1])
            base = base or rates
            print(f"| {name} | {label} | {rates[0]:.1f} | {rates[0] / base[0]:.2f}x | {rates[1]:.1f} | "
                  f"{rates[1] / base[1]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
