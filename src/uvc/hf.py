"""Hugging Face `transformers` ViTs as the equivalent timm model, so uvc can compress them.

uvc's gates, FLOPs model and slimming understand timm's `VisionTransformer` blocks. A transformers
ViT, DeiT or DINOv2 computes the same pre-norm transformer with other module names and separate
query/key/value projections, so `to_timm` builds the timm model with the same shape and copies the
weights under the key map below. The outputs agree to float rounding (tests: <= 1e-4).

| transformers class | timm model | output compared |
| --- | --- | --- |
| ViTModel | VisionTransformer, num_classes=0 | last_hidden_state[:, 0] (the tanh `pooler` is dropped) |
| ViTForImageClassification | VisionTransformer | logits |
| DeiTModel | VisionTransformer, reg_tokens=1, num_classes=0 | last_hidden_state[:, 0] (pooler dropped) |
| DeiTForImageClassification | VisionTransformer, reg_tokens=1 | logits |
| DeiTForImageClassificationWithTeacher | VisionTransformerDistilled | logits (eval: mean of both heads) |
| Dinov2Model | VisionTransformer, init_values (LayerScale), num_classes=0 | pooler_output (= class token) |
| Dinov2ForImageClassification | VisionTransformerClsAvg (below) | logits |

Key map, applied to the state dict after its base prefix (`vit.`, `deit.`, `dinov2.`) is removed.
`L.` is a layer prefix: `encoder.layer.{i}.` (transformers 4.x, and DINOv2 in 5.x) or `layers.{i}.`
(ViT/DeiT in transformers 5.x); both layouts are read.

| transformers key | timm key |
| --- | --- |
| embeddings.cls_token | cls_token |
| embeddings.distillation_token | dist_token (WithTeacher) / reg_token (DeiTModel, DeiTForImageClassification) |
| embeddings.position_embeddings | pos_embed |
| embeddings.patch_embeddings.projection.{weight,bias} | patch_embed.proj.{weight,bias} |
| embeddings.mask_token | dropped (masked-image pre-training only) |
| L.attention.attention.{query,key,value}.* or L.attention.{q,k,v}_proj.* | blocks.i.attn.qkv.* (q, k, v concatenated on dim 0) |
| L.attention.output.dense.* or L.attention.o_proj.* | blocks.i.attn.proj.* |
| L.layernorm_before.* (ViT, DeiT) or L.norm1.* (DINOv2) | blocks.i.norm1.* |
| L.layernorm_after.* or L.norm2.* | blocks.i.norm2.* |
| L.intermediate.dense.* or L.mlp.fc1.* | blocks.i.mlp.fc1.* |
| L.output.dense.* or L.mlp.fc2.* | blocks.i.mlp.fc2.* |
| L.layer_scale1.lambda1, L.layer_scale2.lambda1 (DINOv2) | blocks.i.ls1.gamma, blocks.i.ls2.gamma |
| layernorm.* | norm.* |
| pooler.dense.* (ViTModel, DeiTModel) | dropped (no timm equivalent; classifiers do not use it) |
| classifier.*, cls_classifier.* | head.* |
| distillation_classifier.* | head_dist.* |

Choices where there is no one-to-one timm counterpart:
- DeiT without a teacher still puts its distillation token at position 1 but classifies from the
  class token alone. timm's `VisionTransformer` with one *register* token has exactly that layout
  (tokens [cls, reg, patches], position embedding over all of them, head on token 0), so the
  distillation token becomes `reg_token`. `VisionTransformerDistilled` would average in a second head.
- DINOv2's classifier reads concat(class token, mean of patch tokens); timm has no such pooling, so
  `VisionTransformerClsAvg` overrides `forward_head` with a Linear(2 * embed_dim, classes) head.
- DINOv2 interpolates its position embedding when the input size differs from `config.image_size`;
  the timm model is built for `config.image_size`, where no interpolation happens.
- Dropout and drop-path rates are not carried over: they act only in training, and uvc's own
  training sets them. Activations: GELU (exact) and its tanh approximations map to
  nn.GELU(approximate=...); anything else (quick_gelu, SwiGLU DINOv2) is refused, because uvc's
  slimmed blocks compute a GELU MLP.
"""
from __future__ import annotations

import os
import re
from functools import partial
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .adapters import register_vit_class
from .errors import UVCError
from .io import read_header, read_state_dict
from .preprocess import LABEL_NAMES
from .schema import HF_FIX, check_block_count, check_hf_config, check_shapes, read_json

MODEL_TYPES = ("vit", "deit", "dinov2")
# transformers class name -> its model_type
SUPPORTED = {
    "ViTModel": "vit", "ViTForImageClassification": "vit",
    "DeiTModel": "deit", "DeiTForImageClassification": "deit", "DeiTForImageClassificationWithTeacher": "deit",
    "Dinov2Model": "dinov2", "Dinov2ForImageClassification": "dinov2",
}
BARE_MODEL = {"vit": "ViTModel", "deit": "DeiTModel", "dinov2": "Dinov2Model"}
# transformers `hidden_act` -> nn.GELU(approximate=...); the tanh forms differ only by float rounding
GELU_APPROXIMATE = {"gelu": "none", "gelu_python": "none", "gelu_pytorch_tanh": "tanh",
                    "gelu_python_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh"}

_L = r"(?:encoder\.layer|layers)\.(\d+)\."
_WB = r"\.(weight|bias)"
KEY_MAP = [  # (regex over the whole transformers key, timm key template); None drops the tensor
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.distillation_token", "dist_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection" + _WB, r"patch_embed.proj.\1"),
    (r"embeddings\.mask_token", None),
    (_L + r"attention\.(?:attention\.query|q_proj)" + _WB, r"blocks.\1.attn.q.\2"),
    (_L + r"attention\.(?:attention\.key|k_proj)" + _WB, r"blocks.\1.attn.k.\2"),
    (_L + r"attention\.(?:attention\.value|v_proj)" + _WB, r"blocks.\1.attn.v.\2"),
    (_L + r"attention\.(?:output\.dense|o_proj)" + _WB, r"blocks.\1.attn.proj.\2"),
    (_L + r"(?:layernorm_before|norm1)" + _WB, r"blocks.\1.norm1.\2"),
    (_L + r"(?:layernorm_after|norm2)" + _WB, r"blocks.\1.norm2.\2"),
    (_L + r"(?:intermediate\.dense|mlp\.fc1)" + _WB, r"blocks.\1.mlp.fc1.\2"),
    (_L + r"(?:output\.dense|mlp\.fc2)" + _WB, r"blocks.\1.mlp.fc2.\2"),
    (_L + r"layer_scale1\.lambda1", r"blocks.\1.ls1.gamma"),
    (_L + r"layer_scale2\.lambda1", r"blocks.\1.ls2.gamma"),
    (r"layernorm" + _WB, r"norm.\1"),
    (r"pooler\.dense" + _WB, None),
    (r"(?:classifier|cls_classifier)" + _WB, r"head.\1"),
    (r"distillation_classifier" + _WB, r"head_dist.\1"),
]


@register_vit_class
class VisionTransformerClsAvg(VisionTransformer):
    """A timm ViT whose head reads concat(class token, mean of the patch tokens), as DINOv2's classifier does.

    timm has no global_pool for this, so the head is Linear(2 * embed_dim, num_classes) and
    `forward_head` builds its input. The constructor takes VisionTransformer's arguments unchanged,
    so a spec of those arguments rebuilds it; the blocks are plain timm blocks uvc can compress.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.has_class_token or self.attn_pool is not None or not isinstance(self.fc_norm, nn.Identity):
            raise UVCError("VisionTransformerClsAvg needs a class token, no attention pooling and no fc_norm")
        self.head_hidden_size = 2 * self.embed_dim
        self.reset_classifier(self.num_classes)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "token"):
            raise UVCError("VisionTransformerClsAvg pools class token + patch mean; global_pool cannot change")
        self.num_classes = num_classes
        like = dict(device=self.cls_token.device, dtype=self.cls_token.dtype)
        self.head = nn.Linear(2 * self.embed_dim, num_classes, **like) if num_classes > 0 else nn.Identity()

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.cat([x[:, 0], x[:, self.num_prefix_tokens:].mean(dim=1)], dim=-1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _timm_class_and_kwargs(hf_model: nn.Module) -> tuple[type, dict]:
    """The timm class and constructor arguments with the shape of `hf_model` (refusing what timm cannot express)."""
    from timm.models.deit import VisionTransformerDistilled

    name = type(hf_model).__name__
    config = hf_model.config
    model_type = SUPPORTED[name]
    dim, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or dim // heads
    if heads * head_dim != dim:
        raise UVCError(f"{name} has {heads} heads of width {head_dim} for hidden size {dim}; "
                       "uvc (like timm's Attention) needs heads x head width == hidden size")
    if getattr(config, "use_swiglu_ffn", False):
        raise UVCError("DINOv2 with a SwiGLU MLP (use_swiglu_ffn=True, the giant model) is not supported: "
                       "uvc prunes and slims GELU MLPs only")
    act = config.hidden_act
    if not isinstance(act, str) or act not in GELU_APPROXIMATE:
        raise UVCError(f"activation {act!r} is not supported: uvc's blocks use GELU "
                       f"(transformers hidden_act one of {', '.join(GELU_APPROXIMATE)})")
    hidden = int(dim * config.mlp_ratio) if model_type == "dinov2" else config.intermediate_size
    mlp_ratio = hidden / dim
    if int(dim * mlp_ratio) != hidden:  # timm sizes the MLP as int(dim * mlp_ratio)
        raise UVCError(f"MLP width {hidden} for hidden size {dim} cannot be expressed as a timm mlp_ratio")
    img_size = _pair(config.image_size)
    if model_type == "dinov2" and img_size[0] != img_size[1]:
        raise UVCError("DINOv2 with a non-square image_size is not supported (transformers interpolates its "
                       "position embedding for every non-square input)")

    classifiers = [getattr(hf_model, n, None) for n in ("classifier", "cls_classifier")]
    head = next((m for m in classifiers if m is not None), None)
    kwargs = dict(
        img_size=img_size, patch_size=_pair(config.patch_size), in_chans=config.num_channels,
        num_classes=head.out_features if isinstance(head, nn.Linear) else 0, global_pool="token",
        embed_dim=dim, depth=config.num_hidden_layers, num_heads=heads, mlp_ratio=mlp_ratio,
        qkv_bias=config.qkv_bias, class_token=True,
        norm_layer=partial(nn.LayerNorm, eps=config.layer_norm_eps),
        act_layer=partial(nn.GELU, approximate=GELU_APPROXIMATE[act]), weight_init="skip",
    )
    if model_type == "dinov2":
        kwargs["init_values"] = 1.0  # any value creates LayerScale; lambda1/lambda2 are copied over it
    if name == "DeiTForImageClassificationWithTeacher":
        return VisionTransformerDistilled, kwargs
    if model_type == "deit":
        return VisionTransformer, {**kwargs, "reg_tokens": 1}
    if name == "Dinov2ForImageClassification":
        return VisionTransformerClsAvg, kwargs
    return VisionTransformer, kwargs


def timm_state_dict(hf_state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Rename a transformers ViT/DeiT/DINOv2 state dict to timm keys (module docstring's table), fusing q, k, v."""
    out, unknown = {}, []
    for key, value in hf_state.items():
        short = key[len(prefix):] if prefix and key.startswith(prefix) else key
        for pattern, target in KEY_MAP:
            m = re.fullmatch(pattern, short)
            if m:
                if target is not None:
                    out[m.expand(target)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise UVCError(f"weights with no timm counterpart: {', '.join(unknown[:6])}"
                       + (f" (+{len(unknown) - 6} more)" if len(unknown) > 6 else ""))
    for key in [k for k in out if re.fullmatch(r"blocks\.\d+\.attn\.q\.(weight|bias)", k)]:
        block, kind = key.rsplit(".attn.q.", 1)
        parts = [out.pop(f"{block}.attn.{p}.{kind}") for p in "qkv"]
        out[f"{block}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    return out


def to_timm(hf_model: nn.Module) -> nn.Module:
    """The timm model that computes what `hf_model` computes (float32, eval mode); `hf_model` is not changed.

    Supported classes: see `SUPPORTED`. The result is an ordinary timm ViT that `uvc.make_compressible`,
    `uvc.slim` and `uvc.macs` accept.
    """
    name = type(hf_model).__name__
    if name not in SUPPORTED:
        raise UVCError(f"{name} is not supported; uvc converts these transformers classes: {', '.join(SUPPORTED)}")
    cls, kwargs = _timm_class_and_kwargs(hf_model)
    model = cls(**kwargs)
    prefix = getattr(hf_model, "base_model_prefix", "") + "."
    state = timm_state_dict(hf_model.state_dict(), prefix)
    if "dist_token" in state and getattr(model, "reg_token", None) is not None:
        state["reg_token"] = state.pop("dist_token")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise UVCError(f"{name} does not map onto {cls.__name__}: missing {missing[:4]}, unexpected {unexpected[:4]}, "
                       f"shape mismatches {shapes[:4]}")
    model.load_state_dict({k: v.detach().to(own[k].dtype) for k, v in state.items()})
    if model.num_classes and (names := label_names(hf_model.config, model.num_classes)):
        model.pretrained_cfg = {LABEL_NAMES: names}
    return model.eval()


def label_names(config, num_classes: int) -> tuple[str, ...] | None:
    """A classifier's class names from its `id2label`, as timm's `pretrained_cfg["label_names"]`; None when they are
    transformers' placeholders (LABEL_0, ...) or do not name every class."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    names = tuple(id2label.get(i, "") for i in range(num_classes))
    if not all(names) or all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        return None
    return names


def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder transformers' `save_pretrained` wrote (config.json, no uvc arch.json);
    `load_hf_folder` then says whether uvc converts the model in it."""
    return (Path(path) / "config.json").is_file() and not (Path(path) / "arch.json").is_file()


def _weights(folder: Path) -> tuple[Path, dict[str, tuple[int, ...]], dict | None]:
    """The weights file transformers would read, its tensors' shapes and, for a PyTorch pickle, its
    state dict (unpickled once, weights only, so transformers need not read it again)."""
    advice = "save the model again with save_pretrained"
    if (file := folder / "model.safetensors").is_file():
        return file, read_header(file, advice)[0], None
    if (file := folder / "pytorch_model.bin").is_file():
        state = read_state_dict(file)
        return file, {k: tuple(v.shape) for k, v in state.items()}, state
    raise UVCError(f"{folder} has config.json but no model.safetensors or pytorch_model.bin (sharded weights are "
                   "not read); save the model with save_pretrained into one file")


def _check_weights(source: Path, config, name: str, weights: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """config.json's sizes against the weights' shapes (transformers' layout), before anything is built."""
    shapes = {k.removeprefix(f"{config.model_type}."): v for k, v in shapes.items()}  # a classifier's base prefix
    patch, (ph, pw), (ih, iw) = "embeddings.patch_embeddings.projection.weight", _pair(config.patch_size), _pair(config.image_size)
    dim = config.hidden_size
    expected = [("hidden_size", patch, 0, dim), ("num_channels", patch, 1, config.num_channels),
                ("patch_size", patch, slice(2, 4), (ph, pw)),
                ("image_size", "embeddings.position_embeddings", 1,
                 (ih // ph) * (iw // pw) + (2 if config.model_type == "deit" else 1))]
    check_block_count(source, "num_hidden_layers", config.num_hidden_layers, shapes, weights, _L, HF_FIX)
    if config.num_hidden_layers:
        first_fc1 = _L.replace(r"(\d+)", "0") + r"(?:intermediate\.dense|mlp\.fc1)\.weight"
        fc1 = next((k for k in shapes if re.fullmatch(first_fc1, k)), "encoder.layer.0.intermediate.dense.weight")
        hidden = ("mlp_ratio", int(dim * config.mlp_ratio)) if config.model_type == "dinov2" else (
            "intermediate_size", config.intermediate_size)
        expected.append((hidden[0], fc1, 0, hidden[1]))
    if name != BARE_MODEL[config.model_type]:
        expected += [("num_labels (id2label)", key, 0, config.num_labels)
                     for key in ("classifier.weight", "cls_classifier.weight", "distillation_classifier.weight")
                     if key in shapes]
    check_shapes(source, weights, shapes, expected, HF_FIX)


def load_hf_folder(path: str | os.PathLike) -> nn.Module:
    """A local `save_pretrained` folder (never the Hub) as the equivalent timm model, via `to_timm`.

    The class is config.json's `architectures[0]` (the bare model when it names none). config.json
    and the weights' shapes are checked before transformers builds anything; a PyTorch pickle is
    read with weights_only=True.
    """
    source = Path(path) / "config.json"
    if not source.is_file():
        raise UVCError(f"{path} has no config.json; it is not a Hugging Face model folder")
    config = read_json(source, HF_FIX)
    check_hf_config(source, config)
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise UVCError(f"{path} holds a Hugging Face {model_type!r} model; uvc converts model types "
                       f"{', '.join(MODEL_TYPES)} (ViT, DeiT, DINOv2)")
    name = (config.get("architectures") or [BARE_MODEL[model_type]])[0]
    if name not in SUPPORTED or SUPPORTED[name] != model_type:
        raise UVCError(f"{path} holds a {model_type!r} {name}; uvc converts these transformers classes: "
                       f"{', '.join(SUPPORTED)}")
    try:  # optional dependency: only this function and the tests need transformers
        import transformers
    except ImportError as e:
        raise UVCError("loading a Hugging Face model folder needs transformers: pip install 'uvc[hf]'") from e
    cls = getattr(transformers, name)
    try:
        hf_config = cls.config_class.from_dict(config)
    except Exception as e:  # the config class's own checks raise what they like
        raise UVCError(f"{source} is not a valid {cls.config_class.__name__} ({type(e).__name__}); {HF_FIX}") from e
    weights, shapes, state = _weights(Path(path))
    _check_weights(source, hf_config, name, weights, shapes)
    try:
        hf_model = (cls.from_pretrained(str(path), config=hf_config, local_files_only=True) if state is None else
                    cls.from_pretrained(None, config=hf_config, state_dict=state))
    except Exception as e:  # transformers' loaders raise many types; the message may quote torch's unsafe advice
        raise UVCError(f"cannot load the Hugging Face model in {path} ({type(e).__name__}); "
                       "save the model again with save_pretrained") from e
    return to_timm(hf_model.eval())
