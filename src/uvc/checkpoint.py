"""Training checkpoints that load without running code, and the settings a resume must share.

A checkpoint is one safetensors file: every tensor of the state (weights, optimizer moments, RNG
states, search state) under its own name, and everything else (run state, step counts, optimizer
hyper-parameters, Python's and numpy's RNG states) as JSON in the file's metadata. Reading it
parses JSON and copies tensors; unlike `torch.load` on a pickle, a planted file cannot run code.
A SHA-256 digest of the tensors and the JSON is stored with them and checked on load.

The checkpoint written before the newest is kept beside it (`*.prev.safetensors`), so a resume
after a kill between the two writes, or from a damaged newest file, goes on from the one before.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .errors import UVCError
from .io import STATE_KEY, read_tensors, write_tensors

log = logging.getLogger("uvc")
FORMAT = "uvc-checkpoint/1"


def _pack(value, tensors: dict[str, torch.Tensor], path: str):
    """`value` as JSON, its tensors moved into `tensors` under fresh names (tagged objects keep the types
    JSON lacks: tuples, dicts with non-string keys, numpy arrays)."""
    if torch.is_tensor(value):
        name = f"{len(tensors)}:{path}"
        tensors[name] = value
        return {"$tensor": name}
    if isinstance(value, np.ndarray):
        return {"$ndarray": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"$tuple": [_pack(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_pack(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _pack(v, tensors, f"{path}/{k}") for k, v in value.items()}
        return {"$items": [[k, _pack(v, tensors, f"{path}/{k}")] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint (at {path})")


def _unpack(value, tensors: dict[str, torch.Tensor]):
    if isinstance(value, list):
        return [_unpack(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "$tensor" in value:
        return tensors[value["$tensor"]]
    if "$ndarray" in value:
        return np.asarray(value["$ndarray"], dtype=np.dtype(value["dtype"]))
    if "$tuple" in value:
        return tuple(_unpack(v, tensors) for v in value["$tuple"])
    if "$items" in value:
        return {k: _unpack(v, tensors) for k, v in value["$items"]}
    return {k: _unpack(v, tensors) for k, v in value.items()}


def previous(path: str | os.PathLike) -> Path:
    """Where the checkpoint before `path`'s is kept."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".prev.safetensors")


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write `state` (nested dicts, lists and tuples of tensors, numbers, strings, numpy arrays) to `path`.

    The file at `path` becomes the previous checkpoint first, then the new one is written atomically:
    at every moment one complete checkpoint exists.
    """
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    text = json.dumps({"format": FORMAT, "state": _pack(state, tensors, "")})
    if path.exists():
        os.replace(path, previous(path))
    write_tensors(path, tensors, {STATE_KEY: text})


def _read(path: Path) -> dict:
    tensors, metadata = read_tensors(path, advice="delete it to start over, or pass --overwrite")
    try:
        packed = json.loads(metadata[STATE_KEY])
        if packed.get("format") != FORMAT:
            raise ValueError(f"format {packed.get('format')!r}")
        return _unpack(packed["state"], tensors)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise UVCError(f"{path} is not a uvc checkpoint ({type(e).__name__}: {e}); delete it to start over, "
                       "or pass --overwrite") from e


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The newest intact checkpoint at `path` (tensors on the CPU), else the one kept before it.

    Raises UVCError, in one line, when neither is intact.
    """
    path, kept = Path(path), previous(path)
    if not path.exists() and kept.exists():
        log.warning("%s is missing (the run was stopped while writing it); resuming from %s", path.name, kept.name)
        return _read(kept)
    try:
        return _read(path)
    except UVCError as e:
        if not kept.exists():
            raise
        log.warning("%s; resuming from the checkpoint before it, %s", e, kept.name)
        return _read(kept)


def load_for_resume(path: str | os.PathLike, settings: dict) -> dict:
    """`load_checkpoint`, refused in one line unless it was written by a run with these `settings`."""
    state = load_checkpoint(path)
    saved = state.get("settings") if isinstance(state, dict) else None
    if not isinstance(saved, dict):
        raise UVCError(f"{path} holds no run settings, so it is not a checkpoint uvc wrote; delete it to start over, "
                       "or pass --overwrite")
    if changed := changed_settings(saved, settings):
        raise UVCError(f"{path} belongs to a run with other settings ({'; '.join(changed)}): resume with that run's "
                       "settings, or pass another --out (or --overwrite to discard it)")
    return state


@contextlib.contextmanager
def restoring(path: str | os.PathLike) -> Iterator[None]:
    """Turn a checkpoint whose contents do not fit this run (missing or misshapen entries) into one line."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UVCError(f"{path} does not fit this run ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r}); "
                       "delete it to start over, or pass --overwrite") from e


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Delete a finished run's checkpoint and the one kept before it."""
    for p in (Path(path), previous(path)):
        p.unlink(missing_ok=True)


def checkpoint_exists(path: str | os.PathLike) -> bool:
    return Path(path).exists() or previous(path).exists()


def changed_settings(saved: dict, now: dict) -> list[str]:
    """`name: saved -> now` for every setting that differs between a checkpoint's run and this one."""
    return [f"{k}: {saved.get(k, '(unset)')} -> {now.get(k, '(unset)')}" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)]


def flat_settings(config: dict, ignore: frozenset[str] = frozenset(), prefix: str = "") -> dict:
    """A nested config (`dataclasses.asdict`) as {"dotted.name": value}, JSON-comparable, less `ignore`."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if name in ignore:
            continue
        if isinstance(value, dict):
            flat.update(flat_settings(value, ignore, f"{name}."))
        else:
            flat[name] = json.loads(json.dumps(value, default=str))
    return flat
