"""The UVC search: one object that owns the decision variables, the duals and the updates that move them.

Primal variables: the weights (their optimizer step is the training loop's), per-block removal
*ratios* for heads, head dimensions and MLP neurons (continuous; the integer count is
straight-through rounding), and {skip, keep} logits for each block and each half. Dual variables:
`z` for the budget R <= B, and `y[l, k]` for "the groups marked for removal are zero"
(Phi[l, k] = their summed squared norms, relative to the layer's total for that kind).

    Lagrangian = task + KD + sum_lk y_lk * Phi_lk(W, count_lk) + z * (R(counts, gates) - B)

One iteration, in the order `compress` calls the methods:
1. `mark_groups`    masks from the current counts: the least important groups of each kind (and Phi)
   `sample_gates`   Gumbel-softmax samples of the skip gates (hard decisions when evaluating)
2. (the weights take an optimizer step on task + KD: the training loop's job)
3. `proximal_shrink` the y * Phi term's proximal step on the weights: marked groups shrink by 1 / (1 + 2 lr y)
4. `gate_step`      task gradient + z * w_g * dR/dlogits, accumulated over `gate_accumulate` steps, SGD
5. `ratio_step`     projected step along -(y * dPhi/dratio + z * dR/dratio), scaled to max-abs `ratio_lr`
6. `dual_step`      y += lr_y * Phi;  z += lr_z * clip(R_hard - B)   (gradient ascent, projected on >= 0)
Steps 5 and 6 wait for the warm-up to end. `final_plan` fits the counts exactly to the budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .budget import fit_to_budget, plan_of_counts, removal_costs, uniform_removal
from .engine import Schedule
from .errors import UVCError
from .gates import GatedBlock, gated_blocks
from .importance import group_norms, keep_masks
from .plan import LayerPlan
from .resource import Skeleton

SKIP_MODES = ("both", "block", "halves", "none")
GATES = ("block", "attn", "mlp")


@dataclass
class SearchConfig:
    """Search hyper-parameters; the defaults are tuned for the bundled Fashion-MNIST demo (see docs/method.md)."""

    schedule: Schedule = field(default_factory=lambda: Schedule(epochs=1.0, lr=3e-4, weight_decay=0.05,
                                                                warmup_epochs=0.05))
    warmup_epochs: float = 0.2  # weights and gates train alone before the counts and the duals move
    prune: bool = True
    skip: str = "both"  # which skip gates exist: block, halves (attention / MLP), both, or none
    width_multiple: int = 1  # kept head and MLP widths at multiples of this (8 suits GPU kernels)
    frozen: bool = False  # the benchmark's control: train the masked start plan, but move no count, gate or dual
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

    def validate(self) -> None:
        self.schedule.validate("search", allow_zero=False)
        if self.skip not in SKIP_MODES:
            raise UVCError(f"skip mode {self.skip!r} is not one of {', '.join(SKIP_MODES)}")
        if self.warmup_epochs < 0:
            raise UVCError(f"search warm-up epochs must be >= 0, got {self.warmup_epochs}")
        if self.width_multiple < 1:
            raise UVCError(f"width multiple must be >= 1, got {self.width_multiple}")
        if self.gate_accumulate < 1 or self.gate_tau <= 0:
            raise UVCError("gate accumulation must be >= 1 step and the gate temperature > 0")


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward.

    A ceiling (the reference's choice) removes a whole group on the first step off zero, which for a
    layer of 2-3 heads is a jump of a third of its attention and makes R oscillate. Rounding to the
    nearest count removes a group once half of it is marked. The final fit is exact anyway.
    """
    return x + (torch.round(x) - x).detach()


def _state_dtype(weight: torch.Tensor) -> torch.dtype:
    """The search state follows the weights' dtype, except that half types keep it in float32:
    ratio steps of 0.005 would vanish in bf16's 8-bit mantissa."""
    return weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32


class Search(nn.Module):
    """Ratios, gate logits and duals for one gated model's blocks, and one method per part of an iteration.

    The state lives on the blocks' device, in their dtype (float32 for half types), and `.to()` moves it.
    """

    def __init__(self, model: nn.Module, budget: float, cfg: SearchConfig, skeleton: Skeleton):
        super().__init__()
        self.cfg, self.budget, self.skel = cfg, budget, skeleton
        self._blocks: tuple[GatedBlock, ...] = tuple(gated_blocks(model))  # a tuple: not registered as submodules
        weight = self._blocks[0].attn.qkv.weight if self._blocks else torch.zeros(())
        like = torch.zeros((), device=weight.device, dtype=_state_dtype(weight))
        depth = skeleton.depth
        self.register_buffer("sizes", skeleton.sizes(like))
        start = uniform_removal(skeleton, budget).to(like) if cfg.prune else torch.zeros_like(self.sizes)
        self.ratios = nn.Parameter(start / self.sizes)
        self.gate_logits = nn.Parameter(like.new_tensor([-1.0, 1.0]).repeat(depth, len(GATES), 1))
        on = {"both": GATES, "block": ("block",), "halves": ("attn", "mlp"), "none": ()}[cfg.skip]
        self.register_buffer("gate_enabled", torch.tensor([g in on for g in GATES], device=like.device))
        self.register_buffer("y", torch.full((depth, 3), cfg.y_init, device=like.device, dtype=like.dtype))
        self.register_buffer("z", like.new_tensor(cfg.z_init))
        self.register_buffer("step_count", torch.tensor(0, device=like.device))
        # Recomputed from the weights at every mark_groups, so not saved.
        self.register_buffer("phi", torch.zeros_like(self.y), persistent=False)
        self.register_buffer("next_norm", torch.zeros_like(self.y), persistent=False)
        self.gate_optimizer = torch.optim.SGD([self.gate_logits], lr=cfg.gate_lr, momentum=cfg.gate_momentum)

    # ---- decisions -------------------------------------------------------------------------
    def removed(self) -> torch.Tensor:
        """[L, 3] integer removal counts (straight-through rounding, so dR/dratio flows)."""
        return ste_round(self.ratios * self.sizes)

    def keep_probs(self) -> torch.Tensor:
        """[L, 3] probability that the block / attention half / MLP half is kept (1 where gating is off)."""
        p = F.softmax(self.gate_logits, dim=-1)[..., 1]
        return torch.where(self.gate_enabled, p, torch.ones_like(p))

    def hard_keep(self) -> torch.Tensor:
        keep = (self.gate_logits[..., 1] >= self.gate_logits[..., 0]).to(self.gate_logits.dtype)
        return torch.where(self.gate_enabled, keep, torch.ones_like(keep))

    @staticmethod
    def _halves(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A half runs if its block and the half itself are kept."""
        return keep[:, 0] * keep[:, 1], keep[:, 0] * keep[:, 2]

    def resource(self, hard: bool = False) -> torch.Tensor:
        """R = MACs / dense MACs, expected under the gate probabilities (or at the hard decisions)."""
        attn, mlp = self._halves(self.hard_keep() if hard else self.keep_probs())
        return self.skel.ratio(self.removed(), attn, mlp)

    # ---- 1. masks and gate samples ---------------------------------------------------------
    @torch.no_grad()
    def mark_groups(self) -> None:
        """Mask the least important groups by the current counts; record Phi and the next group's norm."""
        counts = self.removed().detach().long()
        for l, block in enumerate(self._blocks):
            norms = group_norms(block)
            nh, nd, nm = counts[l].tolist()
            block.apply_masks(*keep_masks(norms, nh, nd, nm))
            # The j-th entry of each row: the j-th group of that kind to be removed (a dimension slot
            # sums each head's j-th smallest dimension, since every head drops its own).
            ordered = [norms.heads.sort().values, norms.dims.sort(dim=1).values.sum(0), norms.neurons.sort().values]
            totals = torch.stack([o.sum() for o in ordered]).clamp(min=1e-12)
            self.phi[l] = torch.stack([o[:n].sum() for o, n in zip(ordered, (nh, nd, nm))]) / totals
            self.next_norm[l] = torch.stack([F.pad(o, (0, 1))[n] for o, n in zip(ordered, (nh, nd, nm))]) / totals

    def sample_gates(self, training: bool) -> None:
        """Straight-through Gumbel-softmax samples while training, hard decisions otherwise."""
        if training:
            sample = F.gumbel_softmax(self.gate_logits, tau=self.cfg.gate_tau, hard=True)[..., 1]
            keep = torch.where(self.gate_enabled, sample, torch.ones_like(sample))
        else:
            keep = self.hard_keep()
        attn, mlp = self._halves(keep)
        for l, block in enumerate(self._blocks):
            block.attn_keep, block.mlp_keep = (attn[l], mlp[l]) if training else (float(attn[l]), float(mlp[l]))

    # ---- 3. proximal shrink ----------------------------------------------------------------
    @torch.no_grad()
    def proximal_shrink(self, lr: float) -> None:
        """W_group /= (1 + 2 lr y) for every group marked for removal."""
        factors = 1.0 / (1.0 + 2.0 * lr * self.y)  # [L, 3]: heads, dimensions, neurons
        for l, block in enumerate(self._blocks):
            weight = block.attn.qkv.weight
            f_head, f_dim, f_neuron = factors[l].to(weight.dtype)
            one = weight.new_ones(())
            factor = torch.where(block.head_mask[:, None] == 0, f_head, one) * torch.where(block.dim_mask == 0, f_dim, one)
            if bool((factor < 1).any()):
                heads, head_dim = factor.shape
                qkv, proj = block.attn.qkv, block.attn.proj
                qkv.weight.view(3, heads, head_dim, -1).mul_(factor[None, :, :, None])
                if qkv.bias is not None:
                    qkv.bias.view(3, heads, head_dim).mul_(factor[None])
                proj.weight.view(proj.out_features, heads, head_dim).mul_(factor[None])
            f_n = torch.where(block.neuron_mask == 0, f_neuron, one)
            block.mlp.fc1.weight.mul_(f_n[:, None])
            if block.mlp.fc1.bias is not None:
                block.mlp.fc1.bias.mul_(f_n)
            block.mlp.fc2.weight.mul_(f_n[None, :])

    # ---- 4. gate step ----------------------------------------------------------------------
    def gate_step(self) -> None:
        """Add the budget's pull to the task gradient already in `gate_logits.grad`; step every `gate_accumulate`."""
        (d_logits,) = torch.autograd.grad(self.resource(), [self.gate_logits])
        if self.gate_logits.grad is None:
            self.gate_logits.grad = torch.zeros_like(self.gate_logits)
        self.gate_logits.grad.add_(self.z * self.cfg.gate_budget_weight * d_logits)
        self.step_count += 1
        if int(self.step_count) % self.cfg.gate_accumulate == 0:
            self.gate_logits.grad.mul_(self.gate_enabled[None, :, None] / self.cfg.gate_accumulate)
            self.gate_optimizer.step()
            self.gate_optimizer.zero_grad(set_to_none=False)

    # ---- 5. ratio step ---------------------------------------------------------------------
    def ratio_step(self) -> None:
        """Projected step on y * dPhi + z * dR; dPhi/dcount is the norm of the next group in line."""
        if not self.cfg.prune:
            return
        (d_ratio,) = torch.autograd.grad(self.resource(), [self.ratios])
        with torch.no_grad():
            grad = self.y * self.sizes * self.next_norm + self.z * d_ratio
            grad = grad / grad.abs().max().clamp(min=1e-12)  # a direction: the largest entry moves by ratio_lr
            upper = (self.sizes - 1) / self.sizes
            self.ratios.copy_(torch.minimum(torch.clamp(self.ratios - self.cfg.ratio_lr * grad, min=0.0), upper))

    # ---- 6. dual step ----------------------------------------------------------------------
    @torch.no_grad()
    def dual_step(self) -> None:
        """Gradient ascent on the duals, projected on >= 0.

        z follows the architecture that would be delivered now (hard gates, integer counts); the
        expected R under the gate probabilities only shapes the primal gradients.
        """
        cfg = self.cfg
        if cfg.prune:
            self.y.add_(cfg.y_lr * self.phi).clamp_(min=0.0)
        step = torch.clamp(self.resource(hard=True) - self.budget, -cfg.z_step_clip, cfg.z_step_clip)
        self.z.add_(cfg.z_lr * step).clamp_(min=0.0)

    def figures(self) -> dict:
        """What the log and report.png show of the search."""
        with torch.no_grad():
            return {"R": float(self.resource()), "R_hard": float(self.resource(hard=True)), "z": float(self.z),
                    "y": float(self.y.mean())}

    # ---- the end of the search -------------------------------------------------------------
    @torch.no_grad()
    def final_plan(self, tolerance: float = 0.01) -> list[LayerPlan]:
        """Hard gates, counts fitted to B - tolerance <= R <= B, and the plan that slimming removes.

        With pruning off, the budget is first met by skipping more (the kept gate whose keep logit
        wins by the smallest margin flips, until R <= B). Whatever the mode, when the skips leave R
        below the window, the skipped gate closest to being kept is restored and width is removed
        to land in the window: halves are too coarse to hit it alone, so the last fraction is width.
        """
        if not self.cfg.prune:
            while float(self.resource(hard=True)) > self.budget and self._flip_closest(skipped=False):
                pass
        norms = [group_norms(b) for b in self._blocks]
        costs, removed = removal_costs(norms), self.removed().detach()
        while True:
            attn, mlp = self._halves(self.hard_keep())
            removed = fit_to_budget(self.skel, removed, attn, mlp, costs, self.budget, tolerance,
                                    self.cfg.width_multiple)
            if float(self.skel.ratio(removed, attn, mlp)) >= self.budget - tolerance or not self._flip_closest(skipped=True):
                break
        self.ratios.copy_(removed / self.sizes)
        return plan_of_counts(norms, removed, attn, mlp)

    def _flip_closest(self, skipped: bool) -> bool:
        """Flip the enabled gate closest to the other decision (a kept one to skip, or a skipped one to keep)."""
        margin = self.gate_logits[..., 1] - self.gate_logits[..., 0]  # > 0: kept
        side = (margin < 0) if skipped else (margin >= 0)
        distance = torch.where(self.gate_enabled & side, margin.abs(), torch.inf)
        if torch.isinf(distance).all():
            return False
        l, g = divmod(int(distance.argmin()), len(GATES))
        self.gate_logits[l, g] = self.gate_logits[l, g].flip(0)
        return True

    def search_state(self) -> dict:
        """Everything a resumed search needs, including gate gradients accumulated so far."""
        return {"module": self.state_dict(), "gate_optimizer": self.gate_optimizer.state_dict(),
                "gate_grad": self.gate_logits.grad}

    def load_search_state(self, state: dict) -> None:
        self.load_state_dict(state["module"])
        self.gate_optimizer.load_state_dict(state["gate_optimizer"])
        grad = state["gate_grad"]
        self.gate_logits.grad = None if grad is None else grad.to(self.gate_logits)


__all__ = ["SearchConfig", "Search", "ste_round", "SKIP_MODES"]
