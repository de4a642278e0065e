"""Physical slimming: a plan becomes a smaller dense network, and that network's JSON description.

A `SlimBlock` is a pre-norm transformer block with its own head count, head width and MLP width;
a skipped half is simply absent and a fully skipped block is dropped from the model. Attention
keeps the original model's softmax scale (not 1/sqrt of the new head width), so the slimmed model
computes exactly what the masked one did, and it still runs through fused attention. Slimming reads
the kept rows and columns straight from the plan: nothing is masked or copied whole on the way, and
the new layers are made on the source weights' device and in their dtype.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from timm.layers import LayerScale, Mlp, use_fused_attn
from torch import nn

from . import t2t  # noqa: F401  (registers the T2T-ViT adapter and timm names: saved T2T models rebuild by name)
from .adapters import ACTIVATIONS, activation_name, adapter_for, adapter_named
from .errors import UVCError
from .gates import GatedBlock, get_plan
from .plan import LayerPlan
from .resource import BlockShape

ARCH_FORMAT = "uvc-arch/1"


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
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))  # (B, N, heads * head_dim) -> (B, N, dim)


class SlimBlock(nn.Module):
    """A pre-norm block whose attention and MLP halves are optional and arbitrarily narrow.

    Its constructor arguments are its whole description, so `config()` rebuilds it from JSON.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, hidden: int, scale: float, norm_eps: float = 1e-6,
                 qkv_bias: bool = True, proj_bias: bool = True, mlp_bias: bool = True, layer_scale: bool = False,
                 act: str = "gelu"):
        super().__init__()
        self._config = dict(dim=dim, heads=heads, head_dim=head_dim, hidden=hidden, scale=scale, norm_eps=norm_eps,
                            qkv_bias=qkv_bias, proj_bias=proj_bias, mlp_bias=mlp_bias, layer_scale=layer_scale, act=act)
        if act not in ACTIVATIONS:
            raise UVCError(f"unknown MLP activation {act!r}; known: {', '.join(ACTIVATIONS)}")
        has_attn, has_mlp = heads > 0 and head_dim > 0, hidden > 0
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps) if has_attn else None
        self.attn = SlimAttention(dim, heads, head_dim, scale, qkv_bias, proj_bias) if has_attn else None
        self.ls1 = LayerScale(dim) if has_attn and layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps) if has_mlp else None
        self.mlp = Mlp(dim, hidden, act_layer=ACTIVATIONS[act], bias=mlp_bias) if has_mlp else None
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
        return BlockShape(dim=c["dim"], heads=c["heads"], head_dim=c["head_dim"], hidden=c["hidden"],
                          attn=self.attn is not None, mlp=self.mlp is not None)


def _copy_linear(dst: nn.Linear, src: nn.Linear, rows=None, cols=None) -> None:
    w = src.weight.detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    dst.weight.copy_(w)
    if src.bias is not None:
        dst.bias.copy_(src.bias.detach()[rows] if rows is not None else src.bias.detach())


def _copy_norm_and_scale(dst_norm, dst_ls, src_norm, src_ls) -> None:
    dst_norm.load_state_dict(src_norm.state_dict())
    if isinstance(src_ls, LayerScale):
        dst_ls.gamma.copy_(src_ls.gamma.detach())


@torch.no_grad()
def slim_block(block: nn.Module, plan: LayerPlan) -> SlimBlock | None:
    """The dense equivalent of `block` (a timm Block or a GatedBlock) under `plan`; None when nothing is left."""
    attn, mlp = block.attn, block.mlp
    shape = plan.shape(attn.qkv.in_features)
    weight = attn.qkv.weight
    slim = SlimBlock(
        dim=shape.dim, heads=shape.heads if shape.runs_attn else 0, head_dim=shape.head_dim if shape.runs_attn else 0,
        hidden=shape.hidden if shape.runs_mlp else 0, scale=float(attn.scale), norm_eps=block.norm1.eps,
        qkv_bias=attn.qkv.bias is not None, proj_bias=attn.proj.bias is not None, mlp_bias=mlp.fc1.bias is not None,
        layer_scale=isinstance(block.ls1, LayerScale), act=activation_name(mlp.act),
    ).to(device=weight.device, dtype=weight.dtype)
    if slim.attn is None and slim.mlp is None:
        return None
    if slim.attn is not None:
        width = attn.num_heads * attn.head_dim
        q_rows = torch.tensor(plan.attention_columns(attn.head_dim), device=weight.device, dtype=torch.long)
        _copy_linear(slim.attn.qkv, attn.qkv, rows=torch.cat([q_rows, q_rows + width, q_rows + 2 * width]))
        _copy_linear(slim.attn.proj, attn.proj, cols=q_rows)
        _copy_norm_and_scale(slim.norm1, slim.ls1, block.norm1, block.ls1)
    if slim.mlp is not None:
        neurons = torch.tensor(plan.neurons, device=weight.device)
        _copy_linear(slim.mlp.fc1, mlp.fc1, rows=neurons)
        _copy_linear(slim.mlp.fc2, mlp.fc2, cols=neurons)
        _copy_norm_and_scale(slim.norm2, slim.ls2, block.norm2, block.ls2)
    return slim


def _copy_without_blocks(model: nn.Module) -> nn.Module:
    """A deep copy of everything but the blocks (they are rebuilt, so copying them would be wasted)."""
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    adapter.set_blocks(model, nn.Sequential())
    try:
        return copy.deepcopy(model)
    finally:
        adapter.set_blocks(model, blocks)


@torch.no_grad()
def slim(model: nn.Module, plan: list[LayerPlan] | None = None) -> nn.Module:
    """A new, physically smaller model: `model` under `plan`, or a gated model under its own masks.

    Dense timm blocks without a plan are kept whole; the input model is not changed.
    """
    adapter = adapter_for(model)
    blocks = list(adapter.blocks(model))
    if is_slim(model):
        if plan is not None:
            raise UVCError("this model is already slimmed; a plan applies to the original (dense) model")
        return copy.deepcopy(model).eval()
    gated = all(isinstance(b, GatedBlock) for b in blocks)
    if not gated:
        adapter.check(model)
    if plan is None:
        plan = get_plan(model) if gated else [_keep_all(b) for b in blocks]
    if len(plan) != len(blocks):
        raise UVCError(f"the plan has {len(plan)} layers but the model has {len(blocks)} blocks")
    slimmed = [slim_block(b, p) for b, p in zip(blocks, plan)]
    out = _copy_without_blocks(model)
    adapter.set_blocks(out, nn.Sequential(*[b for b in slimmed if b is not None]))
    return out.eval()


def _keep_all(block: nn.Module) -> LayerPlan:
    heads, head_dim = block.attn.num_heads, block.attn.head_dim
    return LayerPlan(heads=list(range(heads)), dims=[list(range(head_dim))] * heads,
                     neurons=list(range(block.mlp.fc1.out_features)))


def is_slim(model: nn.Module) -> bool:
    return all(isinstance(b, SlimBlock) for b in adapter_for(model).blocks(model))


def arch_of(model: nn.Module) -> dict:
    """The JSON description `build_from_arch` needs to rebuild `model`'s skeleton."""
    adapter = adapter_for(model)
    blocks = list(adapter.blocks(model))
    if any(isinstance(b, GatedBlock) for b in blocks):
        raise UVCError("this model is in its masked (compressible) form; call uvc.slim(model) before saving")
    layers = [b.config() for b in blocks] if blocks and all(isinstance(b, SlimBlock) for b in blocks) else None
    return {"format": ARCH_FORMAT, "model": adapter.spec(model), "layers": layers}


def build_from_arch(arch: dict) -> nn.Module:
    """The model an `arch_of` description names, with uninitialised weights."""
    if not isinstance(arch, dict) or arch.get("format") != ARCH_FORMAT or "model" not in arch:
        raise UVCError(f"arch.json is not a uvc architecture file (expected format {ARCH_FORMAT!r})")
    spec = arch["model"]
    adapter = adapter_named(spec.get("adapter", ""))
    try:
        model = adapter.build(spec)
        if arch.get("layers") is not None:
            adapter.set_blocks(model, nn.Sequential(*[SlimBlock(**cfg) for cfg in arch["layers"]]))
    except (TypeError, KeyError, ValueError, AssertionError) as e:
        raise UVCError(f"arch.json describes a model that cannot be built: {type(e).__name__}: {e}") from e
    return model
