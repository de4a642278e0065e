"""Files: atomic writes and the safetensors weights format.

Every file is written to a temporary name in its folder and renamed into place, so a killed
process never leaves a half-written file behind.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import UVCError


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


def write_weights(path: str | os.PathLike, module: nn.Module, *, dtype: torch.dtype | None = None,
                  metadata: dict[str, str] | None = None) -> None:
    """`module`'s state dict as a safetensors file, atomically; `dtype` casts the floating tensors."""
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in module.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, with a clear error for a torn or foreign file."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UVCError(f"{path} is corrupt or not a safetensors file ({e}); re-save the model") from e
