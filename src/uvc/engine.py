"""Training and measuring: epochs with progress bars, evaluation, throughput."""
from __future__ import annotations

import contextlib
import logging
import os
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .errors import UVCError

log = logging.getLogger("uvc")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UVCError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


def show_progress() -> bool:
    return os.environ.get("UVC_PROGRESS", "1") != "0" and distributed.is_main()


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype inputs must have to meet `model`'s first floating parameter (float32 without one)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def autocast(device: torch.device, dtype: torch.dtype = torch.float32):
    """bf16 autocast for forward passes of float32 models on CUDA; nothing elsewhere, so CPU runs and
    models in another dtype (float64, bf16) compute in their own dtype, bit for bit.

    (Channels-last memory format, the other usual GPU speed-up, is irrelevant for ViTs: their only
    convolution is the patch embedding; everything after it works on [batch, tokens, dim].)
    """
    if device.type == "cuda" and dtype == torch.float32:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def progress(iterable, **kwargs):
    return tqdm(iterable, disable=not show_progress(), dynamic_ncols=True, leave=False, **kwargs)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class logits in eval mode (a distilled DeiT averages its two heads there)."""
    out = model(x)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, desc: str = "eval") -> float:
    """Top-1 accuracy in percent over the whole loader (over every rank's shard under torchrun)."""
    was_training = model.training
    model.eval()
    dtype = model_dtype(model)
    correct = total = 0
    for x, y in progress(loader, desc=desc):
        x, y = x.to(device, dtype), y.to(device)
        with autocast(device, dtype):
            correct += (predict_logits(model, x).argmax(-1) == y).sum().item()
        total += y.numel()
    model.train(was_training)
    correct, total = distributed.sum_over_ranks(correct, total)
    return 100.0 * correct / max(total, 1)


def alternating_rates(runs: dict[str, Callable[[], None]], images_per_run: int, rounds: int,
                      seconds: float) -> dict[str, dict]:
    """Images per second of each `run()`, timed in rounds of >= `seconds`, the runs taking turns in each round.

    Alternating round by round (dense, slimmed, dense, slimmed, ...) makes a change of background
    load hit every run alike. Each run is called once untimed first. Returns per run the median,
    min and max over the rounds and the rounds themselves.
    """
    for run in runs.values():
        run()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            n, start = 0, time.perf_counter()
            while True:
                run()
                n += 1
                elapsed = time.perf_counter() - start
                if elapsed >= seconds:
                    break
            rates[name].append(n * images_per_run / elapsed)
    return {name: {"median": statistics.median(r), "min": min(r), "max": max(r), "rounds": r} for name, r in rates.items()}


@contextlib.contextmanager
def cpu_threads(threads: int | None):
    """torch's CPU thread count fixed at `threads` inside the block (None: as it is), restored after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        yield threads or previous
    finally:
        torch.set_num_threads(previous)


def inference_runner(module: nn.Module, x: torch.Tensor, device: torch.device) -> Callable[[], None]:
    """A call of `module` on `x` in eval mode under the run's autocast, synchronised on CUDA so that it can be timed."""
    module.eval().to(device)
    dtype, sync = model_dtype(module), torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run() -> None:
        with autocast(device, dtype):
            module(x)
        sync()
    return run


@torch.inference_mode()
def compare_throughput(models: dict[str, nn.Module], input_size: tuple[int, int, int], batch_size: int,
                       device: torch.device, rounds: int = 8, seconds: float = 1.0,
                       threads: int | None = None) -> dict[str, dict]:
    """Images per second of inference for each model (`alternating_rates`), bf16 autocast on CUDA as in training.

    `threads` fixes torch's CPU thread count for the measurement (default: as it is).
    """
    with cpu_threads(threads) as used:
        runs = {name: inference_runner(m, torch.randn(batch_size, *input_size, device=device, dtype=model_dtype(m)), device)
                for name, m in models.items()}
        rates = alternating_rates(runs, batch_size, rounds, seconds)
    return {name: {**r, "threads": used, "batch": batch_size, "seconds_per_round": seconds}
            for name, r in rates.items()}


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler, step: int, where: str,
                   clip_grad: float = 0.0) -> float:
    """Backward and update, refusing a non-finite loss with advice instead of training on NaN.

    `clip_grad` > 0 scales the gradients so that their joint L2 norm is at most that (the paper's
    reference code clips at 1.0 in the search and in post-training); 0 leaves them as they are."""
    if not torch.isfinite(loss):
        raise UVCError(f"the loss became {loss.item()} at {where} step {step}; lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad)
    optimizer.step()
    if scheduler is not None:
        scheduler.step_update(step + 1)
    return loss.item()


def train_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, scheduler, loss_fn: Callable,
                device: torch.device, epoch: int, desc: str) -> float:
    """One pass over `loader`; `loss_fn(model, x, y)` returns the loss. Returns the mean loss."""
    model.train()
    steps = len(loader)
    total, bar = 0.0, progress(loader, desc=f"{desc} {epoch + 1}", total=steps)
    for i, (x, y) in enumerate(bar):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = optimizer_step(loss_fn(model, x, y), optimizer, scheduler, epoch * steps + i, desc)
        total += loss
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    return total / max(steps, 1)


LR_BATCH = 128  # every learning rate in uvc is stated for a global batch of this many images


@dataclass
class Schedule:
    """How long and how fast one phase trains: AdamW with a linear warm-up over `warmup_epochs`, then a
    cosine decay to a hundredth of the rate, stepped per update.

    `lr` is the rate per LR_BATCH (128) images: it scales linearly with the global batch actually used
    (DeiT's rule, 5e-4 per 512), so a batch size can change without retuning. The API and the command
    line share this one meaning.
    """

    epochs: float | None  # None only where the owner fills it in (CompressConfig.post_training)
    lr: float  # per 128 images (LR_BATCH)
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0
    clip_grad: float = 0.0  # > 0: the weights' gradient norm is clipped to this before each step (0: off)

    def lr_for(self, batch_size: int) -> float:
        return self.lr * batch_size / LR_BATCH

    def validate(self, what: str, allow_zero: bool = True) -> None:
        if self.epochs < 0 or (self.epochs == 0 and not allow_zero):
            raise UVCError(f"{what} epochs must be {'>= 0' if allow_zero else '> 0'}, got {self.epochs}")
        if self.lr < 0 or self.weight_decay < 0 or self.warmup_epochs < 0 or self.clip_grad < 0:
            raise UVCError(f"{what}: the learning rate, weight decay, warm-up and gradient clipping must be >= 0")

    def steps(self, steps_per_epoch: int) -> int:
        return round(self.epochs * steps_per_epoch)


def make_optimizer(model: nn.Module, schedule: Schedule, steps_per_epoch: int, batch_size: int):
    """AdamW without decay on norms and biases, cosine schedule stepped per update (timm's factories; None for a
    phase of no steps); `batch_size` is the global batch, which scales the schedule's rate (stated per LR_BATCH images)."""
    lr = schedule.lr_for(batch_size)
    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=schedule.weight_decay)
    total = schedule.steps(steps_per_epoch)
    if total == 0:  # a phase that trains for no step (one-shot's default) has no schedule; timm would warn of one
        return optimizer, None
    scheduler = CosineLRScheduler(optimizer, t_initial=total, lr_min=lr * 0.01,
                                  warmup_t=int(schedule.warmup_epochs * steps_per_epoch),
                                  warmup_lr_init=lr * 0.01, t_in_epochs=False)
    return optimizer, scheduler


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

