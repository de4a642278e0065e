"""T2T-ViT (Tokens-to-Token ViT, Yuan et al. 2021) as a model family uvc can compress.

The tokens-to-token module turns an image into tokens by three soft splits (overlapping unfolds,
7/4/2 then 3/2/1 twice), with a narrow one-head attention layer (a Performer, or a plain transformer
in the `_t_` variants) and a re-structurization back to an image between splits. After it comes
an ordinary ViT: class token, fixed sinusoidal positions, pre-norm blocks, final norm, linear head.
The backbone blocks are timm `Block`s, so uvc's gates, FLOPs model and slimming treat them exactly
as DeiT's; the T2T module stays dense and its MACs count as fixed.

State-dict keys follow the authors' release (yitu-opensource/T2T-ViT), so their `.pth.tar`
checkpoints load with `uvc.load_model("t2t_vit_14", checkpoint=path)`. Their evaluation builds the
models with `pretrained=False`, so the softmax scale of the backbone is head_dim**-0.5, as here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_, use_fused_attn
from timm.models import register_model
from timm.models.vision_transformer import Block
from torch import nn

from .errors import UVCError
from .adapters import check_blocks, pair, register_adapter
from .resource import linear_macs


def _split_grid(split: nn.Unfold, height: int, width: int) -> tuple[int, int]:
    """The token grid a soft split leaves: the unfold output size, floor((n + 2p - k) / s) + 1."""
    kernel, stride, padding = pair(split.kernel_size), pair(split.stride), pair(split.padding)
    return tuple((n + 2 * p - k) // s + 1 for n, k, s, p in zip((height, width), kernel, stride, padding))


def sinusoid_table(positions: int, dim: int) -> torch.Tensor:
    """The fixed sin (even channels) / cos (odd channels) position table T2T-ViT adds; not trained."""
    position = torch.arange(positions, dtype=torch.float64)[:, None]
    channel = torch.arange(dim)
    angle = position / torch.pow(10000.0, (2 * (channel // 2)).double() / dim)
    return torch.where(channel % 2 == 0, angle.sin(), angle.cos()).float()[None]


class TokenPerformer(nn.Module):
    """A one-head T2T layer with Performer attention (positive random features), linear in tokens.

    It narrows tokens from `dim` to `token_dim`; the values, already narrow, carry the residual.
    The random projection `w` is fixed at construction and saved with the weights.
    """

    def __init__(self, dim: int, token_dim: int, kernel_ratio: float = 0.5, drop: float = 0.1):
        super().__init__()
        self.emb = token_dim
        self.m = int(token_dim * kernel_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.kqv = nn.Linear(dim, 3 * token_dim)
        self.dp = nn.Dropout(drop)
        self.proj = nn.Linear(token_dim, token_dim)
        self.norm2 = nn.LayerNorm(token_dim)
        self.mlp = nn.Sequential(nn.Linear(token_dim, token_dim), nn.GELU(), nn.Linear(token_dim, token_dim), nn.Dropout(drop))
        self.register_buffer("w", nn.init.orthogonal_(torch.empty(self.m, token_dim)) * math.sqrt(self.m))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """exp(w.x - |x|^2 / 2) / sqrt(m): E[features(q) . features(k)] is the softmax kernel exp(q.k)."""
        return torch.exp(x @ self.w.t() - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(self.m)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        k, q, v = self.kqv(x).split(self.emb, dim=-1)
        kp, qp = self.features(k), self.features(q)
        normaliser = qp @ kp.sum(dim=1).unsqueeze(-1)
        out = (qp @ (kp.transpose(1, 2) @ v)) / (normaliser + 1e-8)
        return v + self.dp(self.proj(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attend(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def macs(self, tokens: int) -> int:
        """Linear layers, the random features of q and k, the normaliser and the two kernel products."""
        linears = sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))
        return tokens * (linears + 2 * self.emb * self.m + self.m + 2 * self.m * self.emb)


class TokenAttention(nn.Module):
    """Softmax attention with one head that maps `dim`-wide tokens to `token_dim`; the values are the residual.

    The scale is dim**-0.5 (the input width, not the head width), as in the authors' trained models.
    """

    def __init__(self, dim: int, token_dim: int):
        super().__init__()
        self.scale = dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, 3 * token_dim, bias=False)
        self.proj = nn.Linear(token_dim, token_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            out = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        return v + self.proj(out)


class TokenTransformer(nn.Module):
    """A one-head transformer T2T layer (the `t2t_vit_t_*` models): quadratic in tokens, like ViT attention."""

    def __init__(self, dim: int, token_dim: int, mlp_ratio: float = 1.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenAttention(dim, token_dim)
        self.norm2 = nn.LayerNorm(token_dim)
        self.mlp = Mlp(token_dim, int(token_dim * mlp_ratio), token_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def macs(self, tokens: int) -> int:
        """Linear layers plus the two attention products (scores, weighted sum)."""
        linears = sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))
        return tokens * linears + 2 * tokens * tokens * self.attn.proj.in_features


TOKEN_LAYERS = {"performer": TokenPerformer, "transformer": TokenTransformer}


class TokensToToken(nn.Module):
    """Image -> tokens: soft split, T2T layer, back to an image, soft split, T2T layer, ..., projection."""

    def __init__(self, tokens_type: str = "performer", in_chans: int = 3, embed_dim: int = 384, token_dim: int = 64):
        super().__init__()
        if tokens_type not in TOKEN_LAYERS:
            raise UVCError(f"unknown T2T tokens_type {tokens_type!r}; use one of {', '.join(TOKEN_LAYERS)}")
        layer = TOKEN_LAYERS[tokens_type]
        self.soft_split0 = nn.Unfold(kernel_size=7, stride=4, padding=2)
        self.soft_split1 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.soft_split2 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.attention1 = layer(in_chans * 7 * 7, token_dim)
        self.attention2 = layer(token_dim * 3 * 3, token_dim)
        self.project = nn.Linear(token_dim * 3 * 3, embed_dim)

    def grids(self, height: int, width: int) -> list[tuple[int, int]]:
        """The token grid after each of the three soft splits, for an input of height x width."""
        grids = []
        for split in (self.soft_split0, self.soft_split1, self.soft_split2):
            height, width = _split_grid(split, height, width)
            grids.append((height, width))
        return grids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        (h1, w1), (h2, w2), _ = self.grids(*x.shape[-2:])
        x = self.soft_split0(x).transpose(1, 2)
        x = self.attention1(x).transpose(1, 2).reshape(batch, -1, h1, w1)
        x = self.soft_split1(x).transpose(1, 2)
        x = self.attention2(x).transpose(1, 2).reshape(batch, -1, h2, w2)
        x = self.soft_split2(x).transpose(1, 2)
        return self.project(x)

    def macs(self, height: int, width: int) -> int:
        (h1, w1), (h2, w2), (h3, w3) = self.grids(height, width)
        project = h3 * w3 * self.project.in_features * self.project.out_features
        return self.attention1.macs(h1 * w1) + self.attention2.macs(h2 * w2) + project


class T2TViT(nn.Module):
    """Tokens-to-token module, then a ViT of timm Blocks (no qkv bias, nn.LayerNorm) on its tokens.

    `config` holds the architecture arguments, JSON-ready, for the adapter's spec.
    """

    def __init__(self, img_size=224, in_chans: int = 3, num_classes: int = 1000, tokens_type: str = "performer",
                 embed_dim: int = 384, depth: int = 14, num_heads: int = 6, mlp_ratio: float = 3.0, token_dim: int = 64,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 init_weights: bool = True):
        super().__init__()
        height, width = pair(img_size)
        self.config = dict(img_size=[height, width], in_chans=in_chans, num_classes=num_classes,
                           tokens_type=tokens_type, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                           mlp_ratio=mlp_ratio, token_dim=token_dim)
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.tokens_to_token = TokensToToken(tokens_type, in_chans, embed_dim, token_dim)
        grid_h, grid_w = self.tokens_to_token.grids(height, width)[-1]
        if grid_h < 1 or grid_w < 1:
            raise UVCError(f"images of {height}x{width} px are too small for T2T-ViT's soft splits")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sinusoid_table(grid_h * grid_w + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        drop_path = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=False, proj_drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=drop_path[i], norm_layer=nn.LayerNorm)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if init_weights:
            trunc_normal_(self.cls_token, std=0.02)
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    trunc_normal_(module.weight, std=0.02)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        """timm's optimizer factory leaves these out of weight decay, as the authors' training did."""
        return {"cls_token"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tokens_to_token(x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        return self.norm(self.blocks(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)[:, 0])


class T2TViTAdapter:
    """uvc's view of a T2TViT: its backbone blocks are compressible, the T2T module and head are fixed cost."""

    name = "t2t-vit"

    def matches(self, model):
        return isinstance(model, T2TViT)

    def blocks(self, model):
        return model.blocks

    def set_blocks(self, model, blocks):
        model.blocks = blocks

    def input_size(self, model):
        return (model.config["in_chans"], *model.config["img_size"])

    def tokens(self, model, input_size):
        grid_h, grid_w = model.tokens_to_token.grids(*input_size[1:])[-1]
        return grid_h * grid_w + 1

    def fixed_macs(self, model, input_size):
        """The whole T2T module (its attention products included) plus the classifier head."""
        head = linear_macs(model.head.in_features, model.head.out_features) if isinstance(model.head, nn.Linear) else 0
        return model.tokens_to_token.macs(*input_size[1:]) + head

    def check(self, model):
        """The backbone must hold plain timm Blocks, checked exactly as for DeiT."""
        check_blocks(model.blocks)

    def spec(self, model):
        return {"adapter": self.name, "kwargs": dict(model.config)}

    def build(self, spec):
        return T2TViT(**spec["kwargs"], init_weights=False)


register_adapter(T2TViTAdapter())


def _create(name: str, pretrained: bool, kwargs: dict, **arch) -> T2TViT:
    """A T2T-ViT from a timm entry point; the caller's kwargs (img_size, in_chans, ...) win over `arch`."""
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    if pretrained:
        raise UVCError(f"timm has no download for {name}; fetch the authors' .pth.tar (github.com/yitu-opensource/T2T-ViT) "
                       "and pass it as checkpoint=PATH (--checkpoint PATH)")
    return T2TViT(**{**arch, **kwargs})


# name: (T2T module, embed dim, depth, heads, MLP ratio), as in the authors' model factories.
T2T_VARIANTS = {
    "t2t_vit_7": ("performer", 256, 7, 4, 2.0),
    "t2t_vit_10": ("performer", 256, 10, 4, 2.0),
    "t2t_vit_12": ("performer", 256, 12, 4, 2.0),
    "t2t_vit_14": ("performer", 384, 14, 6, 3.0),
    "t2t_vit_19": ("performer", 448, 19, 7, 3.0),
    "t2t_vit_24": ("performer", 512, 24, 8, 3.0),
    "t2t_vit_t_14": ("transformer", 384, 14, 6, 3.0),
    "t2t_vit_t_19": ("transformer", 448, 19, 7, 3.0),
    "t2t_vit_t_24": ("transformer", 512, 24, 8, 3.0),
}


def _entry_point(name: str, tokens_type: str, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float):
    """A timm model entry point for one T2T-ViT variant."""

    def create(pretrained: bool = False, **kwargs) -> T2TViT:
        return _create(name, pretrained, kwargs, tokens_type=tokens_type, embed_dim=embed_dim, depth=depth,
                       num_heads=num_heads, mlp_ratio=mlp_ratio)

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = (f"{name}: {tokens_type} T2T module, {depth} blocks of width {embed_dim}, "
                      f"{num_heads} heads, MLP ratio {mlp_ratio:g}.")
    return create


for _name, _variant in T2T_VARIANTS.items():
    register_model(_entry_point(_name, *_variant))
