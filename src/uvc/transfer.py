"""Transfer, then compress: a classifier head for the user's classes, fitted on frozen features.

A model pretrained for other classes (ImageNet's 1000, or none: a backbone) cannot teach the
user's labels. Its features usually can: a linear head on them, fitted in closed form, is the
standard linear probe and takes one pass over the training images. That fitted model is the
teacher, and its copy the starting point, of the compression that follows.

The head is ridge regression onto one-hot labels, its ridge chosen on the validation split, then
its logits scaled by one temperature that minimises validation cross-entropy. Least squares gives
well-ranked but flat logits (all near 0 and 1); the scale makes the softmax that KD distils from a
calibrated one instead of a near-uniform one.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from . import distributed
from .errors import UVCError
from .engine import model_dtype

log = logging.getLogger("uvc")
MAX_IMAGES = 20_000  # training images whose features fit the head: a probe saturates long before ImageNet's 1.28 M
RIDGES = (1e-6, 1e-4, 1e-2, 1.0)  # relative to the features' mean energy, tried on validation
SCALES = torch.logspace(-1, 3, 81)  # logit temperatures tried on validation


def classifier_heads(model: nn.Module) -> list[str]:
    """Names of the model's output layers (a distilled DeiT has two, averaged at inference)."""
    names = [n for n in ("head", "head_dist") if isinstance(getattr(model, n, None), (nn.Linear, nn.Identity))]
    if not names:
        raise UVCError(f"{type(model).__name__} has no `head` layer to replace; --num-classes needs a timm-style "
                       "classifier (timm ViT / DeiT, T2T-ViT, or a Hugging Face ViT loaded by uvc)")
    return names


@torch.no_grad()
def features(model: nn.Module, batches, device: torch.device, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs of the model's head (its pre-logits features) and the labels, float64 on the CPU."""
    head = getattr(model, classifier_heads(model)[0])
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda module, args, out: captured.append(args[0].double().cpu()))
    labels, dtype, was_training = [], model_dtype(model), model.training
    model.eval()
    try:
        for x, y in batches:
            model(x.to(device, dtype))
            labels.append(y)
            if limit is not None and sum(len(t) for t in labels) >= limit:
                break
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(captured)[:limit], torch.cat(labels)[:limit]


def _with_bias(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)


def ridge_probe(x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor, num_classes: int) -> dict:
    """A linear head from features `x` to labels `y`: ridge regression onto one-hot labels, the ridge chosen
    on the validation features `xv` / labels `yv`; returns the weight (features + 1, num_classes; the last row
    is the bias), the ridge and the validation counts (summed over ranks under torchrun)."""
    xb, xvb = _with_bias(x), _with_bias(xv)
    gram, targets = xb.T @ xb, xb.T @ nn.functional.one_hot(y, num_classes).double()
    energy = gram.diagonal().mean()
    best = None
    for ridge in RIDGES:
        weight = torch.linalg.solve(gram + ridge * energy * torch.eye(len(gram), dtype=gram.dtype), targets)
        correct, total = distributed.sum_over_ranks(int(((xvb @ weight).argmax(1) == yv).sum()), len(yv))
        if best is None or correct > best["correct"]:
            best = {"correct": correct, "total": total, "ridge": ridge, "weight": weight}
    best["top1_val"] = 100.0 * best["correct"] / max(best["total"], 1)
    return best


def calibrated_head(x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor, num_classes: int) -> dict:
    """`ridge_probe`'s head with its logits scaled by the temperature that minimises validation cross-entropy:
    the weight (num_classes, features + 1; the last column is the bias), `logit_scale`, the ridge and top1_val."""
    probe = ridge_probe(x, y, xv, yv, num_classes)
    logits = _with_bias(xv) @ probe["weight"]
    losses = torch.stack([nn.functional.cross_entropy(s * logits, yv, reduction="sum") for s in SCALES.double()])
    losses = torch.tensor(distributed.sum_over_ranks(*losses.tolist()))
    scale = float(SCALES[int(losses.argmin())])
    return {**probe, "weight": (scale * probe["weight"]).T, "logit_scale": scale}


def fit_head(model: nn.Module, train_batches, val_batches, num_classes: int, device: torch.device) -> dict:
    """Replace the model's head(s) by a fitted `num_classes`-way linear head; returns what was chosen.

    `train_batches` should be unaugmented (uvc passes the calibration loader); validation picks the
    ridge and the logit scale and gives the reported accuracy (summed over ranks under torchrun).
    """
    if num_classes < 2:
        raise UVCError(f"--num-classes must be >= 2 to fit a classifier, got {num_classes}")
    x, y = features(model, train_batches, device, MAX_IMAGES)
    if int(y.max()) >= num_classes:
        raise UVCError(f"the training labels reach {int(y.max())} but --num-classes is {num_classes}; pass the data's "
                       "class count")
    xv, yv = features(model, val_batches, device)
    head = calibrated_head(x, y, xv, yv, num_classes)
    new_head = nn.Linear(head["weight"].shape[1] - 1, num_classes).to(device=next(model.parameters()).device,
                                                                      dtype=model_dtype(model))
    with torch.no_grad():
        new_head.weight.copy_(head["weight"][:, :-1])
        new_head.bias.copy_(head["weight"][:, -1])
    for name in classifier_heads(model):
        setattr(model, name, new_head if name == "head" else copy.deepcopy(new_head))
    model.num_classes = num_classes
    ridge, top1_val, scale = head["ridge"], head["top1_val"], head["logit_scale"]
    log.info("fitted a %d-class head on the frozen features of %d training images: validation top-1 %.2f%% "
             "(ridge %.0e, logit scale %.3g)", num_classes, len(y), top1_val, ridge, scale)
    return {"num_classes": num_classes, "images": len(y), "ridge": ridge, "logit_scale": scale, "top1_val": top1_val}


def linear_probe(model: nn.Module, train_batches, val_batches, num_classes: int, device: torch.device) -> dict:
    """Validation top-1 of a ridge head fitted on the model's frozen pre-logits features (the model is not changed):
    how much of what the labels need its features still hold."""
    x, y = features(model, train_batches, device, MAX_IMAGES)
    xv, yv = features(model, val_batches, device)
    probe = ridge_probe(x, y, xv, yv, num_classes)
    return {"top1_val": probe["top1_val"], "images": len(y), "ridge": probe["ridge"]}


def predicts(model: nn.Module) -> int:
    """How many classes the model's head outputs (0 for a backbone whose head is an identity)."""
    head = getattr(model, classifier_heads(model)[0])
    return head.out_features if isinstance(head, nn.Linear) else 0
