"""Saving and loading compressed models, and atomic file writes.

A saved model is a folder with `model.safetensors` (weights) and `arch.json` (the adapter's spec
of the dense skeleton plus, for a slimmed model, one entry per remaining block). `load` rebuilds it
from those two files alone. Every file is written to a temporary name and renamed into place, so
a killed process never leaves a half-written file behind.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from .errors import UVCError

ARCH_FORMAT = "uvc-arch/1"
WEIGHTS = "model.safetensors"


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call `write(tmp_path)` and rename the result onto `path` (same folder, so the rename is atomic)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` if needed and prove it is writable, before any long work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UVCError(f"output folder {path} is not writable ({e.strerror}); pass --out with a folder you can write to") from e
    return path


def arch_of(model: nn.Module) -> dict:
    """The JSON description `load` needs to rebuild `model`'s skeleton."""
    from .gates import GatedBlock
    from .models import adapter_for
    from .slim import SlimBlock

    adapter = adapter_for(model)
    blocks = list(adapter.blocks(model))
    if any(isinstance(b, GatedBlock) for b in blocks):
        raise UVCError("this model is in its masked (compressible) form; call uvc.slim(model) before saving")
    layers = [b.config() for b in blocks] if blocks and all(isinstance(b, SlimBlock) for b in blocks) else None
    return {"format": ARCH_FORMAT, "model": adapter.spec(model), "layers": layers}


def build_from_arch(arch: dict) -> nn.Module:
    from .models import adapter_named
    from .slim import SlimBlock

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


def save(model: nn.Module, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
    """Write `model.safetensors` + `arch.json` into `out_dir` (created if missing).

    `dtype` (e.g. torch.float16) shrinks the weights file; `load` returns float32 either way.
    """
    out = ensure_writable_dir(out_dir)
    arch = arch_of(model)
    write_weights(out / WEIGHTS, model, dtype=dtype, metadata={"format": ARCH_FORMAT})
    atomic_write_text(out / "arch.json", json.dumps(arch, indent=1))
    return out


def write_weights(path: str | os.PathLike, module: nn.Module, *, dtype: torch.dtype | None = None,
                  metadata: dict[str, str] | None = None) -> None:
    """`module`'s state dict as a safetensors file, atomically; `dtype` casts the floating tensors."""
    from safetensors.torch import save_file

    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in module.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def read_arch(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "arch.json"
    if not path.is_file():
        raise UVCError(f"{folder} has no arch.json; it is not a model folder written by uvc.save")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UVCError(f"{path} is corrupt (invalid JSON at line {e.lineno}); re-save the model") from e


def load(folder: str | os.PathLike) -> nn.Module:
    """Rebuild a model saved by `save` from its folder: float32, eval mode."""
    from .models import load_state_dict_checked

    model = build_from_arch(read_arch(folder))
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise UVCError(f"{folder} has arch.json but no {WEIGHTS}")
    load_state_dict_checked(model, read_weights(path), str(path))
    return model.float().eval()


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, with a clear error for a torn or foreign file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UVCError(f"{path} is corrupt or not a safetensors file ({e}); re-save the model") from e
