"""Model adapters: what uvc needs to know about a ViT family, in one place.

An adapter finds the compressible blocks of a model (timm `Block`s: `norm1, attn(qkv, proj), ls1,
norm2, mlp(fc1, fc2), ls2`), counts the tokens they see and the MACs outside them, and writes a
JSON spec from which the dense network can be rebuilt without timm's registry or the hub.
The timm adapter covers `VisionTransformer` (vit_*, deit_*) and `VisionTransformerDistilled`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from .errors import UVCError

ASSETS = Path(__file__).parent / "assets"
DEFAULT_TEACHER = "vit_tiny_patch7_fmnist"
TEACHER_ARGS = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=192, depth=12, num_heads=3)


class ModelAdapter(Protocol):
    """The interface uvc's gates, FLOPs model, slimming and serialisation rely on."""

    name: str

    def matches(self, model: nn.Module) -> bool: ...
    def blocks(self, model: nn.Module) -> nn.Sequential: ...
    def set_blocks(self, model: nn.Module, blocks: nn.Sequential) -> None: ...
    def input_size(self, model: nn.Module) -> tuple[int, int, int]: ...
    def tokens(self, model: nn.Module, input_size: tuple[int, int, int]) -> int: ...
    def fixed_macs(self, model: nn.Module, input_size: tuple[int, int, int]) -> int: ...
    def spec(self, model: nn.Module) -> dict: ...
    def build(self, spec: dict) -> nn.Module: ...


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class TimmViTAdapter:
    """timm's VisionTransformer and its DeiT distilled subclass."""

    name = "timm-vit"

    def matches(self, model):
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def blocks(self, model):
        return model.blocks

    def set_blocks(self, model, blocks):
        model.blocks = blocks

    def input_size(self, model):
        h, w = _pair(model.patch_embed.img_size)
        return (model.patch_embed.proj.in_channels, h, w)

    def _grid(self, model, input_size):
        ph, pw = _pair(model.patch_embed.patch_size)
        return input_size[1] // ph, input_size[2] // pw

    def tokens(self, model, input_size):
        gh, gw = self._grid(model, input_size)
        return gh * gw + model.num_prefix_tokens

    def fixed_macs(self, model, input_size):
        """Patch embedding (a strided conv) plus the classifier head(s)."""
        gh, gw = self._grid(model, input_size)
        ph, pw = _pair(model.patch_embed.patch_size)
        embed = gh * gw * ph * pw * input_size[0] * model.embed_dim
        heads = [m for m in (model.head, getattr(model, "head_dist", None)) if isinstance(m, nn.Linear)]
        return embed + sum(h.in_features * h.out_features for h in heads)

    def check(self, model):
        """Refuse ViT variants whose blocks the gates and slimming do not understand."""
        from timm.layers import Attention, Mlp
        from timm.models.vision_transformer import Block

        if getattr(model, "attn_pool", None) is not None:
            raise UVCError("ViTs with attention pooling (global_pool='map') are not supported; use a 'token' or 'avg' pooled ViT")
        for i, block in enumerate(model.blocks):
            attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
            problem = None
            if type(block) is not Block:
                problem = f"block type {type(block).__name__} (only timm's plain pre-norm Block is supported)"
            elif type(attn) is not Attention or attn.gate is not None:
                problem = f"attention type {type(attn).__name__} (only timm's standard Attention)"
            elif not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.norm, nn.Identity):
                problem = "qk-norm or attention output norm (its statistics change when dimensions are pruned)"
            elif type(mlp) is not Mlp or not isinstance(mlp.norm, nn.Identity):
                problem = f"MLP type {type(mlp).__name__} (only timm's Mlp without a hidden norm)"
            if problem:
                raise UVCError(f"block {i} has an unsupported {problem}")

    def spec(self, model):
        """Constructor arguments of the dense skeleton; slimmed blocks are described by io.arch_of."""
        from timm.models.deit import VisionTransformerDistilled
        from timm.models.vision_transformer import Block

        ph, pw = _pair(model.patch_embed.patch_size)
        kwargs = dict(
            img_size=list(_pair(model.patch_embed.img_size)), patch_size=[ph, pw],
            in_chans=model.patch_embed.proj.in_channels, num_classes=model.num_classes,
            global_pool=model.global_pool, embed_dim=model.embed_dim,
            class_token=model.cls_token is not None, no_embed_class=model.no_embed_class,
            reg_tokens=model.num_reg_tokens, pre_norm=not isinstance(model.norm_pre, nn.Identity),
            final_norm=not isinstance(model.norm, nn.Identity), fc_norm=not isinstance(model.fc_norm, nn.Identity),
            dynamic_img_size=model.dynamic_img_size, depth=0,
        )
        if len(model.blocks) and isinstance(model.blocks[0], Block):
            block = model.blocks[0]
            kwargs.update(
                depth=len(model.blocks), num_heads=block.attn.num_heads,
                mlp_ratio=block.mlp.fc1.out_features / model.embed_dim,
                qkv_bias=block.attn.qkv.bias is not None, proj_bias=block.attn.proj.bias is not None,
                init_values=1.0 if not isinstance(block.ls1, nn.Identity) else None,
            )
        cls = "VisionTransformerDistilled" if isinstance(model, VisionTransformerDistilled) else "VisionTransformer"
        return {"adapter": self.name, "class": cls, "kwargs": kwargs}

    def build(self, spec):
        from timm.models.deit import VisionTransformerDistilled
        from timm.models.vision_transformer import VisionTransformer

        classes = {"VisionTransformer": VisionTransformer, "VisionTransformerDistilled": VisionTransformerDistilled}
        if spec.get("class") not in classes:
            raise UVCError(f"arch.json names an unknown model class {spec.get('class')!r}")
        kwargs = dict(spec["kwargs"])
        kwargs["img_size"], kwargs["patch_size"] = tuple(kwargs["img_size"]), tuple(kwargs["patch_size"])
        return classes[spec["class"]](**kwargs, weight_init="skip")


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
        "(vit_*, deit_*) and T2T-ViT; pass one of those."
    )


def adapter_named(name: str):
    for adapter in ADAPTERS:
        if adapter.name == name:
            return adapter
    raise UVCError(f"no model adapter named {name!r}; known: {', '.join(a.name for a in ADAPTERS)}")


def check_supported(model: nn.Module):
    """The model's adapter, after checking every block is one uvc can compress."""
    adapter = adapter_for(model)
    if hasattr(adapter, "check"):
        adapter.check(model)
    return adapter


def _register_teacher_architecture() -> None:
    """Make the default teacher's architecture a timm model name, so `timm.create_model` builds it."""
    from timm.models import register_model, is_model
    from timm.models.vision_transformer import VisionTransformer

    if is_model(DEFAULT_TEACHER):
        return

    def vit_tiny_patch7_fmnist(pretrained: bool = False, **kwargs) -> VisionTransformer:
        """DeiT-Tiny shape (dim 192, 12 blocks, 3 heads) for 28x28 greyscale images, 4x4 patches of 7 px."""
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        if pretrained:
            return load_default_teacher()
        return VisionTransformer(**{**TEACHER_ARGS, **kwargs})

    vit_tiny_patch7_fmnist.__module__ = __name__
    register_model(vit_tiny_patch7_fmnist)


def default_teacher_dir() -> Path:
    return ASSETS / DEFAULT_TEACHER


def load_default_teacher() -> nn.Module:
    """The bundled Fashion-MNIST teacher, in float32."""
    from .io import load

    folder = default_teacher_dir()
    if not (folder / "arch.json").is_file():
        raise UVCError(f"the bundled teacher is missing from {folder}; rebuild it with `uvc train-teacher`")
    return load(folder)


def _read_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise UVCError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            import argparse

            # Released training checkpoints (timm's saver, T2T-ViT, DeiT) also pickle their argparse args.
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the formats raise many types; all mean "not a readable checkpoint"
        raise UVCError(f"cannot read checkpoint {path}: {e}") from e
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UVCError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_state_dict_checked(model: nn.Module, state: dict, source: str,
                            advice: str = "Pass the --model the checkpoint was trained with.") -> None:
    """Strict load, turning key and shape mismatches into a message that lists them and says what to do."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def show(items):
            return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")
        parts = [f"missing keys: {show(missing)}" if missing else "",
                 f"unexpected keys: {show(unexpected)}" if unexpected else "",
                 f"shape mismatches: {show(shapes)}" if shapes else ""]
        raise UVCError(f"checkpoint {source} does not fit this architecture; " + "; ".join(p for p in parts if p)
                       + ". " + advice)
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


OFFLINE_ADVICE = ("Without network access, download the weights elsewhere and pass --checkpoint PATH (timm's "
                  ".safetensors/.pth, or the original DeiT .pth holding {'model': state_dict}), or set "
                  "HF_HUB_OFFLINE=1 to use weights already in the Hugging Face cache.")


def _hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached, found within `timeout` seconds; None if it answers.

    Offline, huggingface_hub retries for about a minute before it gives up; this probe makes an
    offline `--pretrained` fail in seconds. With HF_HUB_OFFLINE set, timm reads the local cache and
    makes no request, so there is nothing to probe.
    """
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as e:  # the HTTP client (httpx or requests, by hub version) raises its own types
        return f"the Hugging Face Hub ({constants.ENDPOINT}) is not reachable ({type(e).__name__}: {e})"
    return None


def load_model(model: str | None = None, checkpoint: str | None = None, pretrained: bool = False,
               **timm_kwargs) -> nn.Module:
    """A model from a timm name, a folder written by `uvc.save`, or the bundled teacher (None).

    `checkpoint` loads a local state dict (.safetensors, .pth, .pth.tar; timm or DeiT layout) into
    the named architecture; `pretrained` asks timm for released weights, which needs the network.
    """
    import timm

    from .io import load

    _register_teacher_architecture()
    if model is None or (model == DEFAULT_TEACHER and not checkpoint and not timm_kwargs):
        net = load_default_teacher()
    elif Path(model).is_dir():
        net = load(model)
    elif Path(model).suffix in (".safetensors", ".pth", ".pt", ".tar"):
        raise UVCError(f"{model} is a weights file; pass the architecture as --model NAME and the file as --checkpoint {model}")
    else:
        if not timm.is_model(model):
            close = timm.list_models(f"*{model.split('_')[0]}*")[:8]
            raise UVCError(f"unknown model {model!r}: not a timm model name nor a folder saved by uvc.save."
                           + (f" Similar names: {', '.join(close)}" if close else ""))
        fetch = pretrained and not checkpoint
        if fetch and (problem := _hub_unreachable()):
            raise UVCError(f"could not fetch pretrained weights for {model}: {problem}. " + OFFLINE_ADVICE)
        try:
            net = timm.create_model(model, pretrained=fetch, **timm_kwargs)
        except (OSError, RuntimeError, ValueError) as e:
            if fetch:
                raise UVCError(f"could not fetch pretrained weights for {model} ({type(e).__name__}: {e}). "
                               + OFFLINE_ADVICE) from e
            raise
        if checkpoint:
            load_state_dict_checked(net, _read_state_dict(Path(checkpoint)), checkpoint)
    check_supported(net)
    return net.eval()


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
