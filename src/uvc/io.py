"""Files: atomic writes and the safetensors weights format.

Every file is written to a temporary name in its folder and renamed into place, so a killed
process never leaves a half-written file behind.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
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


DIGEST_KEY = "sha256"  # safetensors metadata: the digest of the file's tensors (`tensor_digest`)
STATE_KEY = "uvc-state"  # safetensors metadata: a checkpoint's JSON part, covered by the digest too


def tensor_digest(tensors: dict[str, torch.Tensor], extra: str = "") -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes of `tensors` (in name order), and `extra`.

    safetensors checks a file's layout but not its bytes: a flipped block inside a tensor loads
    silently. The digest, stored in the file's own metadata, makes such damage visible on load.
    """
    h = hashlib.sha256(extra.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> str:
    """`tensors` as a safetensors file, atomically, with their digest in its metadata; returns the digest."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = dict(metadata or {})
    metadata[DIGEST_KEY] = tensor_digest(tensors, metadata.get(STATE_KEY, ""))
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return metadata[DIGEST_KEY]


def write_weights(path: str | os.PathLike, module: nn.Module, *, dtype: torch.dtype | None = None,
                  metadata: dict[str, str] | None = None) -> str:
    """`module`'s state dict as a safetensors file, atomically; `dtype` casts the floating tensors.
    Returns the digest stored in the file."""
    state = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in module.state_dict().items()}
    return write_tensors(path, state, metadata)


def read_tensors(path: str | os.PathLike, advice: str = "re-save the model") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata; refused in one line when torn, foreign, or (for files
    that carry a digest) altered since they were written. Nothing in the file is executed."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:200]
        raise UVCError(f"{path} is corrupt or not a safetensors file ({reason}); {advice}") from e
    digest = metadata.get(DIGEST_KEY)
    if digest is not None and digest != tensor_digest(tensors, metadata.get(STATE_KEY, "")):
        raise UVCError(f"{path} does not match the digest written with it (its bytes changed since); {advice}")
    return tensors, metadata


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, with a clear error for a torn, foreign or altered file."""
    return read_tensors(path)[0]
