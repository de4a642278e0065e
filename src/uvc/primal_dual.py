"""The UVC search state and its updates (METHOD.md section 3).

Primal variables: the weights (trained by the engine), per-block removal *ratios* for heads, head
dimensions and MLP neurons (continuous; the integer count is straight-through rounding), and
{skip, keep} logits for the block and for each half. Dual variables: `z` for the budget R <= B and
`y[l, k]` for "the groups marked for removal are zero" (Phi = their summed squared norms).

Lagrangian = task + KD + sum_lk y_lk * Phi_lk(W, count_lk) + z * (R - B)

Each step: weights descend on task + KD and the marked groups are shrunk proximally; ratios take
a projected gradient step on y * dPhi + z * dR; gates take the task gradient plus z * w_g * dR
(averaged over `gate_accumulate` steps); duals ascend: z += lr_z * clip(R - B), y += lr_y * Phi. Ratios (not raw counts)
are the variables so that heads, dimensions and neurons move on one scale.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .budget import Skeleton, fit_to_budget, skeleton_of, uniform_removal
from .gates import LayerPlan, gated_blocks

SKIP_MODES = ("both", "block", "halves", "none")
GATES = ("block", "attn", "mlp")


@dataclass
class SearchConfig:
    """Search hyper-parameters; defaults are tuned for the bundled Fashion-MNIST demo."""

    epochs: float = 1.0
    warmup_epochs: float = 0.2
    lr: float = 3e-4
    lr_warmup_epochs: float = 0.05
    weight_decay: float = 0.05
    prune: bool = True
    skip: str = "both"  # which skip gates exist: block, halves (attention / MLP), both, or none
    ratio_lr: float = 0.005
    gate_lr: float = 0.1
    gate_momentum: float = 0.9
    gate_tau: float = 0.5
    gate_accumulate: int = 10
    gate_budget_weight: float = 1.0  # w_g: how strongly the budget pushes gates towards skipping
    z_init: float = 1e-3
    z_lr: float = 1.0
    z_step_clip: float = 0.5
    y_init: float = 1e-3
    y_lr: float = 1e-4


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward.

    METHOD.md rounds counts up; with a ceiling the first step off zero removes a whole group, which
    for a layer of 2-3 heads is a jump of a third of its attention and makes R oscillate. Rounding
    to the nearest count removes a group once half of it is marked. The final fit is exact anyway.
    """
    return x + (torch.round(x) - x).detach()


class PrimalDual(nn.Module):
    """Ratios, gate logits and duals for one gated model, plus the updates that move them."""

    def __init__(self, model: nn.Module, budget: float, cfg: SearchConfig, skeleton: Skeleton | None = None):
        super().__init__()
        self.cfg, self.budget = cfg, budget
        self.skel = skeleton or skeleton_of(model)
        self.dense = self.skel.dense_macs()
        self.register_buffer("sizes", self.skel.sizes())
        start = uniform_removal(self.skel, budget) if cfg.prune else torch.zeros_like(self.sizes)
        self.ratios = nn.Parameter(start / self.sizes)
        logits = torch.tensor([-1.0, 1.0]).repeat(self.skel.depth, len(GATES), 1)
        self.gate_logits = nn.Parameter(logits)
        self.register_buffer("gate_enabled", self._enabled_gates(cfg.skip))
        self.register_buffer("y", torch.full((self.skel.depth, 3), cfg.y_init))
        self.register_buffer("z", torch.tensor(cfg.z_init))
        self.register_buffer("step_count", torch.tensor(0))
        self.gate_optimizer = torch.optim.SGD([self.gate_logits], lr=cfg.gate_lr, momentum=cfg.gate_momentum)
        self.phi = torch.zeros(self.skel.depth, 3)
        self.next_norm = torch.zeros(self.skel.depth, 3)
        self.costs: list[list[torch.Tensor]] = []

    def _enabled_gates(self, mode: str) -> torch.Tensor:
        if mode not in SKIP_MODES:
            raise ValueError(f"skip mode {mode!r} is not one of {SKIP_MODES}")
        on = {"both": GATES, "block": ("block",), "halves": ("attn", "mlp"), "none": ()}[mode]
        return torch.tensor([g in on for g in GATES])

    # ---- decisions -------------------------------------------------------------------------
    def removed(self) -> torch.Tensor:
        """[L, 3] integer removal counts (straight-through rounding, so dR/dratio flows)."""
        return ste_round(self.ratios * self.sizes)

    def keep_probs(self) -> torch.Tensor:
        """[L, 3] probability that the block / attention half / MLP half is kept (1 where gating is off)."""
        p = F.softmax(self.gate_logits, dim=-1)[..., 1]
        return torch.where(self.gate_enabled, p, torch.ones_like(p))

    def hard_keep(self) -> torch.Tensor:
        keep = (self.gate_logits[..., 1] >= self.gate_logits[..., 0]).float()
        return torch.where(self.gate_enabled, keep, torch.ones_like(keep))

    @staticmethod
    def _halves(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return keep[:, 0] * keep[:, 1], keep[:, 0] * keep[:, 2]

    def resource(self, hard: bool = False) -> torch.Tensor:
        """R = MACs / dense MACs, expected under the gate probabilities (or at the hard decisions)."""
        attn, mlp = self._halves(self.hard_keep() if hard else self.keep_probs())
        return self.skel.macs(self.removed(), attn, mlp) / self.dense

    # ---- masks -----------------------------------------------------------------------------
    @torch.no_grad()
    def apply_masks(self, model: nn.Module) -> None:
        """Mark the least important groups by the current counts; record Phi and the next group's norm."""
        counts = self.removed().detach().long()
        self.costs = []
        for l, block in enumerate(gated_blocks(model)):
            heads, head_dim = block.dim_mask.shape
            col = block.attn.proj.weight.pow(2).sum(0).view(heads, head_dim)
            head_norm, neuron_norm = col.sum(1), block.mlp.fc2.weight.pow(2).sum(0)
            nh, nd, nm = counts[l].tolist()
            head_order = head_norm.argsort()
            dim_sorted, dim_order = col.sort(dim=1)
            neuron_sorted, neuron_order = neuron_norm.sort()
            block.head_mask.fill_(1.0)
            block.head_mask[head_order[:nh]] = 0.0
            block.dim_mask.fill_(1.0)
            block.dim_mask.scatter_(1, dim_order[:, :nd], 0.0)
            block.neuron_mask.fill_(1.0)
            block.neuron_mask[neuron_order[:nm]] = 0.0
            # Norms relative to the layer's total for that kind: the penalty terms are then scale-free,
            # comparable across layers and kinds, and commensurate with dR/dratio.
            totals = torch.stack([head_norm.sum(), col.sum(), neuron_norm.sum()]).clamp(min=1e-12)
            self.phi[l] = torch.stack([head_norm[head_order[:nh]].sum(), dim_sorted[:, :nd].sum(),
                                       neuron_sorted[:nm].sum()]) / totals
            self.next_norm[l] = torch.stack([
                head_norm[head_order[nh]] if nh < heads else head_norm.new_zeros(()),
                dim_sorted[:, nd].sum() if nd < head_dim else col.new_zeros(()),
                neuron_sorted[nm] if nm < neuron_norm.numel() else neuron_norm.new_zeros(()),
            ]) / totals
            self.costs.append([head_norm.sort().values / totals[0], dim_sorted.sum(0) / totals[1],
                               neuron_sorted / totals[2]])

    def sample_gates(self, model: nn.Module, training: bool) -> None:
        """Straight-through Gumbel-softmax samples while training, hard decisions otherwise."""
        if training:
            sample = F.gumbel_softmax(self.gate_logits, tau=self.cfg.gate_tau, hard=True)[..., 1]
            keep = torch.where(self.gate_enabled, sample, torch.ones_like(sample))
        else:
            keep = self.hard_keep()
        attn, mlp = self._halves(keep)
        for l, block in enumerate(gated_blocks(model)):
            block.attn_keep, block.mlp_keep = (attn[l], mlp[l]) if training else (float(attn[l]), float(mlp[l]))

    # ---- updates ---------------------------------------------------------------------------
    @torch.no_grad()
    def proximal_shrink(self, model: nn.Module, lr: float) -> None:
        """W_group /= (1 + 2 lr y) for every group marked for removal."""
        for l, block in enumerate(gated_blocks(model)):
            f_head, f_dim, f_neuron = (1.0 / (1.0 + 2.0 * lr * self.y[l])).tolist()
            factor = torch.where(block.head_mask[:, None] == 0, f_head, 1.0) * torch.where(block.dim_mask == 0, f_dim, 1.0)
            if bool((factor < 1).any()):
                heads, head_dim = factor.shape
                qkv, proj = block.attn.qkv, block.attn.proj
                qkv.weight.view(3, heads, head_dim, -1).mul_(factor[None, :, :, None])
                if qkv.bias is not None:
                    qkv.bias.view(3, heads, head_dim).mul_(factor[None])
                proj.weight.view(proj.out_features, heads, head_dim).mul_(factor[None])
            f_n = torch.where(block.neuron_mask == 0, f_neuron, 1.0)
            block.mlp.fc1.weight.mul_(f_n[:, None])
            if block.mlp.fc1.bias is not None:
                block.mlp.fc1.bias.mul_(f_n)
            block.mlp.fc2.weight.mul_(f_n[None, :])

    def budget_gradients(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """R and its gradients with respect to the ratios and the gate logits."""
        r = self.resource()
        d_ratio, d_logits = torch.autograd.grad(r, [self.ratios, self.gate_logits])
        return r.detach(), d_ratio, d_logits

    def step(self, searching: bool) -> dict:
        """After the weights' step: gates always; ratios and duals once warm-up is over.

        Returns the figures to log. Gate gradients from the task loss must already be in
        `gate_logits.grad` (the forward pass used the sampled gates).
        """
        cfg = self.cfg
        r, d_ratio, d_logits = self.budget_gradients()
        with torch.no_grad():
            r_hard = self.resource(hard=True)
        if self.gate_logits.grad is None:
            self.gate_logits.grad = torch.zeros_like(self.gate_logits)
        self.gate_logits.grad.add_(self.z * cfg.gate_budget_weight * d_logits)
        self.step_count += 1
        if int(self.step_count) % cfg.gate_accumulate == 0:
            self.gate_logits.grad.mul_(self.gate_enabled[None, :, None] / cfg.gate_accumulate)
            self.gate_optimizer.step()
            self.gate_optimizer.zero_grad(set_to_none=False)
        if searching:
            with torch.no_grad():
                if cfg.prune:
                    grad = self.y * self.sizes * self.next_norm + self.z * d_ratio
                    grad = grad / grad.abs().max().clamp(min=1e-12)  # a direction: the largest entry moves by ratio_lr
                    upper = (self.sizes - 1) / self.sizes
                    self.ratios.copy_(torch.minimum(torch.clamp(self.ratios - cfg.ratio_lr * grad, min=0.0), upper))
                    self.y.add_(cfg.y_lr * self.phi).clamp_(min=0.0)
                # The dual tracks the architecture that would be delivered now (hard gates, integer counts);
                # the expected R under the gate probabilities only shapes the gradients.
                self.z.add_(cfg.z_lr * torch.clamp(r_hard - self.budget, -cfg.z_step_clip, cfg.z_step_clip)).clamp_(min=0.0)
        return {"R": float(r), "R_hard": float(r_hard), "z": float(self.z), "y": float(self.y.mean())}

    # ---- the end of the search -------------------------------------------------------------
    @torch.no_grad()
    def final_plan(self, model: nn.Module, tolerance: float = 0.01) -> list[LayerPlan]:
        """Hard gates, counts fitted to B - tolerance <= R <= B, and the plan that slimming removes.

        With pruning off, the budget is met by skipping more: the kept gates whose keep logit wins
        by the smallest margin are flipped until R <= B.
        """
        self.apply_masks(model)
        if not self.cfg.prune:
            while float(self.resource(hard=True)) > self.budget:
                margin = self.gate_logits[..., 1] - self.gate_logits[..., 0]
                margin = torch.where(self.gate_enabled & (margin >= 0), margin, torch.inf)
                if torch.isinf(margin).all():
                    break
                l, g = divmod(int(margin.argmin()), len(GATES))
                self.gate_logits[l, g] = self.gate_logits[l, g].flip(0)
        else:
            attn, mlp = self._halves(self.hard_keep())
            removed = fit_to_budget(self.skel, self.removed().detach(), attn, mlp, self.costs, self.budget, tolerance)
            self.ratios.copy_(removed / self.sizes)
            self.apply_masks(model)
        self.sample_gates(model, training=False)
        return [b.plan() for b in gated_blocks(model)]

    def search_state(self) -> dict:
        """Everything a resumed search needs, including gate gradients accumulated so far."""
        return {"module": self.state_dict(), "gate_optimizer": self.gate_optimizer.state_dict(),
                "gate_grad": self.gate_logits.grad}

    def load_search_state(self, state: dict) -> None:
        self.load_state_dict(state["module"])
        self.gate_optimizer.load_state_dict(state["gate_optimizer"])
        self.gate_logits.grad = state["gate_grad"]

__all__ = ["SearchConfig", "PrimalDual", "ste_round"]
