"""Does `auto` pick what is fastest in the steady state, and the same thing every time?

    python benchmarks/decision.py [--model efficientnet_lite0] [--mode finetune] [--repeats 5] [--steps 20]

Runs the hardware decision `--repeats` times from an empty cache (the train stage's workload:
hymenoptera's 195 train and 49 val images at batch 8), then times every candidate in the steady
state: `--steps` training steps each, in blocks that take turns, each candidate in its own copy of
the model. Prints the decisions, the rounds each took, and each candidate's steady images/s as a
ratio to fp32 measured in the same run.
"""
import argparse
import copy
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from transferlab.hardware import Workload, candidate_settings, decide, pick_hardware
from transferlab.models import HeadSpec, build_for_mode


def steady_images_per_second(model, candidates: dict[str, dict], crop: int, steps: int, batch: int = 8,
                             blocks: int = 4) -> dict[str, float]:
    """Each candidate's training images/s in the steady state: `steps` steps each, in `blocks`
    blocks that take turns (so a load that comes and goes while measuring hits all of them alike),
    each block after an untimed step in its own copy of the model."""
    steppers = {}
    for name, settings in candidates.items():
        trial = pick_hardware("cpu", settings["precision"], settings["channels_last"], 0)
        own = trial.prepare(copy.deepcopy(model)).train()
        optimizer = torch.optim.SGD([p for p in own.parameters() if p.requires_grad], lr=0.0, momentum=0.9)
        images, targets = trial.to_device(torch.randn(batch, 3, crop, crop)), torch.randint(0, 2, (batch,))

        def step(trial=trial, own=own, optimizer=optimizer, images=images, targets=targets) -> None:
            with trial.autocast():
                loss = torch.nn.functional.cross_entropy(own(images).float(), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for _ in range(3):
            step()
        steppers[name] = step
    seconds = {name: 0.0 for name in candidates}
    for _ in range(blocks):
        for name, step in steppers.items():
            step()
            start = time.perf_counter()
            for _ in range(steps // blocks):
                step()
            seconds[name] += time.perf_counter() - start
    return {name: blocks * (steps // blocks) * batch / t for name, t in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--mode", default="finetune")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    built = build_for_mode(args.model, 2, args.mode, HeadSpec(), "none" if args.mode != "extract" else "all")
    crop = built.preprocess.crop_size
    work = Workload(built.model, crop, train_images=195, infer_images=49, train_batch=8, infer_batch=8)
    decisions, seconds = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        hw = decide(pick_hardware("cpu", "auto", "auto", 0), work, Path(tempfile.mkdtemp()), [args.model])
        seconds.append(time.perf_counter() - start)
        decisions.append((hw.decision["chosen"], hw.decision["margin"]))
        measured = hw.decision["seconds_per_image"]
        print(f"decided {hw.decision['chosen']} after {len(next(t for t in measured['samples'].values() if t))} "
              f"rounds (largest spread {max(measured['spread'].values()):.1%}) in {seconds[-1]:.0f} s", flush=True)
    candidates = candidate_settings(pick_hardware("cpu", "auto", "auto", 0), ["precision", "channels_last"])
    steady = steady_images_per_second(built.model, candidates, crop, args.steps)
    print(f"\n{args.model} {args.mode}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| candidate | steady train img/s | ratio to fp32 | chosen (of %d) |" % args.repeats)
    print("|---|---|---|---|")
    tally = Counter(name for name, _ in decisions)
    for name, rate in steady.items():
        print(f"| {name} | {rate:.1f} | {rate / steady['fp32']:.2f}x | {tally[name]} |")
    print(f"a decision took {sum(seconds) / len(seconds):.0f} s on average")


if __name__ == "__main__":
    main()
