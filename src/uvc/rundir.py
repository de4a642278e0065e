"""A run's output folder: nothing in it is replaced unless asked, and no two runs write it at once.

Like git refusing to overwrite uncommitted work, a run refuses an `--out` that holds an earlier
run's results or an unfinished run's checkpoint, unless `--resume` (continue it) or `--overwrite`
(replace it) says what to do, and refuses an `--out` that is, or lies inside, one of its own inputs.
While it runs, an advisory lock (`flock`, released by the kernel even on `kill -9`) stops a second
process from writing the same folder.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Iterable, Iterator

from .checkpoint import checkpoint_exists
from .errors import UVCError

LOCK = ".uvc.lock"
RESULT_FILES = ("model.safetensors", "arch.json", "report.json", "training.json")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_dir(out: str | os.PathLike, *, checkpoints: Iterable[str], resume: bool, overwrite: bool,
                     inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Refuse, before any work starts and without creating anything, an `out` that this run may not write.

    `checkpoints` are the names of the run's checkpoint files; `inputs` the files and folders it reads:
    `out` may be neither inside an input folder nor the folder of an input file. Returns `out` as a Path.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UVCError(f"--out {out} is a file, not a folder; pass a folder path for the results")
    where = out.resolve()
    for given in inputs:
        if given is None or not Path(given).exists():
            continue
        source = Path(given).resolve()
        if _inside(where, source) if source.is_dir() else where == source.parent:
            raise UVCError(f"--out {out} is inside {given}, which this run reads; writing there could replace "
                           "its files: pass an --out outside it")
    if out.is_dir():
        legacy = sorted(p.name for p in out.glob("*checkpoint.pt"))
        if legacy and not overwrite:
            raise UVCError(f"{out / legacy[0]} is a pickled checkpoint of an older uvc, which is not read (loading it "
                           "could run code in it): delete it, or pass --overwrite to start over")
        unfinished = [n for n in checkpoints if checkpoint_exists(out / n)]
        results = [n for n in RESULT_FILES if (out / n).exists()]
        if not overwrite and unfinished and not resume:
            raise UVCError(f"{out} holds the checkpoint of an unfinished run ({unfinished[0]}): pass --resume to "
                           "continue it, or --overwrite to discard it and start over")
        if not overwrite and results and not unfinished:
            what = "it has finished, so there is nothing to resume" if resume else "they would be replaced"
            raise UVCError(f"{out} holds the results of an earlier run ({', '.join(results)}); {what}: pass "
                           "another --out, or --overwrite to replace them")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise UVCError(f"cannot create --out {out}: {existing} is a file, not a folder; pass another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UVCError(f"cannot write to {existing} (permission denied); pass an --out you can write to")
    return out


@contextlib.contextmanager
def claimed(out: Path) -> Iterator[Path]:
    """Create `out` if needed and hold its lock while the body runs.

    A second process gets a UVCError naming the holder. A folder this call created is removed again
    if the body fails before writing anything into it.
    """
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        raise UVCError(f"another uvc process (pid {holder}) is writing to {out}; wait for it to end, or pass "
                       "another --out") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield out
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)
        if created and not any(out.iterdir()):
            out.rmdir()
