"""`uvc.macs(model)`: the resource model applied to a dense, masked or slimmed network.

The formulas live in `resource.py`; this module reads the shapes off a model through its adapter.
`count` measures a built model in any of the resources a budget can name.
"""
from __future__ import annotations

from torch import nn

from .adapters import adapter_for
from .errors import UVCError
from .models import param_count
from .resource import RESOURCES, BlockParams, BlockShape, LatencyModel, Skeleton, shape_macs


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


def count(model: nn.Module, resource: str = "macs", input_size: tuple[int, int, int] | None = None) -> int:
    """The model's total in MACs or parameters: what a budget in it is checked against. (Latency is measured:
    a plan's share of it comes from the table, `budget.plan_ratio`, a built model's from a timing.)"""
    check_resource(resource)
    if resource == "latency":
        raise UVCError("latency is not counted off a model: time it (uvc.latency.measured_ratio) or price its plan "
                       "with a latency table (uvc.budget.plan_ratio)")
    return macs(model, input_size) if resource == "macs" else param_count(model)


def check_resource(resource: str) -> None:
    """A misspelt resource is one line naming the choices, before any model is measured."""
    if resource not in RESOURCES:
        raise UVCError(f"resource {resource!r} is not one of {', '.join(RESOURCES)} (what the budget is a fraction of)")


def block_params_layout(block: nn.Module) -> BlockParams:
    """A timm Block's or GatedBlock's biases and the parameters of each half that do not shrink."""
    attn, mlp = block.attn, block.mlp
    return BlockParams(qkv_bias=int(attn.qkv.bias is not None), proj_bias=int(attn.proj.bias is not None),
                       fc1_bias=int(mlp.fc1.bias is not None), fc2_bias=int(mlp.fc2.bias is not None),
                       attn_fixed=param_count(block.norm1) + param_count(block.ls1),
                       mlp_fixed=param_count(block.norm2) + param_count(block.ls2))


def skeleton_of(model: nn.Module, input_size: tuple[int, int, int] | None = None, resource: str = "macs",
                latency: LatencyModel | None = None) -> Skeleton:
    """The Skeleton of a dense or gated model (its blocks' full widths), its ratio measured in `resource`
    (`latency`: the model's measured table, `uvc.latency.latency_model`)."""
    check_resource(resource)
    adapter = adapter_for(model)
    input_size = _input_size(model, input_size)
    blocks = list(adapter.blocks(model))
    if resource == "latency" and (latency is None or len(latency.blocks) != len(blocks)):
        raise UVCError("a latency budget needs this model's latency table (uvc.latency.latency_model, or "
                       "CompressConfig.resource='latency', which builds it)")
    return Skeleton(tokens=adapter.tokens(model, input_size), dim=[b.attn.qkv.in_features for b in blocks],
                    heads=[b.attn.num_heads for b in blocks], head_dim=[b.attn.head_dim for b in blocks],
                    hidden=[b.mlp.fc1.out_features for b in blocks], fixed=adapter.fixed_macs(model, input_size),
                    layout=[block_params_layout(b) for b in blocks],
                    fixed_params=param_count(model) - sum(param_count(b) for b in blocks), resource=resource,
                    latency=latency)
