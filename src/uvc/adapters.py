"""Model adapters: what uvc needs to know about a ViT family, and the registry that picks one.

An adapter finds the compressible blocks of a model (timm `Block`s: `norm1, attn(qkv, proj), ls1,
norm2, mlp(fc1, act, fc2), ls2`), counts the tokens they see and the MACs outside them, refuses
block variants uvc cannot compress (before any training), and writes a JSON spec from which the
dense skeleton is rebuilt without timm's registry or the Hub. This module is a leaf: it knows the
resource formulas and nothing of gates, slimming or loading.
"""
from __future__ import annotations

from functools import partial
from typing import Protocol

from timm.layers import Attention, GELUTanh, LayerScale, Mlp, QuickGELU
from timm.layers.activations import GELU as TimmGELU
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from .errors import UVCError
from .resource import linear_macs, patch_embed_macs


class ModelAdapter(Protocol):
    """The interface uvc's gates, FLOPs model, slimming and serialisation rely on."""

    name: str

    def matches(self, model: nn.Module) -> bool: ...
    def blocks(self, model: nn.Module) -> nn.Sequential: ...
    def set_blocks(self, model: nn.Module, blocks: nn.Sequential) -> None: ...
    def input_size(self, model: nn.Module) -> tuple[int, int, int]: ...
    def tokens(self, model: nn.Module, input_size: tuple[int, int, int]) -> int: ...
    def fixed_macs(self, model: nn.Module, input_size: tuple[int, int, int]) -> int: ...
    def check(self, model: nn.Module) -> None: ...
    def spec(self, model: nn.Module) -> dict: ...
    def build(self, spec: dict) -> nn.Module: ...


def pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


# MLP activations a slimmed block can rebuild by name (arch.json stores the name).
ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_tanh": partial(nn.GELU, approximate="tanh"),
    "quick_gelu": QuickGELU,
    "silu": nn.SiLU,
    "relu": nn.ReLU,
}


def activation_name(act: nn.Module) -> str | None:
    """The ACTIVATIONS name computing what `act` computes, or None for one uvc does not know."""
    if isinstance(act, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    return {TimmGELU: "gelu", GELUTanh: "gelu_tanh", QuickGELU: "quick_gelu", nn.SiLU: "silu",
            nn.ReLU: "relu"}.get(type(act))


def check_block(block: nn.Module) -> str | None:
    """What makes `block` something uvc cannot mask and slim exactly, in words; None if it can."""
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    if type(block) is not Block:
        return f"block type {type(block).__name__} (only timm's pre-norm Block is supported)"
    if type(attn) is not Attention:
        return f"attention type {type(attn).__name__} (only timm's standard Attention)"
    if getattr(attn, "gate", None) is not None:
        return "gated attention (an output gate, gated=True; only timm's standard Attention)"
    if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
        return "qk-norm (qk_norm=True; its statistics change when head dimensions are pruned)"
    if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
        return "attention output norm (scale_attn_norm=True; its statistics change when heads are pruned)"
    if attn.proj.out_features != attn.qkv.in_features:
        return "attention whose output width differs from its input width"
    if type(mlp) is not Mlp or not isinstance(mlp.fc1, nn.Linear):
        return f"MLP type {type(mlp).__name__} (only timm's Mlp of two linear layers; SwiGLU/GLU is not supported)"
    if not isinstance(mlp.norm, nn.Identity):
        return "MLP hidden norm (scale_mlp_norm=True; its statistics change when neurons are pruned)"
    if activation_name(mlp.act) is None:
        return f"MLP activation {type(mlp.act).__name__} (supported: {', '.join(ACTIVATIONS)})"
    if not (isinstance(block.norm1, nn.LayerNorm) and isinstance(block.norm2, nn.LayerNorm)):
        return f"norm layer {type(block.norm1).__name__} (only LayerNorm)"
    for ls in (block.ls1, block.ls2):
        if not isinstance(ls, (nn.Identity, LayerScale)):
            return f"layer scale type {type(ls).__name__}"
    return None


def check_blocks(blocks) -> None:
    """Raise, naming the feature, at the first block uvc cannot compress."""
    for i, block in enumerate(blocks):
        if problem := check_block(block):
            raise UVCError(f"block {i} has an unsupported {problem}")


# timm ViT classes a saved spec may name; other families register their own adapter instead.
VIT_CLASSES: dict[str, type] = {"VisionTransformer": VisionTransformer,
                                "VisionTransformerDistilled": VisionTransformerDistilled}


def register_vit_class(cls: type) -> type:
    """Let a `VisionTransformer` subclass (e.g. a different classifier head) be saved and rebuilt by name."""
    VIT_CLASSES[cls.__name__] = cls
    return cls


class TimmViTAdapter:
    """timm's VisionTransformer, its DeiT distilled subclass and registered subclasses."""

    name = "timm-vit"

    def matches(self, model):
        return isinstance(model, VisionTransformer)

    def blocks(self, model):
        return model.blocks

    def set_blocks(self, model, blocks):
        model.blocks = blocks

    def input_size(self, model):
        h, w = pair(model.patch_embed.img_size)
        return (model.patch_embed.proj.in_channels, h, w)

    def _grid(self, model, input_size):
        ph, pw = pair(model.patch_embed.patch_size)
        if getattr(model.patch_embed, "dynamic_img_pad", False):  # the input is padded up to whole patches
            return -(-input_size[1] // ph), -(-input_size[2] // pw)
        return input_size[1] // ph, input_size[2] // pw

    def tokens(self, model, input_size):
        gh, gw = self._grid(model, input_size)
        return gh * gw + model.num_prefix_tokens

    def fixed_macs(self, model, input_size):
        """Patch embedding plus the classifier head(s), each reading one pooled vector (every token without pooling)."""
        embed = patch_embed_macs(self._grid(model, input_size), pair(model.patch_embed.patch_size), input_size[0],
                                 model.embed_dim)
        heads = [m for m in (model.head, getattr(model, "head_dist", None)) if isinstance(m, nn.Linear)]
        read = self.tokens(model, input_size) if model.global_pool == "" else 1
        return embed + sum(linear_macs(h.in_features, h.out_features, read) for h in heads)

    def check(self, model):
        """Refuse ViT variants whose blocks the gates and slimming do not understand, naming the feature."""
        if type(model).__name__ not in VIT_CLASSES:
            raise UVCError(f"{type(model).__name__} is a VisionTransformer subclass uvc does not know; "
                           "register it with uvc.adapters.register_vit_class if its blocks are timm's")
        if getattr(model, "attn_pool", None) is not None:
            raise UVCError(f"ViTs with attention pooling (global_pool={model.global_pool!r}) are not supported; "
                           "use a 'token' or 'avg' pooled ViT")
        if not isinstance(getattr(model.patch_embed, "proj", None), nn.Conv2d) or hasattr(model.patch_embed, "backbone"):
            raise UVCError("only ViTs with a plain convolutional patch embedding are supported (not hybrid CNN stems)")
        if not isinstance(getattr(model.patch_embed, "norm", nn.Identity()), (nn.Identity, nn.LayerNorm)):
            raise UVCError(f"patch-embedding norm {type(model.patch_embed.norm).__name__} is not supported (only LayerNorm)")
        check_blocks(model.blocks)

    def spec(self, model):
        """Constructor arguments of the dense skeleton; slimmed blocks are described by slim.arch_of."""
        ph, pw = pair(model.patch_embed.patch_size)
        kwargs = dict(
            img_size=list(pair(model.patch_embed.img_size)), patch_size=[ph, pw],
            in_chans=model.patch_embed.proj.in_channels, num_classes=model.num_classes,
            global_pool=model.global_pool, embed_dim=model.embed_dim,
            class_token=model.cls_token is not None, no_embed_class=model.no_embed_class,
            reg_tokens=model.num_reg_tokens, pre_norm=not isinstance(model.norm_pre, nn.Identity),
            # timm makes fc_norm only when final_norm is set, and then in place of the final norm
            final_norm=not (isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity)),
            fc_norm=not isinstance(model.fc_norm, nn.Identity),
            pos_embed="learn" if model.pos_embed is not None else "none",
            pool_include_prefix=getattr(model, "pool_include_prefix", False),
            dynamic_img_size=model.dynamic_img_size,
            dynamic_img_pad=getattr(model.patch_embed, "dynamic_img_pad", False), depth=0,
        )
        first = getattr(model.blocks[0], "norm1", None) if len(model.blocks) else None  # the blocks' eps first
        norm = next((m for m in (first, model.norm, model.fc_norm, model.norm_pre) if isinstance(m, nn.LayerNorm)), None)
        spec = {"adapter": self.name, "class": type(model).__name__, "kwargs": kwargs,
                "norm_eps": norm.eps if norm is not None else 1e-6}
        if isinstance(getattr(model.patch_embed, "norm", None), nn.LayerNorm):
            spec["embed_norm_eps"] = model.patch_embed.norm.eps
        if len(model.blocks) and isinstance(model.blocks[0], Block):
            block = model.blocks[0]
            hidden = block.mlp.fc1.out_features
            mlp_ratio = hidden / model.embed_dim
            if int(model.embed_dim * mlp_ratio) != hidden:  # timm sizes the MLP as int(dim * mlp_ratio)
                mlp_ratio = (hidden + 0.5) / model.embed_dim
            kwargs.update(
                depth=len(model.blocks), num_heads=block.attn.num_heads, mlp_ratio=mlp_ratio,
                qkv_bias=block.attn.qkv.bias is not None, proj_bias=block.attn.proj.bias is not None,
                init_values=1.0 if not isinstance(block.ls1, nn.Identity) else None,
            )
            spec["act"] = activation_name(block.mlp.act)
        return spec

    def build(self, spec):
        if spec.get("class") not in VIT_CLASSES:
            raise UVCError(f"arch.json names an unknown model class {spec.get('class')!r}")
        kwargs = dict(spec["kwargs"])
        kwargs["img_size"], kwargs["patch_size"] = tuple(kwargs["img_size"]), tuple(kwargs["patch_size"])
        if spec.get("embed_norm_eps") is not None:
            kwargs["embed_norm_layer"] = partial(nn.LayerNorm, eps=spec["embed_norm_eps"])
        return VIT_CLASSES[spec["class"]](**kwargs, act_layer=ACTIVATIONS[spec.get("act") or "gelu"],
                                          norm_layer=partial(nn.LayerNorm, eps=spec.get("norm_eps", 1e-6)),
                                          weight_init="skip")


ADAPTERS: list = [TimmViTAdapter()]


def register_adapter(adapter) -> None:
    """Let another ViT family (T2T-ViT, ...) take part in gating, FLOPs counting, slimming and saving."""
    ADAPTERS.insert(0, adapter)


def adapter_for(model: nn.Module):
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise UVCError(
        f"{type(model).__name__} is not a supported Vision Transformer. uvc compresses timm ViT/DeiT models "
        "(vit_*, deit_*), T2T-ViT and Hugging Face ViT/DeiT/DINOv2; pass one of those."
    )


def adapter_named(name: str):
    for adapter in ADAPTERS:
        if adapter.name == name:
            return adapter
    raise UVCError(f"no model adapter named {name!r}; known: {', '.join(a.name for a in ADAPTERS)}")


def check_supported(model: nn.Module):
    """The model's adapter, after checking every block is one uvc can compress."""
    adapter = adapter_for(model)
    adapter.check(model)
    return adapter
