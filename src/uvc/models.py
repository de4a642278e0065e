"""Where models come from and go to: timm names, local checkpoints, the Hub, the bundled teacher,
Hugging Face folders, and uvc's own saved folders (`save` / `load`).

A saved model is a folder with `model.safetensors` (weights) and `arch.json` (the adapter's spec of
the dense skeleton plus, for a slimmed model, one entry per remaining block); `load` rebuilds it
from those two files alone.
"""
from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

import timm
import torch
from timm.models import is_model, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from . import hf, preprocess
from .adapters import adapter_for, check_supported
from .errors import UVCError
from .io import (DIGEST_KEY, atomic_write_text, ensure_writable_dir, read_state_dict, read_header, read_tensors,
                 write_weights)
from .schema import ARCH_FIX, check_arch, read_json
from .slim import ARCH_FORMAT, arch_of, build_from_arch, is_slim

ASSETS = Path(__file__).parent / "assets"
DEFAULT_TEACHER = "vit_tiny_patch7_fmnist"
TEACHER_ARGS = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=192, depth=12, num_heads=3)
WEIGHTS = "model.safetensors"
WEIGHTS_DIGEST = "weights_sha256"  # arch.json's record of the weights file it was saved with
PREPROCESSING = "pretrained_cfg"  # arch.json's optional record of the model's preprocessing (`preprocess.KEYS`)


# ---- uvc's saved folders -----------------------------------------------------------------------
def save(model: nn.Module, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
    """Write `model.safetensors` + `arch.json` into `out_dir` (created if missing).

    `dtype` (e.g. torch.float16) shrinks the weights file; `load` returns float32 either way.
    arch.json records the weights' digest, so a folder whose two files come from different saves
    (a kill between the two writes) is refused by `load` instead of loading mismatched weights.
    The preprocessing part of `model.pretrained_cfg`, when it has one, goes into arch.json too.
    """
    out = ensure_writable_dir(out_dir)
    arch = arch_of(model)
    if (preprocessing := preprocess.of_model(model, adapter_for(model).input_size(model))) is not None:
        arch[PREPROCESSING] = preprocessing
    digest = write_weights(out / WEIGHTS, model, dtype=dtype, metadata={"format": ARCH_FORMAT})
    atomic_write_text(out / "arch.json", json.dumps({**arch, WEIGHTS_DIGEST: digest}, indent=1))
    return out


def read_arch(folder: str | os.PathLike) -> dict:
    """arch.json's JSON object (checked against the weights by `load`)."""
    path = Path(folder) / "arch.json"
    if not path.is_file():
        raise UVCError(f"{folder} has no arch.json; it is not a model folder written by uvc.save")
    return read_json(path, ARCH_FIX)


def load(folder: str | os.PathLike) -> nn.Module:
    """Rebuild a model saved by `save` from its folder: float32, eval mode.

    arch.json is checked field by field and against the weights' shapes before anything is built.
    """
    arch = read_arch(folder)
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise UVCError(f"{folder} has arch.json but no {WEIGHTS}")
    shapes, metadata = read_header(path)
    recorded = arch.get(WEIGHTS_DIGEST)  # one of another type is named by check_arch
    if isinstance(recorded, str) and recorded != metadata.get(DIGEST_KEY):
        raise UVCError(f"{folder}: {WEIGHTS} and arch.json come from different saves (a save was interrupted); "
                       "save the model again")
    check_arch(Path(folder) / "arch.json", arch, path, shapes)
    tensors = read_tensors(path)[0]
    model = build_from_arch(arch)
    load_state_dict_checked(model, tensors, str(path))
    if isinstance(arch.get(PREPROCESSING), dict):
        model.pretrained_cfg = preprocess.from_json(arch[PREPROCESSING])
    return model.float().eval()


# ---- the bundled teacher -----------------------------------------------------------------------
def _register_teacher_architecture() -> None:
    """Make the default teacher's architecture a timm model name, so `timm.create_model` builds it."""
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


_register_teacher_architecture()


def default_teacher_dir() -> Path:
    return ASSETS / DEFAULT_TEACHER


def load_default_teacher() -> nn.Module:
    """The bundled Fashion-MNIST teacher, in float32."""
    folder = default_teacher_dir()
    if not (folder / "arch.json").is_file():
        raise UVCError(f"the bundled teacher is missing from {folder}; rebuild it with `uvc train-teacher`")
    return load(folder)


# ---- checkpoints -------------------------------------------------------------------------------
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


def load_checkpoint_into(model: nn.Module, path: str) -> None:
    """Local weights into a timm model; a ViT's position embeddings are resampled to its grid as timm does."""
    state = read_state_dict(Path(path))
    if isinstance(model, VisionTransformer):
        state = checkpoint_filter_fn(state, model)
    load_state_dict_checked(model, state, path)


# ---- the Hub -----------------------------------------------------------------------------------
OFFLINE_ADVICE = ("Without network access, download the weights elsewhere and pass --checkpoint PATH (timm's "
                  ".safetensors/.pth, or the original DeiT .pth holding {'model': state_dict}), or set "
                  "HF_HUB_OFFLINE=1 to use weights already in the Hugging Face cache.")


def _hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached, found within `timeout` seconds; None if it answers.

    Offline, huggingface_hub retries for about a minute before it gives up; this probe makes an
    offline `--pretrained` fail in seconds. With HF_HUB_OFFLINE set, timm reads the local cache and
    makes no request, so there is nothing to probe.
    """
    from huggingface_hub import constants, get_session  # only when asked to download: saves start-up time

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as e:  # the HTTP client (httpx or requests, by hub version) raises its own types
        return f"the Hugging Face Hub ({constants.ENDPOINT}) is not reachable ({type(e).__name__}: {e})"
    return None


def _similar_names(model: str) -> list[str]:
    """timm names close to `model`, from the family it starts with (`deit_...` -> DeiTs), else from all."""
    family = timm.list_models(f"{model.split('_')[0]}*")
    return difflib.get_close_matches(model, family, n=8, cutoff=0.5) or difflib.get_close_matches(
        model, timm.list_models(), n=8, cutoff=0.5)


def _create_timm(model: str, checkpoint: str | None, pretrained: bool, timm_kwargs: dict) -> nn.Module:
    if not timm.is_model(model):
        close = _similar_names(model)
        raise UVCError(f"unknown model {model!r}: not a timm model name nor a folder saved by uvc.save or "
                       "transformers' save_pretrained." + (f" Similar names: {', '.join(close)}" if close else ""))
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
        load_checkpoint_into(net, checkpoint)
    return net


def load_model(model: str | nn.Module | None = None, checkpoint: str | None = None, pretrained: bool = False,
               **timm_kwargs) -> nn.Module:
    """A model from a timm name, a folder written by `uvc.save` or by transformers' `save_pretrained`,
    a transformers model object, or the bundled teacher (None).

    `checkpoint` loads a local state dict (.safetensors, .pth, .pth.tar; timm or DeiT layout) into
    the named architecture; `pretrained` asks timm for released weights, which needs the network.
    `timm_kwargs` (e.g. `img_size=112`) go to `timm.create_model`.
    """
    built = isinstance(model, nn.Module) or model is None or Path(model).is_dir()
    options = [name for name, given in (("checkpoint", checkpoint), ("pretrained", pretrained), *timm_kwargs.items()) if given]
    if built and options:
        what = "the bundled teacher" if model is None else "a model object" if isinstance(model, nn.Module) else model
        raise UVCError(f"{', '.join(options)} only apply when a timm model is built by name, and {what} is built "
                       "already: drop them, or pass the timm name as --model")
    if isinstance(model, nn.Module):
        net = hf.to_timm(model) if type(model).__module__.startswith("transformers.") else model
    elif model is None or (model == DEFAULT_TEACHER and not checkpoint and not timm_kwargs):
        net = load_default_teacher()
    elif Path(model).is_dir() and hf.is_hf_folder(model):
        net = hf.load_hf_folder(model)
        if (hf_cfg := preprocess.from_hf_folder(model, adapter_for(net).input_size(net)[0])) is not None:
            net.pretrained_cfg = {**getattr(net, "pretrained_cfg", {}), **hf_cfg}  # keeps the class names
    elif Path(model).is_dir():
        net = load(model)
    elif Path(model).suffix in (".safetensors", ".pth", ".pt", ".tar"):
        raise UVCError(f"{model} is a weights file; pass the architecture as --model NAME and the file as --checkpoint {model}")
    else:
        net = _create_timm(model, checkpoint, pretrained, timm_kwargs)
    if not is_slim(net):  # a slimmed model is already uvc's own; the check is for blocks it will compress
        check_supported(net)
    return net.eval()


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
