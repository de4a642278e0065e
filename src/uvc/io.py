"""Files: atomic writes, the safetensors weights format, and reading PyTorch checkpoints safely.

Every file is written to a temporary name in its folder and renamed into place, so a killed
process never leaves a half-written file behind. Nothing read is ever executed: safetensors holds
no code, and PyTorch pickles are unpickled with `weights_only=True`.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
from contextlib import contextmanager
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


@contextmanager
def _safetensors_errors(path: str | os.PathLike, advice: str):
    """Turn safetensors' and the OS's complaints about a torn or foreign file into one line."""
    try:
        yield
    except (SafetensorError, OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:200]
        raise UVCError(f"{path} is corrupt or not a safetensors file ({reason}); {advice}") from e


def read_header(path: str | os.PathLike, advice: str = "re-save the model") -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Each tensor's shape and the file's metadata, from a safetensors header alone: sizes can be
    checked before anything is allocated. A torn file is refused here too (its header must cover the
    whole file)."""
    with _safetensors_errors(path, advice), safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata() or {}


def read_tensors(path: str | os.PathLike, advice: str = "re-save the model") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata; refused in one line when torn, foreign, or (for files
    that carry a digest) altered since they were written. Nothing in the file is executed."""
    with _safetensors_errors(path, advice):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    digest = metadata.get(DIGEST_KEY)
    if digest is not None and digest != tensor_digest(tensors, metadata.get(STATE_KEY, "")):
        raise UVCError(f"{path} does not match the digest written with it (its bytes changed since); {advice}")
    return tensors, metadata


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, with a clear error for a torn, foreign or altered file."""
    return read_tensors(path)[0]


def read_state_dict(path: Path) -> dict:
    """A state dict from a .safetensors or a PyTorch file (timm, DeiT, T2T-ViT, transformers layouts),
    without running pickled code."""
    if not path.is_file():
        raise UVCError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            # Released training checkpoints (timm's saver, T2T-ViT, DeiT) also pickle their argparse args.
            with torch.serialization.safe_globals([argparse.Namespace]):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign file makes the unpickler raise almost anything (IndexError, KeyError, ...)
        # torch's own message advises weights_only=False, i.e. running the file's code: not advice to pass on.
        kind = "safetensors" if path.suffix == ".safetensors" else "PyTorch"
        raise UVCError(f"{path} is not a readable {kind} checkpoint ({type(e).__name__}); pass a file of weights "
                       "saved with torch.save(model.state_dict()) or safetensors") from e
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UVCError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}
