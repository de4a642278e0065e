"""How much Adam's first steps move a pretrained teacher: the dense model post-trained against itself, and random moves of the same size.

    python bench/sharpness.py --threads 1        # the pretrained teacher, ~6 min on one core

The dense teacher is post-trained exactly as uvc post-trains (AdamW, the post-training schedule, soft KD from
itself with the labels' cross-entropy, the benchmark's unaugmented training order) for one epoch at each rate,
and the loss of every step and the validation top-1 after the epoch are recorded. A student equal to its teacher
has nothing to learn, so what the loss gains is what the steps broke. Then every weight is moved by the size of
one Adam step (the rate at the benchmark's batch) in a random sign, and the KL to the teacher is measured: if a
random move of that size is harmless while the gradient's is not, the model is sharp along the directions Adam
takes, not fragile everywhere. Writes bench/results/sharpness_pretrained.json (docs/method.md cites it).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from uvc.data import DataConfig, build_data
from uvc.adapters import adapter_for
from uvc.distill import KDConfig, distillation_loss
from uvc.engine import evaluate, make_optimizer, optimizer_step
from uvc.compress import CompressConfig

from run import add_teacher_arg, load_teacher, machine, settings_for, teacher_label

RESULTS = Path(__file__).resolve().parent / "results"
RATES = (1e-4, 1e-5, 1e-6)  # per 128 images, as uvc states them


def self_distillation(teacher, data, lr: float, batch: int) -> dict:
    """One epoch of uvc's post-training of the dense teacher against itself: each step's loss, then validation."""
    student = copy.deepcopy(teacher).requires_grad_(True)
    schedule = dataclasses.replace(CompressConfig().post, epochs=1.0, lr=lr)  # uvc's post-training, one epoch at `lr`
    optimizer, scheduler = make_optimizer(student, schedule, len(data.train), batch)
    losses = []
    student.train()
    for step, (x, y) in enumerate(data.train):
        with torch.no_grad():
            target = teacher(x)
        loss = distillation_loss(student(x), y, target, KDConfig())
        losses.append(optimizer_step(loss, optimizer, scheduler, step, "bench", clip_grad=schedule.clip_grad))
    return {"lr": lr, "losses": losses, "top1_val": evaluate(student.eval(), data.val, torch.device("cpu"))}


@torch.no_grad()
def random_move(teacher, x: torch.Tensor, size: float, seed: int = 0) -> dict:
    """KL(teacher || teacher with every weight moved by `size` in a random sign) on the batch `x`."""
    moved = copy.deepcopy(teacher)
    generator = torch.Generator().manual_seed(seed)
    for p in moved.parameters():
        p.add_(size * torch.sign(torch.randn(p.shape, generator=generator)))
    kl = F.kl_div(moved(x).log_softmax(-1), teacher(x).log_softmax(-1), log_target=True, reduction="batchmean")
    return {"size": size, "kl": kl.item()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_teacher_arg(p)
    p.set_defaults(teacher="pretrained")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    os.environ.setdefault("UVC_PROGRESS", "0")
    torch.set_num_threads(args.threads)
    s = settings_for(args.teacher)
    teacher = load_teacher(args.teacher).eval().requires_grad_(False)
    data = build_data(DataConfig(train_limit=s.train_limit, val_limit=s.val_limit, batch_size=s.batch_size, augment=False),
                      input_size=adapter_for(teacher).input_size(teacher),
                      pretrained_cfg=getattr(teacher, "pretrained_cfg", None))
    results = {"command": shlex.join([os.path.relpath(sys.executable), *sys.argv]), "teacher": teacher_label(args.teacher),
               "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine(args.threads),
               "batch": s.batch_size, "teacher_val": evaluate(teacher, data.val, torch.device("cpu")), "runs": [], "moves": []}
    for lr in RATES:
        results["runs"].append(self_distillation(teacher, data, lr, s.batch_size))
        run = results["runs"][-1]
        print(f"lr {lr:g}: loss {run['losses'][0]:.3f} -> max {max(run['losses']):.3f}, last {run['losses'][-1]:.3f}; "
              f"validation {results['teacher_val']:.2f} -> {run['top1_val']:.2f} %", flush=True)
    x = next(iter(data.train))[0]
    for lr in RATES:
        results["moves"].append(random_move(teacher, x, lr * s.batch_size / 128))
        print(f"random move of {results['moves'][-1]['size']:g} per weight: KL {results['moves'][-1]['kl']:.5f}", flush=True)
    out = RESULTS / f"sharpness_{'pretrained' if args.teacher == 'pretrained' else 'teacher'}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
