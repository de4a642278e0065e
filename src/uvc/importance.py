"""Group importance: which heads, head dimensions and neurons matter least, for every method alike.

A group's importance is the squared L2 norm of the weights that read it: the columns of the
attention output projection for heads and head dimensions, the columns of fc2 for MLP neurons. A
group whose columns are near zero adds almost nothing to the residual stream, so removing it costs
little. The search, the uniform baseline and one-shot pruning all rank groups with `group_norms`
and keep groups with `keep_masks`, so they agree on what "the least important" means.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class GroupNorms:
    """Squared column norms of one block: per head dimension [H, d] and per neuron [M]."""

    dims: torch.Tensor
    neurons: torch.Tensor

    @property
    def heads(self) -> torch.Tensor:
        """[H] a head's importance is the sum over its dimensions."""
        return self.dims.sum(1)


@torch.no_grad()
def group_norms(block: nn.Module) -> GroupNorms:
    """Importance of every group of a timm-style block (dense, gated or not), in float32 or the weights' dtype."""
    attn = block.attn
    dims = attn.proj.weight.detach().pow(2).sum(0).view(attn.num_heads, attn.head_dim)
    return GroupNorms(dims=dims, neurons=block.mlp.fc2.weight.detach().pow(2).sum(0))


def keep_masks(norms: GroupNorms, removed_heads: int, removed_dims: int, removed_neurons: int):
    """Boolean keep masks: heads [H], dimensions [H, d], neurons [M], removing the least important of each kind.

    Every head keeps its own most important `d - removed_dims` dimensions, so all kept heads have one width.
    """
    head_keep = torch.ones_like(norms.heads, dtype=torch.bool)
    head_keep[norms.heads.argsort()[:removed_heads]] = False
    dim_keep = torch.ones_like(norms.dims, dtype=torch.bool)
    dim_keep.scatter_(1, norms.dims.argsort(dim=1)[:, :removed_dims], False)
    neuron_keep = torch.ones_like(norms.neurons, dtype=torch.bool)
    neuron_keep[norms.neurons.argsort()[:removed_neurons]] = False
    return head_keep, dim_keep, neuron_keep
