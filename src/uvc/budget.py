"""Budget arithmetic on hard decisions: validating a budget, a uniform start, and the final fit.

The search ends near the budget; `fit_to_budget` makes it exact: it removes the groups that cost
the least importance per MAC saved until R <= B, then gives back the most important groups that
still fit, so the delivered model lands in [B - tolerance, B] as measured by `uvc.macs`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import UVCError
from .flops import block_macs

@dataclass
class Skeleton:
    """Sizes that fix the MACs of a ViT: token count, widths per block, MACs outside the blocks."""

    tokens: int
    dim: list[int]
    heads: list[int]
    head_dim: list[int]
    hidden: list[int]
    fixed: int

    @property
    def depth(self) -> int:
        return len(self.heads)

    def sizes(self) -> torch.Tensor:
        """[L, 3] number of groups of each kind per block."""
        return torch.tensor([[h, d, m] for h, d, m in zip(self.heads, self.head_dim, self.hidden)], dtype=torch.float)

    def dense_macs(self) -> float:
        return self.macs(torch.zeros(self.depth, 3), torch.ones(self.depth), torch.ones(self.depth))

    def macs(self, removed, attn_keep, mlp_keep):
        """MACs with `removed[l] = (heads, dims per head, neurons)` gone; tensors flow gradients."""
        sizes = self.sizes()
        kept = sizes - removed
        width = kept[:, 0] * kept[:, 1]
        total = self.fixed
        for l in range(self.depth):
            total = total + block_macs(self.tokens, self.dim[l], width[l], kept[l, 2], attn_keep[l], mlp_keep[l])
        return total


def skeleton_of(model, input_size=None) -> Skeleton:
    """The Skeleton of a dense or gated model (its blocks' full widths)."""
    from .models import adapter_for

    adapter = adapter_for(model)
    input_size = tuple(input_size or adapter.input_size(model))
    blocks = list(adapter.blocks(model))
    return Skeleton(tokens=adapter.tokens(model, input_size), dim=[b.attn.qkv.in_features for b in blocks],
                    heads=[b.attn.num_heads for b in blocks], head_dim=[b.attn.head_dim for b in blocks],
                    hidden=[b.mlp.fc1.out_features for b in blocks], fixed=adapter.fixed_macs(model, input_size))


def smallest_ratio(skel: Skeleton, prune: bool, skip: bool) -> float:
    """The lowest R reachable: everything skipped, or one head of width one and one neuron per block."""
    if skip:
        return skel.fixed / skel.dense_macs()
    if not prune:
        return 1.0
    removed = skel.sizes() - 1
    ones = torch.ones(skel.depth)
    return float(skel.macs(removed, ones, ones)) / skel.dense_macs()


def check_budget(budget: float, skel: Skeleton, prune: bool, skip: bool) -> None:
    if not isinstance(budget, (int, float)) or math.isnan(budget) or not 0 < budget <= 1:
        raise UVCError(f"budget {budget} is outside (0, 1]; it is the fraction of the dense model's MACs to keep, e.g. 0.5")
    low = smallest_ratio(skel, prune, skip)
    if budget < low:
        what = "pruning and skipping" if prune and skip else "pruning alone" if prune else "skipping alone" if skip else "nothing (pruning and skipping both off)"
        raise UVCError(f"budget {budget} is below the smallest model reachable with {what} (R = {low:.4f}); "
                       f"ask for at least {math.ceil(low * 1000) / 1000}")


def uniform_removal(skel: Skeleton, budget: float) -> torch.Tensor:
    """[L, 3] removal counts keeping the same fraction of head dims and neurons in every block, R <= budget."""
    sizes, ones = skel.sizes(), torch.ones(skel.depth)

    def removed_at(keep: float) -> torch.Tensor:
        removed = torch.zeros_like(sizes)
        removed[:, 1] = sizes[:, 1] - torch.clamp(torch.ceil(sizes[:, 1] * keep), min=1)
        removed[:, 2] = sizes[:, 2] - torch.clamp(torch.ceil(sizes[:, 2] * keep), min=1)
        return removed

    dense = skel.dense_macs()
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if float(skel.macs(removed_at(mid), ones, ones)) / dense <= budget:
            lo = mid
        else:
            hi = mid
    return removed_at(lo)


def fit_to_budget(skel: Skeleton, removed: torch.Tensor, attn: torch.Tensor, mlp: torch.Tensor,
                  costs: list[list[torch.Tensor]], budget: float, tolerance: float = 0.01) -> torch.Tensor:
    """Adjust integer removal counts so that B - tolerance <= R <= B.

    `costs[l][k]` holds the importance of each group of kind k in block l, sorted ascending (the
    order in which they are removed). Removing takes the group with the least importance per MAC
    saved; giving back takes the group with the most importance per MAC added that still fits.
    """
    removed = removed.clone()
    dense = skel.dense_macs()
    sizes = skel.sizes()

    def ratio(r):
        return float(skel.macs(r, attn, mlp)) / dense

    def candidates(direction: int):
        current = ratio(removed)
        for l in range(skel.depth):
            for k in range(3):
                n = int(removed[l, k]) + (direction > 0)
                if direction > 0 and n > sizes[l, k] - 1 or direction < 0 and n < 1:
                    continue
                trial = removed.clone()
                trial[l, k] += direction
                delta = abs(ratio(trial) - current)
                if delta == 0:
                    continue
                yield float(costs[l][k][n - 1]) / delta, l, k, trial

    while ratio(removed) > budget:
        options = list(candidates(+1))
        if not options:
            raise UVCError(f"cannot reach budget {budget}: the smallest model with these skip decisions has R = {ratio(removed):.4f}")
        removed = min(options, key=lambda o: o[0])[3]
    while ratio(removed) < budget - tolerance / 4:
        options = [o for o in candidates(-1) if ratio(o[3]) <= budget]
        if not options:
            break
        removed = max(options, key=lambda o: o[0])[3]
    return removed
