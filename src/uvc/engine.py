"""Training and measuring: epochs with progress bars, evaluation, throughput, checkpoints."""
from __future__ import annotations

import contextlib
import logging
import os
import statistics
import time
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .errors import UVCError
from .io import atomic_write

log = logging.getLogger("uvc")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UVCError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


def show_progress() -> bool:
    return os.environ.get("UVC_PROGRESS", "1") != "0" and distributed.is_main()


def autocast(device: torch.device):
    """bf16 autocast for forward passes on CUDA; nothing elsewhere, so CPU runs stay float32 bit for bit.

    (Channels-last memory format, the other usual GPU speed-up, is irrelevant for ViTs: their only
    convolution is the patch embedding; everything after it works on [batch, tokens, dim].)
    """
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


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
    correct = total = 0
    for x, y in progress(loader, desc=desc):
        x, y = x.to(device), y.to(device)
        with autocast(device):
            correct += (predict_logits(model, x).argmax(-1) == y).sum().item()
        total += y.numel()
    model.train(was_training)
    correct, total = distributed.sum_over_ranks(correct, total)
    return 100.0 * correct / max(total, 1)


@torch.no_grad()
def throughput(model: nn.Module, input_size: tuple[int, int, int], batch_size: int, device: torch.device,
               repeats: int = 5, warmup: int = 2, min_seconds: float = 0.2) -> float:
    """Images per second of inference (bf16 on CUDA): warm-up, then the median of `repeats` timed rounds."""
    model = model.eval().to(device)
    x = torch.randn(batch_size, *input_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with autocast(device):
        for _ in range(warmup):
            model(x)
        sync()
        rates = []
        for _ in range(repeats):
            n, start = 0, time.perf_counter()
            while True:
                model(x)
                n += 1
                sync()
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds:
                    break
            rates.append(n * batch_size / elapsed)
    return statistics.median(rates)


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Atomic: the previous checkpoint stays valid until the new one is complete."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a torn or foreign file raises many types
        raise UVCError(f"checkpoint {path} cannot be read ({e}); delete it to start over") from e


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler, step: int, where: str) -> float:
    """Backward and update, refusing a non-finite loss with advice instead of training on NaN."""
    if not torch.isfinite(loss):
        raise UVCError(f"the loss became {loss.item()} at {where} step {step}; lower the learning rate")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
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


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, epochs: int, steps_per_epoch: int,
                   warmup_epochs: float = 0.0):
    """AdamW without decay on norms and biases, cosine schedule stepped per update (timm's factories)."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    optimizer = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay)
    total = max(epochs * steps_per_epoch, 1)
    scheduler = CosineLRScheduler(optimizer, t_initial=total, lr_min=lr * 0.01,
                                  warmup_t=int(warmup_epochs * steps_per_epoch), warmup_lr_init=lr * 0.01,
                                  t_in_epochs=False)
    return optimizer, scheduler


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

