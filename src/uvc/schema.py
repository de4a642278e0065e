"""What a model folder's JSON may say, checked before anything is built from it.

arch.json (written by `uvc.save`) and a transformers config.json decide what gets allocated: a
damaged or hostile one could ask for a billion blocks, or put a string where a size belongs and
fail deep inside a constructor. Each field is checked here for its type and against bounds far
beyond any released ViT, and the sizes against the tensor shapes in the weights file's header
(nothing is loaded), so every problem is one line naming the file, the field and the fix.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .adapters import ACTIVATIONS, VIT_CLASSES
from .errors import UVCError
from .slim import ARCH_FORMAT

MAX_JSON_BYTES = 16 << 20  # a model description is kilobytes; ImageNet-21k's label names make a megabyte
LIMITS = {  # field: (lowest, highest) value, or for an object its number of entries
    "img_size": (1, 8192), "image_size": (1, 8192), "patch_size": (1, 8192),
    "in_chans": (1, 1024), "num_channels": (1, 1024),
    "num_classes": (0, 1_000_000), "num_labels": (0, 1_000_000), "id2label": (0, 1_000_000), "label2id": (0, 1_000_000),
    "embed_dim": (1, 65536), "hidden_size": (1, 65536), "dim": (1, 65536), "token_dim": (1, 65536),
    "depth": (0, 1024), "num_hidden_layers": (0, 1024),
    "num_heads": (1, 65536), "num_attention_heads": (1, 65536), "heads": (0, 65536),
    "head_dim": (0, 65536), "hidden": (0, 1 << 22), "intermediate_size": (1, 1 << 22), "mlp_ratio": (1e-3, 64.0),
    "reg_tokens": (0, 1024), "init_values": (-1e6, 1e6), "layerscale_value": (-1e6, 1e6), "scale": (1e-9, 1e6),
    "norm_eps": (0.0, 1.0), "embed_norm_eps": (0.0, 1.0), "layer_norm_eps": (0.0, 1.0),
    "hidden_dropout_prob": (0.0, 1.0), "attention_probs_dropout_prob": (0.0, 1.0), "drop_path_rate": (0.0, 1.0),
}
# Kinds of value; a tuple or dict instead lists the strings allowed.
INT, REAL, BOOL, TEXT, OBJECT = "an integer", "a number", "true or false", "a string", "a JSON object"
PAIR, SIZE, NAMES = "a list of two integers", "an integer or a list of two integers", "a list of strings"
OBJECTS = "a list of objects"
NULLABLE = {"init_values", "act", "embed_norm_eps", "layers"}

ARCH_FIX = "arch.json is written by uvc.save: restore the one saved with these weights, or save the model again"
HF_FIX = ("config.json is written by transformers' save_pretrained: restore the one saved with these weights, "
          "or save the model again")

ARCH = {"format": (ARCH_FORMAT,), "model": OBJECT, "layers": OBJECTS, "weights_sha256": TEXT,
        "pretrained_cfg": OBJECT}  # the last: how the model's images are prepared (preprocess.py checks it)
VIT_SPEC = {"adapter": TEXT, "class": VIT_CLASSES, "kwargs": OBJECT, "norm_eps": REAL, "embed_norm_eps": REAL,
            "act": ACTIVATIONS}
VIT_KWARGS = {
    "img_size": PAIR, "patch_size": PAIR, "in_chans": INT, "num_classes": INT, "embed_dim": INT, "depth": INT,
    "global_pool": ("", "token", "avg", "avgmax", "max"), "class_token": BOOL, "no_embed_class": BOOL,
    "reg_tokens": INT, "pre_norm": BOOL, "final_norm": BOOL, "fc_norm": BOOL, "pos_embed": ("learn", "none"),
    "pool_include_prefix": BOOL, "dynamic_img_size": BOOL, "dynamic_img_pad": BOOL, "num_heads": INT,
    "mlp_ratio": REAL, "qkv_bias": BOOL, "proj_bias": BOOL, "init_values": REAL,
}
T2T_SPEC = {"adapter": TEXT, "kwargs": OBJECT}
T2T_KWARGS = {"img_size": PAIR, "in_chans": INT, "num_classes": INT, "tokens_type": ("performer", "transformer"),
              "embed_dim": INT, "depth": INT, "num_heads": INT, "mlp_ratio": REAL, "token_dim": INT}
DISTILLATION_TOKENS = {"VisionTransformerDistilled": 1}  # tokens a ViT class adds after the class token
SPECS = {"timm-vit": (VIT_SPEC, VIT_KWARGS), "t2t-vit": (T2T_SPEC, T2T_KWARGS)}  # adapter: (model, kwargs)
LAYER = {"dim": INT, "heads": INT, "head_dim": INT, "hidden": INT, "scale": REAL, "norm_eps": REAL, "qkv_bias": BOOL,
         "proj_bias": BOOL, "mlp_bias": BOOL, "layer_scale": BOOL, "act": ACTIVATIONS}
# The transformers config fields uvc reads or that size the model; others are transformers' business.
HF_CONFIG = {
    "model_type": TEXT, "architectures": NAMES, "hidden_size": INT, "num_hidden_layers": INT,
    "num_attention_heads": INT, "head_dim": INT, "intermediate_size": INT, "mlp_ratio": REAL, "image_size": SIZE,
    "patch_size": SIZE, "num_channels": INT, "layer_norm_eps": REAL, "qkv_bias": BOOL, "hidden_act": TEXT,
    "use_swiglu_ffn": BOOL, "layerscale_value": REAL, "num_labels": INT, "id2label": OBJECT, "label2id": OBJECT,
    "hidden_dropout_prob": REAL, "attention_probs_dropout_prob": REAL, "drop_path_rate": REAL,
}


def read_json(path: Path, fix: str) -> dict:
    """The JSON object in `path`; a file too large, not text, not JSON or not an object is one line with `fix`."""
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise UVCError(f"{path} is {size} bytes, more than a model description can be ({MAX_JSON_BYTES}); {fix}")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError for binary, JSONDecodeError, absurd nesting
        where = f" (line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ""
        raise UVCError(f"{path} is corrupt: not JSON text{where}; {fix}") from e
    if not isinstance(data, dict):
        raise UVCError(f"{path} is corrupt: {_kind_of(data)} where a JSON object belongs; {fix}")
    return data


def _kind_of(value) -> str:
    names = {bool: "true/false", int: "a number", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _problem(field: str, kind, value) -> str | None:
    """What is wrong with `value` as `field` of kind `kind`, in words; None when it fits."""
    if value is None:
        return None if field in NULLABLE else "is null"
    if isinstance(kind, (tuple, dict)):
        if isinstance(value, str) and value in kind:
            return None
        return f"is {json.dumps(value)[:40]}, not one of {', '.join(map(repr, kind))}"
    if kind in (BOOL, TEXT, OBJECT, NAMES, OBJECTS):
        fits = {BOOL: isinstance(value, bool), TEXT: isinstance(value, str), OBJECT: isinstance(value, dict),
                NAMES: isinstance(value, list) and all(isinstance(v, str) for v in value),
                OBJECTS: isinstance(value, list) and all(isinstance(v, dict) for v in value)}[kind]
        if not fits:
            return f"is {_kind_of(value)}, not {kind}"
        if kind == OBJECT and field in LIMITS and len(value) > LIMITS[field][1]:
            return f"has {len(value)} entries, more than {LIMITS[field][1]}"
        return None
    numbers = value if kind == PAIR or (kind == SIZE and isinstance(value, list)) else [value]
    if kind in (PAIR, SIZE) and isinstance(value, list) and len(value) != 2:
        return f"is a list of {len(value)}, not {kind}"
    for v in numbers:
        whole = isinstance(v, int) and not isinstance(v, bool)
        if not (whole or (kind == REAL and isinstance(v, float))):
            return f"is {_kind_of(v)}, not {kind}"
        low, high = LIMITS[field]
        if not low <= v <= high:  # NaN fails both comparisons
            return f"is {v}, outside [{low}, {high}]"
    return None


def check_fields(source: Path, where: str, obj: dict, table: dict, fix: str, required=(), strict: bool = True) -> None:
    """Every field of `obj` (found at `where` in `source`) of its kind and within LIMITS; `strict` also
    refuses fields the table does not know, since they would reach a constructor."""
    unknown = sorted(set(obj) - set(table))
    if strict and unknown:
        raise UVCError(f"{source}: unknown field {where}{unknown[0]} (known: {', '.join(table)}); {fix}")
    for field in required:
        if field not in obj:
            raise UVCError(f"{source}: field {where}{field} is missing; {fix}")
    for field, kind in table.items():
        if field in obj and (problem := _problem(field, kind, obj[field])):
            raise UVCError(f"{source}: field {where}{field} {problem}; {fix}")


def check_arch(source: Path, arch: dict, weights: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """arch.json's fields (types, bounds) and its sizes against the shapes of the weights saved with it."""
    check_fields(source, "", arch, ARCH, ARCH_FIX, required=("format", "model"))
    spec, layers = arch["model"], arch.get("layers")
    adapter = spec.get("adapter")
    if (problem := _problem("adapter", tuple(SPECS), adapter)):
        raise UVCError(f"{source}: field model.adapter {problem}; {ARCH_FIX}")
    vit = adapter == "timm-vit"
    spec_table, kwargs_table = SPECS[adapter]
    check_fields(source, "model.", spec, spec_table, ARCH_FIX, required=("class", "kwargs") if vit else ("kwargs",))
    kwargs = spec["kwargs"]
    dense = ("num_heads", "mlp_ratio") if layers is None and kwargs.get("depth") else ()
    needed = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth") if vit else tuple(T2T_KWARGS)
    check_fields(source, "model.kwargs.", kwargs, kwargs_table, ARCH_FIX, required=needed + dense)
    for i, layer in enumerate(layers or []):
        check_fields(source, f"layers[{i}].", layer, LAYER, ARCH_FIX, required=tuple(LAYER))
    dim = kwargs["embed_dim"]
    if layers is None and kwargs["depth"] and dim % kwargs["num_heads"]:
        raise UVCError(f"{source}: field model.kwargs.num_heads ({kwargs['num_heads']}) does not divide "
                       f"model.kwargs.embed_dim ({dim}); {ARCH_FIX}")
    names = arch.get("pretrained_cfg", {}).get("label_names")
    if names is not None and (not isinstance(names, list) or len(names) != kwargs["num_classes"]
                              or not all(isinstance(n, str) for n in names)):
        raise UVCError(f"{source}: field pretrained_cfg.label_names must be a list of {kwargs['num_classes']} strings, "
                       f"one per class (model.kwargs.num_classes); {ARCH_FIX}")
    expected = [("model.kwargs.num_classes", "head.weight", 0, kwargs["num_classes"])] if kwargs["num_classes"] else []
    if vit:
        (h, w), (ph, pw) = kwargs["img_size"], kwargs["patch_size"]
        prefix = kwargs.get("class_token", True) + kwargs.get("reg_tokens", 0) + DISTILLATION_TOKENS.get(spec["class"], 0)
        prefix = 0 if kwargs.get("no_embed_class") else prefix
        expected += [("model.kwargs.embed_dim", "patch_embed.proj.weight", 0, dim),
                     ("model.kwargs.in_chans", "patch_embed.proj.weight", 1, kwargs["in_chans"]),
                     ("model.kwargs.patch_size", "patch_embed.proj.weight", slice(2, 4), (ph, pw))]
        if kwargs.get("pos_embed", "learn") == "learn":
            expected.append(("model.kwargs.img_size", "pos_embed", 1, (h // ph) * (w // pw) + prefix))
    else:
        expected.append(("model.kwargs.embed_dim", "cls_token", 2, dim))
    if layers is None:
        check_block_count(source, "model.kwargs.depth", kwargs["depth"], shapes, weights, r"blocks\.(\d+)\.", ARCH_FIX)
        if kwargs["depth"]:
            expected.append(("model.kwargs.mlp_ratio", "blocks.0.mlp.fc1.weight", 0, int(dim * kwargs["mlp_ratio"])))
    else:
        check_block_count(source, "layers", len(layers), shapes, weights, r"blocks\.(\d+)\.", ARCH_FIX)
        for i, c in enumerate(layers):
            if c["heads"] and c["head_dim"]:
                expected += [(f"layers[{i}].heads x head_dim", f"blocks.{i}.attn.qkv.weight", 0, 3 * c["heads"] * c["head_dim"]),
                             (f"layers[{i}].dim", f"blocks.{i}.attn.qkv.weight", 1, c["dim"])]
            if c["hidden"]:
                expected += [(f"layers[{i}].hidden", f"blocks.{i}.mlp.fc1.weight", 0, c["hidden"]),
                             (f"layers[{i}].dim", f"blocks.{i}.mlp.fc1.weight", 1, c["dim"])]
    check_shapes(source, weights, shapes, expected, ARCH_FIX)


def check_block_count(source: Path, field: str, count: int, shapes: dict, weights: Path, pattern: str, fix: str) -> None:
    """`field` says `count` blocks; the weights' keys (block index = `pattern`'s group) must hold blocks 0..count-1."""
    found = {int(m.group(1)) for key in shapes if (m := re.match(pattern, key))}
    if found != set(range(count)):
        held = f"blocks 0-{max(found)}" if found == set(range(len(found))) and found else f"{len(found)} blocks"
        raise UVCError(f"{source}: field {field} says {count} blocks, but {weights} holds {held}; {fix}")


def check_shapes(source: Path, weights: Path, shapes: dict, expected: list, fix: str) -> None:
    """Each (field, tensor, axis, size) of `expected`: the tensor in `weights` has that size on that axis."""
    for field, key, axis, size in expected:
        shape = shapes.get(key)
        if shape is None:
            raise UVCError(f"{source}: field {field} needs the tensor {key}, which {weights} lacks; {fix}")
        found = tuple(shape[axis]) if isinstance(axis, slice) else shape[axis] if axis < len(shape) else None
        if found != size:
            raise UVCError(f"{source}: field {field} gives {key} size {size}, but {weights} holds it with "
                           f"shape {tuple(shape)}; {fix}")


def check_hf_config(source: Path, config: dict) -> None:
    """The transformers config fields that size the model or that uvc reads, before transformers builds anything."""
    check_fields(source, "", config, HF_CONFIG, HF_FIX, strict=False)
