"""Measured cost: inference throughput of slimmed models against their dense model, and the time of a search step.

Throughput is `uvc.engine.compare_throughput`: the dense and the slimmed model alternate in rounds
of at least a second, in one process, with the thread count the runner fixed, so a change in
background load moves both numbers of a pair alike; the median and the spread are kept.
"""
from __future__ import annotations

import copy
import ctypes
import ctypes.util
import statistics
import time
from itertools import cycle, islice

import torch
from torch import nn

import uvc
from uvc.compress import CompressConfig, Run
from uvc.distill import distillation_loss
from uvc.budget import uniform_plan
from uvc.engine import compare_throughput, make_optimizer, optimizer_step, predict_logits

CPU = torch.device("cpu")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD_MAX = 32 << 20  # the largest that glibc accepts on 64-bit machines


def steady_allocator() -> str:
    """Make glibc's malloc keep freed memory, so that a model's measured speed does not depend on what the
    process ran before; returns what was done, for the record.

    By default glibc gives freed memory back to the system, above thresholds that grow with the largest
    block freed so far. A model whose activations lie above them pays page faults on every call, and
    whether they do depends on history: in one process the teacher ran at 730 images/s before an
    evaluation at a large batch and at 900 after it, while its slimmed model, with smaller activations,
    stayed the same. Fixed high thresholds give every model the state a long-running server reaches.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        done = libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
    except (OSError, TypeError, AttributeError):  # no C library by that name, or one without mallopt (not glibc)
        done = False
    return ("glibc malloc: freed memory kept (trim threshold 1 GiB, mmap threshold 32 MiB)" if done
            else "the C library's default allocator (mallopt unavailable)")


def speed_pair(dense: nn.Module, slimmed: nn.Module, input_size, batch: int, rounds: int, seconds: float = 1.0,
               threads: int | None = None) -> dict:
    """Images per second of both models at one batch size: the median over the rounds with [min, max], and
    the speedup of the medians. `threads` fixes torch's thread count for the measurement (default: as set)."""
    rates = compare_throughput({"dense": dense, "slimmed": slimmed}, input_size, batch, CPU, rounds=rounds,
                               seconds=seconds, threads=threads)
    return {"batch": batch, "rounds": rounds, "threads": rates["dense"]["threads"],
            "dense": rates["dense"]["median"], "slimmed": rates["slimmed"]["median"],
            "dense_range": [rates["dense"]["min"], rates["dense"]["max"]],
            "slimmed_range": [rates["slimmed"]["min"], rates["slimmed"]["max"]],
            "speedup": rates["slimmed"]["median"] / rates["dense"]["median"]}


def deit_small_speed(budget: float, batches, rounds: int, width_multiple: int = 1, threads: int | None = None,
                     seconds: float = 1.0) -> dict:
    """deit_small_patch16_224 (random weights: speed does not depend on them) slimmed by the uniform plan,
    with kept head and MLP widths at multiples of `width_multiple`, against the dense model."""
    import timm

    torch.manual_seed(0)
    dense = timm.create_model("deit_small_patch16_224").eval()
    slimmed = uvc.slim(dense, uniform_plan(dense, budget, multiple=width_multiple))
    input_size = (3, 224, 224)
    return {"budget": budget, "ratio": uvc.macs(slimmed, input_size) / uvc.macs(dense, input_size),
            "layers": [b.config() for b in slimmed.blocks], "width_multiple": width_multiple,
            "speed": [speed_pair(dense, slimmed, input_size, b, rounds, seconds, threads) for b in batches]}


def step_cost(cfg: CompressConfig, teacher: nn.Module, steps: int, warmup: int = 3) -> dict:
    """Seconds per UVC search step (past warm-up: ratios and duals move) and per plain KD step of the dense model.

    Both see the same batches, alternating step by step; the plain step is what fine-tuning the
    dense model with the same distillation costs: teacher forward, student forward and backward, AdamW.
    """
    run = Run(cfg, model=copy.deepcopy(teacher), teacher=teacher)
    plain = copy.deepcopy(teacher).train()
    for p in plain.parameters():
        p.requires_grad_(True)
    optimizer, scheduler = make_optimizer(plain, cfg.search.schedule, run.steps_per_epoch, cfg.data.batch_size)

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
