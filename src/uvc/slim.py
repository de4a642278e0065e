"""Physical slimming: masks and skip decisions become a smaller dense network.

A `SlimBlock` is a pre-norm transformer block with its own head count, head width and MLP width;
a skipped half is simply absent and a fully skipped block is dropped from the model. Attention
keeps the original model's softmax scale (not 1/sqrt of the new head width), so the slimmed model
computes exactly what the masked one did, and it still runs through fused attention.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from timm.layers import LayerScale, Mlp, use_fused_attn
from torch import nn

from .errors import UVCError
from .gates import BlockShape, GatedBlock, LayerPlan, set_plan
from .models import adapter_for


class SlimAttention(nn.Module):
    """Multi-head self-attention with `heads` heads of width `head_dim` and a fixed scale."""

    def __init__(self, dim: int, heads: int, head_dim: int, scale: float, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = heads, head_dim, scale
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(heads * head_dim, dim, bias=proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            out = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class SlimBlock(nn.Module):
    """A pre-norm block whose attention and MLP halves are optional and arbitrarily narrow.

    Its constructor arguments are its whole description, so `config()` rebuilds it from JSON.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, hidden: int, scale: float, norm_eps: float = 1e-6,
                 qkv_bias: bool = True, proj_bias: bool = True, mlp_bias: bool = True, layer_scale: bool = False,
                 gelu_approximate: str = "none"):
        super().__init__()
        self._config = dict(dim=dim, heads=heads, head_dim=head_dim, hidden=hidden, scale=scale, norm_eps=norm_eps,
                            qkv_bias=qkv_bias, proj_bias=proj_bias, mlp_bias=mlp_bias, layer_scale=layer_scale,
                            gelu_approximate=gelu_approximate)
        has_attn, has_mlp = heads > 0 and head_dim > 0, hidden > 0
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps) if has_attn else None
        self.attn = SlimAttention(dim, heads, head_dim, scale, qkv_bias, proj_bias) if has_attn else None
        self.ls1 = LayerScale(dim) if has_attn and layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps) if has_mlp else None
        self.mlp = Mlp(dim, hidden, act_layer=lambda: nn.GELU(approximate=gelu_approximate), bias=mlp_bias) if has_mlp else None
        self.ls2 = LayerScale(dim) if has_mlp and layer_scale else nn.Identity()

    def config(self) -> dict:
        return dict(self._config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.ls1(self.attn(self.norm1(x)))
        if self.mlp is not None:
            x = x + self.ls2(self.mlp(self.norm2(x)))
        return x

    def shape(self) -> BlockShape:
        c = self._config
        return BlockShape(dim=c["dim"], heads=c["heads"], attn_width=c["heads"] * c["head_dim"], hidden=c["hidden"],
                          attn=self.attn is not None, mlp=self.mlp is not None)


def _copy_linear(dst: nn.Linear, src: nn.Linear, rows=None, cols=None) -> None:
    w = src.weight.detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    dst.weight.data.copy_(w)
    if src.bias is not None:
        dst.bias.data.copy_(src.bias.detach()[rows] if rows is not None else src.bias.detach())


def _copy_norm_and_scale(dst_norm, dst_ls, src_norm, src_ls) -> None:
    dst_norm.load_state_dict(src_norm.state_dict())
    if isinstance(src_ls, LayerScale):
        dst_ls.gamma.data.copy_(src_ls.gamma.detach())


def slim_block(block: GatedBlock) -> SlimBlock | None:
    """The dense equivalent of a gated block under its hard masks; None when nothing is left."""
    plan: LayerPlan = block.plan()
    widths = {len(d) for d in plan.dims}
    if len(widths) > 1:
        raise UVCError(f"kept heads have different widths {sorted(widths)}; slimming needs one head width per layer")
    head_dim = widths.pop() if widths else 0
    attn, mlp = block.attn, block.mlp
    slim = SlimBlock(
        dim=attn.qkv.in_features, heads=len(plan.heads), head_dim=head_dim, hidden=len(plan.neurons),
        scale=float(attn.scale), norm_eps=block.norm1.eps, qkv_bias=attn.qkv.bias is not None,
        proj_bias=attn.proj.bias is not None, mlp_bias=mlp.fc1.bias is not None,
        layer_scale=isinstance(block.ls1, LayerScale), gelu_approximate=mlp.act.approximate,
    )
    if slim.attn is None and slim.mlp is None:
        return None
    if slim.attn is not None:
        width = attn.num_heads * attn.head_dim
        q_rows = torch.tensor([h * attn.head_dim + j for h, dims in zip(plan.heads, plan.dims) for j in dims])
        _copy_linear(slim.attn.qkv, attn.qkv, rows=torch.cat([q_rows, q_rows + width, q_rows + 2 * width]))
        _copy_linear(slim.attn.proj, attn.proj, cols=q_rows)
        _copy_norm_and_scale(slim.norm1, slim.ls1, block.norm1, block.ls1)
    if slim.mlp is not None:
        neurons = torch.tensor(plan.neurons)
        _copy_linear(slim.mlp.fc1, mlp.fc1, rows=neurons)
        _copy_linear(slim.mlp.fc2, mlp.fc2, cols=neurons)
        _copy_norm_and_scale(slim.norm2, slim.ls2, block.norm2, block.ls2)
    return slim


@torch.no_grad()
def slim(model: nn.Module, plan: list[LayerPlan] | None = None) -> nn.Module:
    """A new, physically smaller model: the gated `model` under its masks, or under `plan`.

    Dense timm blocks are taken as they are (every mask at 1); the input model is not changed.
    """
    from .gates import make_compressible

    model = copy.deepcopy(model)
    adapter = adapter_for(model)
    if is_slim(model):
        if plan is not None:
            raise UVCError("this model is already slimmed; a plan applies to the original (dense) model")
        return model.eval()
    make_compressible(model)
    if plan is not None:
        set_plan(model, plan)
    blocks = [slim_block(b) for b in adapter.blocks(model)]
    adapter.set_blocks(model, nn.Sequential(*[b for b in blocks if b is not None]))
    return model.eval()


def is_slim(model: nn.Module) -> bool:
    return all(isinstance(b, SlimBlock) for b in adapter_for(model).blocks(model))

