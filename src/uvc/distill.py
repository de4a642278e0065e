"""Distillation losses: soft KD, hard KD and DeiT's distillation-token KD.

Soft KD averages the KL divergence per sample (`batchmean`); the reference divides by batch x
classes, which makes its KD term ~1000x weaker than the formula it states (METHOD.md section 4).
Labels are class indices or, after mixup/cutmix, soft targets [batch, classes]: cross-entropy on
soft targets is timm's SoftTargetCrossEntropy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

KD_KINDS = ("soft", "hard", "none")


@dataclass
class KDConfig:
    kind: str = "soft"  # soft | hard | none
    alpha: float = 0.5  # weight of the distillation term; the rest goes to the labels
    temperature: float = 1.0


def split_outputs(out):
    """(class logits, distillation logits or None): distilled DeiTs return a pair when training."""
    if isinstance(out, (tuple, list)):
        return out[0], out[1]
    return out, None


def distillation_loss(student_out, labels: torch.Tensor, teacher_logits: torch.Tensor | None, cfg: KDConfig,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """(1 - a) CE(labels) + a KD(teacher), with the distillation token's head taking the KD term.

    Without a teacher (or kind "none") it is plain cross-entropy. Logits are taken in float32 (they
    are bf16 under autocast); `labels` may be indices or soft targets.
    """
    logits, dist_logits = split_outputs(student_out)
    logits = logits.float()
    dist_logits = None if dist_logits is None else dist_logits.float()
    teacher_logits = None if teacher_logits is None else teacher_logits.float()
    ce = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if cfg.kind == "none" or teacher_logits is None:
        return ce if dist_logits is None else (ce + F.cross_entropy(dist_logits, labels, label_smoothing=label_smoothing)) / 2
    kd_logits = dist_logits if dist_logits is not None else logits
    if cfg.kind == "soft":
        t = cfg.temperature
        kd = F.kl_div(F.log_softmax(kd_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                      reduction="batchmean", log_target=True) * t * t
    elif cfg.kind == "hard":
        kd = F.cross_entropy(kd_logits, teacher_logits.argmax(dim=-1))
    else:
        raise ValueError(f"unknown KD kind {cfg.kind!r}; choose from {KD_KINDS}")
    return (1 - cfg.alpha) * ce + cfg.alpha * kd
