"""`uvc.macs(model)`: the resource model applied to a dense, masked or slimmed network.

The formulas live in `resource.py`; this module reads the shapes off a model through its adapter.
"""
from __future__ import annotations

from torch import nn

from .adapters import adapter_for
from .resource import BlockShape, Skeleton, shape_macs


def block_shape(block: nn.Module) -> BlockShape:
    """The shape of a timm Block, GatedBlock or SlimBlock (the last two know their own)."""
    if hasattr(block, "shape"):
        return block.shape()
    attn, mlp = block.attn, block.mlp
    return BlockShape(dim=attn.qkv.in_features, heads=attn.num_heads, head_dim=attn.head_dim,
                      hidden=mlp.fc1.out_features)


def _input_size(model: nn.Module, input_size) -> tuple[int, int, int]:
    return tuple(input_size or adapter_for(model).input_size(model))


def macs(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> int:
    """Multiply-accumulates of one forward pass of one image, for a dense, gated or slimmed ViT."""
    adapter = adapter_for(model)
    input_size = _input_size(model, input_size)
    tokens = adapter.tokens(model, input_size)
    total = adapter.fixed_macs(model, input_size)
    total += sum(shape_macs(tokens, block_shape(b)) for b in adapter.blocks(model))
    return int(round(total))


def skeleton_of(model: nn.Module, input_size: tuple[int, int, int] | None = None) -> Skeleton:
    """The Skeleton of a dense or gated model (its blocks' full widths)."""
    adapter = adapter_for(model)
    input_size = _input_size(model, input_size)
    blocks = list(adapter.blocks(model))
    return Skeleton(tokens=adapter.tokens(model, input_size), dim=[b.attn.qkv.in_features for b in blocks],
                    heads=[b.attn.num_heads for b in blocks], head_dim=[b.attn.head_dim for b in blocks],
                    hidden=[b.mlp.fc1.out_features for b in blocks], fixed=adapter.fixed_macs(model, input_size))
