"""Measured cost: inference throughput of slimmed models against their dense model, and the time of a search step.

Throughput is `uvc.engine.throughput` (warm-up, then the median of timed rounds) on the CPU with
the thread count the runner fixed. The dense model is measured right before each slimmed one, so
a change in background load moves both numbers of a pair alike.
"""
from __future__ import annotations

import copy
import statistics
import time
from itertools import cycle, islice

import torch
from torch import nn

import uvc
from uvc.compress import CompressConfig, Run
from uvc.distill import distillation_loss
from uvc.engine import make_optimizer, optimizer_step, predict_logits, throughput

CPU = torch.device("cpu")


def speed_pair(dense: nn.Module, slimmed: nn.Module, input_size, batch: int, repeats: int) -> dict:
    """Images per second of both models at one batch size, and the measured speedup."""
    dense_rate = throughput(dense, input_size, batch, CPU, repeats=repeats)
    slim_rate = throughput(slimmed, input_size, batch, CPU, repeats=repeats)
    return {"batch": batch, "dense": dense_rate, "slimmed": slim_rate, "speedup": slim_rate / dense_rate}


def deit_small_speed(plan_fn, budget: float, batches, repeats: int) -> dict:
    """deit_small_patch16_224 (random weights: speed does not depend on them) slimmed by `plan_fn(model, budget)`."""
    import timm

    torch.manual_seed(0)
    dense = timm.create_model("deit_small_patch16_224").eval()
    slimmed = uvc.slim(dense, plan_fn(dense, budget))
    input_size = (3, 224, 224)
    return {"budget": budget, "ratio": uvc.macs(slimmed, input_size) / uvc.macs(dense, input_size),
            "layers": [b.config() for b in slimmed.blocks],
            "speed": [speed_pair(dense, slimmed, input_size, b, repeats) for b in batches]}


def step_cost(cfg: CompressConfig, teacher: nn.Module, steps: int, warmup: int = 3) -> dict:
    """Seconds per UVC search step (past warm-up: ratios and duals move) and per plain KD step of the dense model.

    Both see the same batches, alternating step by step; the plain step is what fine-tuning the
    dense model with the same distillation costs: teacher forward, student forward and backward, AdamW.
    """
    run = Run(cfg, model=copy.deepcopy(teacher), teacher=teacher)
    plain = copy.deepcopy(teacher).train()
    for p in plain.parameters():
        p.requires_grad_(True)
    optimizer, scheduler = make_optimizer(plain, cfg.search.lr, cfg.search.weight_decay, cfg.search.epochs, run.steps_per_epoch)

    def plain_step(x, y, step):
        loss = distillation_loss(plain(x), y, predict_logits(run.teacher, x), cfg.kd)
        optimizer_step(loss, optimizer, scheduler, step, "plain KD")

    def search_step(x, y, step):
        run.search_step(x, y, run.warmup_steps + step)

    times = {"search": [], "plain": []}
    for i, (x, y) in enumerate(islice(cycle(run.data.train), warmup + steps)):
        for name, step_fn in (("search", search_step), ("plain", plain_step)):
            start = time.perf_counter()
            step_fn(x, y, i)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    search, plain_s = statistics.median(times["search"]), statistics.median(times["plain"])
    return {"batch": cfg.data.batch_size, "steps": steps, "search_s": search, "plain_s": plain_s, "ratio": search / plain_s}
