"""Backbones: models that output features, not class logits (timm `num_classes=0`, Hugging Face `ViTModel` /
`Dinov2Model`, or a classifier whose head `--num-classes 0` drops).

A backbone has no classes to score, so it is distilled by its features (`distill.features_of`) and judged by
how closely the compressed model's pooled feature follows the dense one's (mean cosine on validation images),
plus, where the data has labels, a linear probe before and after (`transfer.linear_probe`).
"""
from __future__ import annotations

import torch
from torch import nn

from . import distributed
from .distill import features_of
from .engine import autocast, model_dtype, progress
from .transfer import classifier_heads, predicts


def is_backbone(model: nn.Module) -> bool:
    """Whether the model's head is an identity (it returns its pooled feature)."""
    return predicts(model) == 0


def drop_head(model: nn.Module) -> nn.Module:
    """Make `model` a backbone in place: its head(s) become identities, so it returns its pooled feature."""
    for name in classifier_heads(model):
        setattr(model, name, nn.Identity())
    model.num_classes = 0
    return model


@torch.no_grad()
def feature_cosine(model: nn.Module, reference: nn.Module, loader, device: torch.device, desc: str = "eval") -> float:
    """Mean cosine similarity, over the loader's images (every rank's shard under torchrun), between the pooled
    pre-logits features of `model` and of `reference`."""
    states = model.training, reference.training
    model.eval(), reference.eval()
    total, count = 0.0, 0
    for x, _ in progress(loader, desc=desc):
        with features_of(model) as mine, features_of(reference) as theirs:
            with autocast(device, model_dtype(model)):
                model(x.to(device, model_dtype(model)))
            with autocast(device, model_dtype(reference)):
                reference(x.to(device, model_dtype(reference)))
        a, b = mine["pooled"].double(), theirs["pooled"].double()
        total += float(torch.nn.functional.cosine_similarity(a, b, dim=-1).sum())
        count += len(a)
    model.train(states[0]), reference.train(states[1])
    total, count = distributed.sum_over_ranks(total, count)
    return total / max(count, 1)
