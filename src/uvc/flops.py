"""The resource model: multiply-accumulates of a ViT as a function of what is pruned and skipped.

One formula serves three callers: the search (continuous counts and skip probabilities as tensors,
so R is differentiable), the final budget check on hard decisions, and `macs(model)` on a dense or
slimmed network. Conventions follow fvcore and the ViT papers (DeiT-Tiny at 224 px: ~1.26 G):
linear layers, the patch-embedding conv and the two attention matmuls count; norms, softmax and
activations do not.
"""
from __future__ import annotations

from torch import nn

from .models import adapter_for


def attention_macs(tokens, dim, width):
    """qkv projection + scores and weighted sum (q k^T, A v) + output projection.

    `width` = kept heads x kept head dimensions; all arguments may be tensors.
    """
    return tokens * dim * 3 * width + 2 * tokens * tokens * width + tokens * width * dim


def mlp_macs(tokens, dim, hidden):
    return 2 * tokens * dim * hidden


def block_macs(tokens, dim, width, hidden, attn_keep=1.0, mlp_keep=1.0):
    """One block; `*_keep` = 1 - skip probability (0 or 1 for hard decisions)."""
    return attn_keep * attention_macs(tokens, dim, width) + mlp_keep * mlp_macs(tokens, dim, hidden)


def block_shape(block: nn.Module):
    """The shape of a timm Block, GatedBlock or SlimBlock (each knows its own)."""
    from .gates import BlockShape

    if hasattr(block, "shape"):
        return block.shape()
    attn, mlp = block.attn, block.mlp
    return BlockShape(dim=attn.qkv.in_features, heads=attn.num_heads, attn_width=attn.num_heads * attn.head_dim,
                      hidden=mlp.fc1.out_features)


def macs(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> int:
    """Multiply-accumulates of one forward pass of one image, for a dense, gated or slimmed ViT."""
    adapter = adapter_for(model)
    input_size = tuple(input_size or adapter.input_size(model))
    tokens = adapter.tokens(model, input_size)
    total = adapter.fixed_macs(model, input_size)
    for block in adapter.blocks(model):
        s = block_shape(block)
        total += block_macs(tokens, s.dim, s.attn_width, s.hidden, float(s.attn and s.heads > 0),
                            float(s.mlp and s.hidden > 0))
    return int(round(total))

