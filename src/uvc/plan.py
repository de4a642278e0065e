"""A plan: which heads, head dimensions and neurons of each block stay, and which halves still run.

The plan is the hard outcome of any method (the search, the uniform baseline, one-shot pruning) in
the original model's numbering; `uvc.slim(model, plan)` cuts everything else out. Its counts are a
`BlockShape`, the shape the resource model prices.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .errors import UVCError
from .resource import BlockShape


@dataclass
class LayerPlan:
    """One block's hard decisions: kept heads, the kept dimensions of each, kept neurons, running halves."""

    heads: list[int]
    dims: list[list[int]]  # kept dimensions of each kept head, same order as `heads`
    neurons: list[int]
    attn: bool = True
    mlp: bool = True

    @property
    def head_dim(self) -> int:
        """The one width every kept head has (0 without heads); slimming refuses uneven widths."""
        widths = {len(d) for d in self.dims}
        if len(widths) > 1:
            raise UVCError(f"kept heads have different widths {sorted(widths)}; slimming needs one head width per layer")
        return widths.pop() if widths else 0

    def shape(self, dim: int) -> BlockShape:
        """What remains of the block, for a residual stream of width `dim`."""
        return BlockShape(dim=dim, heads=len(self.heads), head_dim=self.head_dim, hidden=len(self.neurons),
                          attn=self.attn and bool(self.heads), mlp=self.mlp and bool(self.neurons))

    @classmethod
    def from_masks(cls, head_keep: torch.Tensor, dim_keep: torch.Tensor, neuron_keep: torch.Tensor,
                   attn: bool = True, mlp: bool = True) -> "LayerPlan":
        """The plan of boolean keep masks: heads [H], dimensions [H, d], neurons [M]."""
        kept = dim_keep.bool() & head_keep.bool()[:, None]
        heads = [h for h in range(kept.shape[0]) if bool(kept[h].any())]
        dims = [torch.nonzero(kept[h]).flatten().tolist() for h in heads]
        neurons = torch.nonzero(neuron_keep.bool()).flatten().tolist()
        attn, mlp = attn and bool(heads), mlp and bool(neurons)
        return cls(heads if attn else [], dims if attn else [], neurons if mlp else [], attn, mlp)

    def attention_columns(self, head_dim: int) -> list[int]:
        """The kept head dimensions as indices into the dense heads x head_dim layout (rows of q, k and v;
        columns of the output projection), in the order slimming keeps them."""
        return [h * head_dim + j for h, dims in zip(self.heads, self.dims) for j in dims]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LayerPlan":
        return cls(**{k: d[k] for k in ("heads", "dims", "neurons", "attn", "mlp")})
