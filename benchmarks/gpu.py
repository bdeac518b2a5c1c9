"""GPU benchmark: transferlab's stages against the tutorial's recipe on the same CUDA GPU, in one run.

    python benchmarks/gpu.py --archive ../shared/data/hymenoptera_data.zip \
        [--models squeezenet resnet efficientnet_lite0]

Needs a CUDA GPU and the project installed (`make install`); without CUDA it says so and exits 2.
Per model: each stage's process seconds and in-stage seconds (after imports), training images/s
(after the first epoch), the batch-8 limit (the same model's training step on tensors already on
the GPU, with the settings `auto` chose), and the tutorial's recipe (its procedure, 4 DataLoader
workers, same split and seed) on the same GPU, with cuDNN's autotuning on as transferlab has it
(the tutorial leaves it off: measured so, the comparison would credit transferlab with it).
squeezenet and resnet18 get random weights under torchvision's own cache file names, as speed.py
does; efficientnet_lite0 has its real ones.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import ROOT, bench_env, make_project, set_params, sh, timed  # noqa: E402

MODES = ("finetune", "extract", "scratch")
# Runs a script as `python script args...` does, with cudnn.benchmark on as pick_hardware sets it.
AUTOTUNED = ("import runpy, sys, torch; torch.backends.cudnn.benchmark = True; sys.argv = sys.argv[1:]; "
             "runpy.run_path(sys.argv[0], run_name='__main__')")


def baseline_command(script: Path, *args: str) -> list[str]:
    """The command that runs `script` (the tutorial's recipe) with cuDNN's autotuning on."""
    return [sys.executable, "-c", AUTOTUNED, str(script), *args]


def batch8_limit(model_name: str, report: dict, steps: int = 50) -> float:
    """Training images/s of the model alone at batch 8, on device-resident random tensors."""
    from transferlab.hardware import DTYPES, pick_hardware
    from transferlab.models import build_model

    hw = pick_hardware("cuda", report["precision"], report["channels_last"], 0, False)
    built = build_model(model_name, 2, pretrained=False)
    model = hw.prepare(built.model).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    crop = built.preprocess.crop_size
    images = hw.to_device(torch.randn(8, 3, crop, crop))
    targets = torch.randint(0, 2, (8,), device=hw.device)
    scaler = hw.grad_scaler()
    assert DTYPES[report["precision"]] == hw.amp_dtype
    for step in range(steps + 10):
        if step == 10:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with hw.autocast():
            output = model(images)
            logits = output if isinstance(output, torch.Tensor) else output[0]
            loss = torch.nn.functional.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    torch.cuda.synchronize()
    return steps * 8 / (time.perf_counter() - start)


def bench(project: Path, model: str, epochs: int, env: dict) -> dict:
    set_params(project, model=model)
    row = {"model": model, "process_s": {}, "in_stage_s": {}}
    for stage in ("decode", *(f"train {m}" for m in MODES), "evaluate"):
        name, *mode = stage.split()
        row["process_s"][stage], _ = timed([sys.executable, "-m", f"transferlab.stages.{name}", *mode], project, env)
    for mode in MODES:
        report = json.loads((project / f"reports/train/{mode}.json").read_text())
        row["in_stage_s"][f"train {mode}"] = report["wall_seconds"]
        if mode == "finetune":
            row["finetune_img_s"] = report["steady_images_per_s"] or report["train_images_per_s"]
            row["setting"] = f"{report['precision']}{' + CL' if report['channels_last'] else ''}"
            row["limit_img_s"] = batch8_limit(model, report)
    row["in_stage_s"]["evaluate"] = json.loads((project / "reports/eval.json").read_text())["wall_seconds"]
    row["base"] = {}
    for mode in MODES:
        out = sh(baseline_command(ROOT / "benchmarks/tutorial_baseline.py", "--model", model, "--mode", mode,
                                  "--epochs", str(epochs), "--device", "cuda"), project, env)
        row["base"][mode] = json.loads(out.strip().splitlines()[-1])
    return row


def print_rows(rows: list[dict]) -> None:
    print("| model | stage | process s | in-stage s | tutorial loop s | ratio |\n|---|---|---|---|---|---|")
    for r in rows:
        for stage, seconds in r["process_s"].items():
            mode = stage.split()[-1]
            base = r["base"][mode]["loop_seconds"] if mode in MODES else None
            inside = r["in_stage_s"].get(stage)
            cells = [f"{inside:.1f}" if inside else "", f"{base:.1f}" if base else "",
                     f"{base / inside:.2f}x" if base and inside else ""]
            print(f"| {r['model']} | {stage} | {seconds:.1f} | " + " | ".join(cells) + " |")
    print("\n| model | auto chose | finetune img/s | batch-8 limit img/s | share of the limit |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['setting']} | {r['finetune_img_s']:.0f} | {r['limit_img_s']:.0f} | "
              f"{r['finetune_img_s'] / r['limit_img_s']:.0%} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", default=str(ROOT.parent / "shared/data/hymenoptera_data.zip"))
    parser.add_argument("--models", nargs="+", default=["squeezenet", "resnet", "efficientnet_lite0"])
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: torch sees no CUDA GPU here; run it on a machine with one "
              "(benchmarks/speed.py measures this machine's CPU)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="transferlab-gpu-"))
    env = bench_env(work)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {os.cpu_count()} CPUs", flush=True)
    project = make_project(work, str(Path(args.archive).resolve()), args.epochs)
    for stage in ("fetch", "split"):
        sh([sys.executable, "-m", f"transferlab.stages.{stage}"], project, env)
    print_rows([bench(project, model, args.epochs, env) for model in args.models])
    return 0


if __name__ == "__main__":
    sys.exit(main())
