"""Distillation losses: soft KD, hard KD, DeiT's distillation-token KD and feature KD.

Feature KD ("features") is how a backbone, a model without a classifier, is distilled: there are no
logits to match, so the student matches the teacher's pooled pre-logits feature (the head's input)
and its final normalised tokens, each by cosine distance (scale-free: a backbone's features are
compared by direction downstream, by retrieval or a linear probe). It is chosen automatically for backbones.

Soft KD averages the KL divergence per sample (`batchmean`); the paper's reference code divides by
batch x classes (DeiT's reduction), which makes its KD term ~1000x weaker than the formula it states
on ImageNet. `KDConfig.reduction="element"` reproduces it (`--preset paper`).
Labels are class indices or, after mixup/cutmix, soft targets [batch, classes]: cross-entropy on
soft targets is timm's SoftTargetCrossEntropy.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UVCError

KD_KINDS = ("soft", "hard", "features", "none")
KD_REDUCTIONS = ("sample", "element")


@dataclass
class KDConfig:
    kind: str = "soft"  # soft | hard | features | none (a backbone always takes "features")
    alpha: float = 0.5  # weight of the distillation term; the rest goes to the labels
    temperature: float = 1.0
    reduction: str = "sample"  # soft KD's KL: summed per sample, averaged over the batch ("sample"), or also
    # averaged over the classes ("element": DeiT's and the paper's reference code's, ~classes x weaker)

    def validate(self) -> None:
        if self.kind not in KD_KINDS:
            raise UVCError(f"KD kind {self.kind!r} is not one of {', '.join(KD_KINDS)}")
        if self.reduction not in KD_REDUCTIONS:
            raise UVCError(f"KD reduction {self.reduction!r} is not one of {', '.join(KD_REDUCTIONS)}")
        if not 0 <= self.alpha <= 1 or self.temperature <= 0:
            raise UVCError(f"KD alpha must be in [0, 1] and the temperature > 0 (got {self.alpha}, {self.temperature})")


def split_outputs(out):
    """(class logits, distillation logits or None): distilled DeiTs return a pair when training."""
    if isinstance(out, (tuple, list)):
        return out[0], out[1]
    return out, None


def _at_least_float32(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.dtype == torch.float64 else t.float()


def distillation_loss(student_out, labels: torch.Tensor, teacher_logits: torch.Tensor | None, cfg: KDConfig,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """(1 - a) CE(labels) + a KD(teacher), with the distillation token's head taking the KD term.

    Without a teacher (or kind "none") it is plain cross-entropy. Logits in a half type (bf16 under
    autocast) are taken in float32, float64 stays float64; `labels` may be indices or soft targets.
    """
    logits, dist_logits = split_outputs(student_out)
    logits, dist_logits, teacher_logits = (_at_least_float32(t) for t in (logits, dist_logits, teacher_logits))
    if labels.is_floating_point():
        labels = labels.to(logits.dtype)
    ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if cfg.kind == "none" or teacher_logits is None:
        return ce if dist_logits is None else (ce + F.cross_entropy(dist_logits, labels, label_smoothing=label_smoothing)) / 2
    kd_logits = dist_logits if dist_logits is not None else logits
    if cfg.kind == "soft":
        t = cfg.temperature
        kd = F.kl_div(F.log_softmax(kd_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                      reduction="batchmean", log_target=True) * t * t
        if cfg.reduction == "element":
            kd = kd / kd_logits.shape[-1]
    elif cfg.kind == "hard":
        kd = F.cross_entropy(kd_logits, teacher_logits.argmax(dim=-1))
    else:
        raise ValueError(f"unknown KD kind {cfg.kind!r}; choose from {KD_KINDS}")
    return (1 - cfg.alpha) * ce + cfg.alpha * kd


@contextlib.contextmanager
def features_of(model: nn.Module) -> Iterator[dict]:
    """Within the block, each forward pass of `model` records into the yielded dict its final normalised tokens
    ("tokens": the output of `model.norm`) and its pooled pre-logits feature ("pooled": the input of `model.head`).

    Hooks live only inside the block, so a model copied later carries none."""
    model = getattr(model, "module", model)  # a DistributedDataParallel wrapper records through its module
    found: dict = {}
    handles = [model.norm.register_forward_hook(lambda module, args, out: found.__setitem__("tokens", out)),
               model.head.register_forward_pre_hook(lambda module, args: found.__setitem__("pooled", args[0]))]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """1 - cos(student, teacher) along the feature axis, averaged over everything else."""
    if student.shape != teacher.shape:
        raise UVCError(f"feature distillation needs the teacher's feature shape {tuple(teacher.shape[1:])}, the student "
                       f"gives {tuple(student.shape[1:])}: drop --teacher (the input model is the teacher)")
    student, teacher = _at_least_float32(student), _at_least_float32(teacher).to(student.dtype)
    return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()


def feature_distillation_loss(student_out, labels: torch.Tensor | None, student: dict, teacher: dict, cfg: KDConfig,
                              label_smoothing: float = 0.0) -> torch.Tensor:
    """Cosine distance of the pooled features plus that of the final tokens (`features_of`'s records).

    A backbone has no labels term (`labels` None); a classifier distilled by features keeps its
    cross-entropy, weighted (1 - alpha) against alpha for the features, as in `distillation_loss`.
    """
    kd = cosine_distance(student["pooled"], teacher["pooled"]) + cosine_distance(student["tokens"], teacher["tokens"])
    if labels is None:
        return kd
    logits = _at_least_float32(split_outputs(student_out)[0])
    labels = labels.to(logits.dtype) if labels.is_floating_point() else labels
    ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    return (1 - cfg.alpha) * ce + cfg.alpha * kd
