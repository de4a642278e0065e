"""The compressible view: masks over heads, head dimensions and MLP neurons, and skip gates.

`make_compressible(model)` swaps each timm `Block` for a `GatedBlock` that shares its parameters
(state-dict keys do not change) and multiplies:
- q, k and v of head h, dimension j by `head_mask[h] * dim_mask[h, j]`,
- the MLP hidden units by `neuron_mask`,
- the attention and MLP residual branches by `attn_keep` / `mlp_keep`.
With every mask at 1 the block computes what the timm block computes. The masks are buffers on the
block's own device and in its dtype. A plan (`LayerPlan` per block) is their hard, integer form.
During the search a group marked for removal can sit at a value between 0 and 1 (it fades out), and
`probes` can replace the masks by leaf tensors of the same values, whose gradients are the loss's
sensitivity to each group (the search's importance).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import adapter_for, check_supported
from .errors import UVCError
from .plan import LayerPlan
from .resource import BlockShape

BRANCH_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


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
        like = dict(device=self.attn.qkv.weight.device, dtype=self.attn.qkv.weight.dtype)
        self.register_buffer("head_mask", torch.ones(heads, **like), persistent=False)
        self.register_buffer("dim_mask", torch.ones(heads, head_dim, **like), persistent=False)
        self.register_buffer("neuron_mask", torch.ones(self.mlp.fc1.out_features, **like), persistent=False)
        self.attn_keep: float | torch.Tensor = 1.0
        self.mlp_keep: float | torch.Tensor = 1.0
        # (attention mask [H, d], neuron mask [M]) as leaf tensors whose .grad the search reads; None: the buffers.
        self.probes: tuple[torch.Tensor, torch.Tensor] | None = None

    def attention_mask(self) -> torch.Tensor:
        """[H, d]: what multiplies q, k and v of each head dimension."""
        return self.probes[0] if self.probes is not None else self.head_mask[:, None] * self.dim_mask

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        b, n, _ = x.shape
        qkv = a.qkv(x).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d)
        keep = self.attention_mask()[None, :, None, :].to(qkv.dtype)
        q, k, v = (t * keep for t in qkv.unbind(0))
        if a.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=a.attn_drop.p if self.training else 0.0, scale=a.scale)
        else:
            weights = a.attn_drop(((q * a.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
            out = weights @ v
        return a.proj_drop(a.proj(out.transpose(1, 2).reshape(b, n, -1)))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mlp
        hidden = m.drop1(m.act(m.fc1(x)))
        neuron_mask = self.probes[1] if self.probes is not None else self.neuron_mask
        return m.drop2(m.fc2(hidden * neuron_mask.to(hidden.dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (isinstance(self.attn_keep, float) and self.attn_keep == 0.0):
            x = x + self.drop_path1(self.ls1(self.attention(self.norm1(x)))) * self.attn_keep
        if not (isinstance(self.mlp_keep, float) and self.mlp_keep == 0.0):
            x = x + self.drop_path2(self.ls2(self.feed_forward(self.norm2(x)))) * self.mlp_keep
        return x

    def plan(self) -> LayerPlan:
        """The hard decisions the masks and gates describe (gates must be hard)."""
        return LayerPlan.from_masks(self.head_mask, self.dim_mask, self.neuron_mask,
                                    _hard(self.attn_keep), _hard(self.mlp_keep))

    def shape(self) -> BlockShape:
        return self.plan().shape(self.attn.qkv.in_features)

    @torch.no_grad()
    def apply_masks(self, head_keep: torch.Tensor, dim_keep: torch.Tensor, neuron_keep: torch.Tensor,
                    fade: float = 0.0) -> None:
        """Set the masks from boolean keep masks: heads [H], dimensions [H, d], neurons [M]; the groups
        not kept take the value `fade` (0: removed)."""
        for mask, keep in ((self.head_mask, head_keep), (self.dim_mask, dim_keep), (self.neuron_mask, neuron_keep)):
            mask.copy_(torch.where(keep.bool(), 1.0, fade))

    def apply_plan(self, plan: LayerPlan) -> None:
        heads, head_dim = self.dim_mask.shape
        if any(not 0 <= h < heads for h in plan.heads) or len(plan.dims) != len(plan.heads) \
                or any(not 0 <= j < head_dim for d in plan.dims for j in d) \
                or any(not 0 <= i < self.neuron_mask.numel() for i in plan.neurons):
            raise UVCError("a layer plan names heads, dimensions or neurons this block does not have")
        head_keep = torch.zeros_like(self.head_mask, dtype=torch.bool)
        dim_keep = torch.zeros_like(self.dim_mask, dtype=torch.bool)
        neuron_keep = torch.zeros_like(self.neuron_mask, dtype=torch.bool)
        for h, dims in zip(plan.heads, plan.dims):
            head_keep[h] = True
            dim_keep[h, dims] = True
        neuron_keep[plan.neurons] = True
        self.apply_masks(head_keep, dim_keep, neuron_keep)
        self.attn_keep = 1.0 if plan.attn and plan.heads else 0.0
        self.mlp_keep = 1.0 if plan.mlp and plan.neurons else 0.0


def make_compressible(model: nn.Module) -> nn.Module:
    """Wrap every block of a supported ViT in a GatedBlock, in place; returns the model."""
    if all(isinstance(b, GatedBlock) for b in adapter_for(model).blocks(model)):
        return model
    adapter = check_supported(model)
    adapter.set_blocks(model, nn.Sequential(*[GatedBlock(b) for b in adapter.blocks(model)]))
    return model


def gated_blocks(model: nn.Module) -> list[GatedBlock]:
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
