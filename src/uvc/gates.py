"""The compressible view: masks over heads, head dimensions and MLP neurons, and skip gates.

`make_compressible(model)` swaps each timm `Block` for a `GatedBlock` that shares its parameters
(state-dict keys do not change) and multiplies:
- q, k and v of head h, dimension j by `head_mask[h] * dim_mask[h, j]`,
- the MLP hidden units by `neuron_mask`,
- the attention and MLP residual branches by `attn_keep` / `mlp_keep` (1 - skip probability).
With every mask at 1 the block computes what the timm block computes. A plan (`LayerPlan` per
block) is the hard, integer form of the masks; `uvc.slim` turns it into a smaller dense network.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UVCError
from .models import check_supported

BRANCH_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


@dataclass
class BlockShape:
    """What the FLOPs model needs of one block: widths that remain and which halves run."""

    dim: int
    heads: int
    attn_width: int  # kept heads x kept dimensions per head (q, k and v each)
    hidden: int
    attn: bool = True
    mlp: bool = True


@dataclass
class LayerPlan:
    """One block's hard decisions, in the original model's numbering."""

    heads: list[int]
    dims: list[list[int]]  # kept dimensions of each kept head, same order as `heads`
    neurons: list[int]
    attn: bool = True
    mlp: bool = True

    @property
    def counts(self) -> dict:
        """How much of the block stays: the summary reports and plots show."""
        return {"heads": len(self.heads), "head_dim": len(self.dims[0]) if self.dims else 0,
                "neurons": len(self.neurons), "attn": self.attn, "mlp": self.mlp}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LayerPlan":
        return cls(**{k: d[k] for k in ("heads", "dims", "neurons", "attn", "mlp")})


def _hard(value) -> bool:
    """A gate value as a hard keep/skip decision; soft values are a caller's mistake here."""
    v = float(value)
    if v not in (0.0, 1.0):
        raise UVCError(f"a skip gate is soft ({v:.3f}); harden the gates before slimming or planning")
    return v == 1.0


class GatedBlock(nn.Module):
    """A timm pre-norm Block whose heads, head dimensions, neurons and halves can be masked."""

    def __init__(self, block: nn.Module):
        super().__init__()
        for name in BRANCH_PARTS:
            setattr(self, name, getattr(block, name))
        heads, head_dim = self.attn.num_heads, self.attn.head_dim
        self.register_buffer("head_mask", torch.ones(heads), persistent=False)
        self.register_buffer("dim_mask", torch.ones(heads, head_dim), persistent=False)
        self.register_buffer("neuron_mask", torch.ones(self.mlp.fc1.out_features), persistent=False)
        self.attn_keep: float | torch.Tensor = 1.0
        self.mlp_keep: float | torch.Tensor = 1.0

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        b, n, _ = x.shape
        qkv = a.qkv(x).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        keep = (self.head_mask[:, None] * self.dim_mask)[None, :, None, :]
        q, k, v = (t * keep for t in qkv.unbind(0))
        if a.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=a.attn_drop.p if self.training else 0.0, scale=a.scale)
        else:
            weights = a.attn_drop(((q * a.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
            out = weights @ v
        return a.proj_drop(a.proj(out.transpose(1, 2).reshape(b, n, -1)))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mlp
        hidden = m.drop1(m.act(m.fc1(x))) * self.neuron_mask
        return m.drop2(m.fc2(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (isinstance(self.attn_keep, float) and self.attn_keep == 0.0):
            x = x + self.drop_path1(self.ls1(self.attention(self.norm1(x)))) * self.attn_keep
        if not (isinstance(self.mlp_keep, float) and self.mlp_keep == 0.0):
            x = x + self.drop_path2(self.ls2(self.feed_forward(self.norm2(x)))) * self.mlp_keep
        return x

    def shape(self) -> BlockShape:
        """The hard shape the masks describe (gates must be hard)."""
        kept = self.dim_mask * self.head_mask[:, None]
        return BlockShape(dim=self.attn.qkv.in_features, heads=int((kept.sum(1) > 0).sum()),
                          attn_width=int(kept.sum()), hidden=int(self.neuron_mask.sum()),
                          attn=_hard(self.attn_keep), mlp=_hard(self.mlp_keep))

    def plan(self) -> LayerPlan:
        kept = self.dim_mask * self.head_mask[:, None]
        heads = [h for h in range(kept.shape[0]) if kept[h].sum() > 0]
        dims = [torch.nonzero(kept[h]).flatten().tolist() for h in heads]
        neurons = torch.nonzero(self.neuron_mask).flatten().tolist()
        attn, mlp = _hard(self.attn_keep) and bool(heads), _hard(self.mlp_keep) and bool(neurons)
        return LayerPlan(heads if attn else [], dims if attn else [], neurons if mlp else [], attn, mlp)

    def apply_plan(self, plan: LayerPlan) -> None:
        heads, head_dim = self.dim_mask.shape
        if any(not 0 <= h < heads for h in plan.heads) or len(plan.dims) != len(plan.heads) \
                or any(not 0 <= j < head_dim for d in plan.dims for j in d) \
                or any(not 0 <= i < self.neuron_mask.numel() for i in plan.neurons):
            raise UVCError("a layer plan names heads, dimensions or neurons this block does not have")
        self.head_mask.zero_()
        self.dim_mask.zero_()
        self.neuron_mask.zero_()
        for h, dims in zip(plan.heads, plan.dims):
            self.head_mask[h] = 1.0
            self.dim_mask[h, dims] = 1.0
        self.neuron_mask[plan.neurons] = 1.0
        self.attn_keep = 1.0 if plan.attn and plan.heads else 0.0
        self.mlp_keep = 1.0 if plan.mlp and plan.neurons else 0.0


def make_compressible(model: nn.Module) -> nn.Module:
    """Wrap every block of a supported ViT in a GatedBlock, in place; returns the model."""
    from .models import adapter_for

    if all(isinstance(b, GatedBlock) for b in adapter_for(model).blocks(model)):
        return model
    adapter = check_supported(model)
    adapter.set_blocks(model, nn.Sequential(*[GatedBlock(b) for b in adapter.blocks(model)]))
    return model


def gated_blocks(model: nn.Module) -> list[GatedBlock]:
    from .models import adapter_for

    blocks = list(adapter_for(model).blocks(model))
    if not all(isinstance(b, GatedBlock) for b in blocks):
        raise UVCError("the model is not in its compressible form; call uvc.make_compressible(model) first")
    return blocks


def get_plan(model: nn.Module) -> list[LayerPlan]:
    return [b.plan() for b in gated_blocks(model)]


def set_plan(model: nn.Module, plan: list[LayerPlan]) -> None:
    blocks = gated_blocks(model)
    if len(plan) != len(blocks):
        raise UVCError(f"the plan has {len(plan)} layers but the model has {len(blocks)} blocks")
    for block, layer in zip(blocks, plan):
        block.apply_plan(layer)


def random_plan(model: nn.Module, generator: torch.Generator, skip_prob: float = 0.15) -> list[LayerPlan]:
    """A random but valid plan (one head width per layer), for testing the FLOPs model and slimming."""
    from .models import adapter_for

    def pick(n: int, k: int) -> list[int]:
        return sorted(torch.randperm(n, generator=generator)[:k].tolist())

    def randint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=generator))

    plans = []
    for block in adapter_for(model).blocks(model):
        heads, head_dim = block.attn.num_heads, block.attn.head_dim
        hidden = block.mlp.fc1.out_features
        kept_heads, width = pick(heads, randint(1, heads)), randint(1, head_dim)
        skip_block = float(torch.rand(1, generator=generator)) < skip_prob / 2
        plans.append(LayerPlan(
            heads=kept_heads, dims=[pick(head_dim, width) for _ in kept_heads], neurons=pick(hidden, randint(1, hidden)),
            attn=not skip_block and float(torch.rand(1, generator=generator)) >= skip_prob,
            mlp=not skip_block and float(torch.rand(1, generator=generator)) >= skip_prob,
        ))
    return plans
