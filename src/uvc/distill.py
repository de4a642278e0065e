"""Distillation losses: soft KD, hard KD and DeiT's distillation-token KD.

Soft KD averages the KL divergence per sample (`batchmean`); the paper's reference code divides by
batch x classes (DeiT's reduction), which makes its KD term ~1000x weaker than the formula it states
on ImageNet. `KDConfig.reduction="element"` reproduces it (`--preset paper`).
Labels are class indices or, after mixup/cutmix, soft targets [batch, classes]: cross-entropy on
soft targets is timm's SoftTargetCrossEntropy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UVCError

KD_KINDS = ("soft", "hard", "none")
KD_REDUCTIONS = ("sample", "element")


@dataclass
class KDConfig:
    kind: str = "soft"  # soft | hard | none
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
