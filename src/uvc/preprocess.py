"""How a model wants its images: timm's data config (input size, mean, std, interpolation, crop).

A pretrained model is only as good as the preprocessing it was trained with, so the data pipeline
takes it from the model: timm's `pretrained_cfg`, or a Hugging Face folder's
preprocessor_config.json, under the user's overrides (timm's option names). A model saved by uvc
carries the config its data went through (arch.json's `pretrained_cfg`), so
`timm.data.resolve_data_config(model=uvc.load(folder))` prepares images as it was trained on them.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from timm.data import resolve_data_config

from .errors import UVCError

# The keys of timm's data config that describe preprocessing; the rest of a pretrained_cfg (hub ids,
# licences, URLs) describes weights that a compressed model no longer has.
KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
LABEL_NAMES = "label_names"  # timm's pretrained_cfg key for the class names, one per output of the head
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")  # what both PIL (folders) and torch (Fashion-MNIST) resize with
HF_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's codes, as Hugging Face image processors store them


def _fit_channels(values, channels: int, what: str) -> tuple[float, ...]:
    """Per-channel statistics for `channels` channels: one value is repeated, three (RGB) are averaged
    for a greyscale model."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1 and len(values) == 3:
        return (sum(values) / 3,)
    raise UVCError(f"{what} has {len(values)} values but the model takes {channels}-channel images; "
                   f"pass 1 or {channels} values")


def resolve(input_size: tuple[int, int, int], pretrained_cfg: dict | None = None, **overrides) -> dict:
    """timm's data config for a model taking `input_size` images: its `pretrained_cfg` under `overrides`
    (mean, std, interpolation, crop_pct; None keeps the model's).

    The size is the model's as built, not pretrained_cfg's: `--img-size 112` leaves a timm model's
    pretrained_cfg at the size its weights were released at.
    """
    channels = input_size[0]
    base = {k: v for k, v in (pretrained_cfg or {}).items() if k in KEYS and v is not None}
    for key in ("mean", "std"):
        if key in base:
            base[key] = _fit_channels(base[key], channels, f"the model's pretrained {key}")
        if overrides.get(key) is not None:
            overrides[key] = _fit_channels(overrides[key], channels, f"--{key}")
    args = {k: v for k, v in overrides.items() if v is not None}
    config = resolve_data_config({**args, "input_size": tuple(input_size)}, pretrained_cfg=base or None)
    config = {k: config[k] for k in KEYS}
    # timm's ImageNet default (a model without a pretrained_cfg) has three values: fitted to a greyscale model too
    config["mean"], config["std"] = (_fit_channels(config[k], channels, f"timm's default {k}") for k in ("mean", "std"))
    _check(config)
    return config


def _check(config: dict) -> None:
    """Refuse preprocessing that cannot be right, wherever it came from (a model's arch.json or
    preprocessor_config.json is as untrusted as the weights beside it): a zero std would divide by zero."""
    fix = "pass --mean, --std, --interpolation or --crop-pct to override the model's"
    for key in ("mean", "std"):
        values = config[key]
        if not all(math.isfinite(v) for v in values) or (key == "std" and min(values) <= 0):
            raise UVCError(f"the model's {key} {list(values)} is not usable ({'finite and > 0' if key == 'std' else 'finite'} "
                           f"numbers are); {fix}")
    if config["interpolation"] not in INTERPOLATIONS:
        raise UVCError(f"the model's interpolation {config['interpolation']!r} is not one of {', '.join(INTERPOLATIONS)}; {fix}")
    crop = config["crop_pct"]
    if isinstance(crop, bool) or not isinstance(crop, (int, float)) or not 0 < crop <= 1:
        raise UVCError(f"the model's crop_pct {crop!r} is outside (0, 1]; {fix}")


def of_model(model, input_size: tuple[int, int, int]) -> dict | None:
    """The preprocessing part of `model.pretrained_cfg`, at the size the model takes (None when it has none),
    and its class names when there is one per output, as plain JSON types for arch.json."""
    cfg = getattr(model, "pretrained_cfg", None)
    if not cfg:
        return None
    kept = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if k in KEYS and v is not None}
    names = cfg.get(LABEL_NAMES)
    if names is not None and len(names) == getattr(model, "num_classes", None):
        kept[LABEL_NAMES] = [str(n) for n in names]
    return {**kept, "input_size": list(input_size)}


def from_json(saved: dict) -> dict:
    """arch.json's `pretrained_cfg` back in timm's types (tuples, as timm's own configs hold them)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}


def _edge(size) -> int | None:
    """One side of a Hugging Face size entry: an int, or {"shortest_edge": n} / {"height": h, "width": w}."""
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        return size.get("shortest_edge") or size.get("height")
    return None


def from_hf_folder(folder: str | os.PathLike, channels: int) -> dict | None:
    """A `save_pretrained` folder's preprocessor_config.json as a timm pretrained_cfg (None when absent)."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return None
    try:
        hf = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UVCError(f"{path} is not readable JSON ({e}); fix or delete it") from e
    cfg = {}
    if hf.get("do_normalize", True):
        if hf.get("image_mean") is not None and hf.get("image_std") is not None:
            cfg["mean"], cfg["std"] = tuple(hf["image_mean"]), tuple(hf["image_std"])
    else:  # the model takes pixels in [0, 1] as they are
        cfg["mean"], cfg["std"] = (0.0,) * channels, (1.0,) * channels
    if hf.get("resample") in HF_RESAMPLE:
        cfg["interpolation"] = HF_RESAMPLE[hf["resample"]]
    resize, crop = _edge(hf.get("size")), _edge(hf.get("crop_size")) if hf.get("do_center_crop") else None
    if crop and resize:
        cfg["input_size"], cfg["crop_pct"] = (channels, crop, crop), crop / resize
    elif resize:
        cfg["input_size"], cfg["crop_pct"] = (channels, resize, resize), 1.0
    return cfg
