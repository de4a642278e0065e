"""Training the bundled Fashion-MNIST teacher: a DeiT-Tiny-shaped ViT trained from scratch.

`uvc train-teacher` reproduces the weights shipped in `uvc/assets/`. Resumable: a checkpoint is
written atomically after every epoch and picked up by `--resume`. `--init` starts from a teacher
saved earlier, so a second, longer schedule can continue a first one; the record of the first run is
kept inside the new `training.json`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import DataConfig, build_data
from .engine import (evaluate, load_checkpoint, make_optimizer, resolve_device, save_checkpoint,
                     seed_everything, train_epoch)
from .io import atomic_write_text, ensure_writable_dir, load, save
from .models import DEFAULT_TEACHER, TEACHER_ARGS, default_teacher_dir, load_state_dict_checked

log = logging.getLogger("uvc")


@dataclass
class TeacherConfig:
    out: str = str(default_teacher_dir())
    epochs: int = 12
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    drop_path: float = 0.05
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    init: str | None = None  # a folder written by an earlier run: start from its weights
    data: DataConfig = None

    def __post_init__(self):
        self.data = self.data or DataConfig()


def train_teacher(cfg: TeacherConfig) -> dict:
    """Train the default teacher; writes weights (fp16), arch.json and a small JSON of its accuracy."""
    from timm.models.vision_transformer import VisionTransformer

    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    out = ensure_writable_dir(cfg.out)
    data = build_data(cfg.data, seed=cfg.seed)
    model = VisionTransformer(**TEACHER_ARGS, drop_path_rate=cfg.drop_path)
    earlier = None
    if cfg.init:
        load_state_dict_checked(model, load(cfg.init).state_dict(), cfg.init,
                                advice="--init takes a teacher folder written by `uvc train-teacher`, not a slimmed model.")
        record = Path(cfg.init) / "training.json"
        earlier = json.loads(record.read_text()) if record.is_file() else None
        log.info("starting from the teacher in %s", cfg.init)
    model.to(device)
    optimizer, scheduler = make_optimizer(model, cfg.lr, cfg.weight_decay, cfg.epochs, len(data.train), cfg.warmup_epochs)
    ckpt = out / "teacher_checkpoint.pt"
    start, history = 0, []
    if cfg.resume and ckpt.is_file():
        state = load_checkpoint(ckpt)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["epoch"], state["history"]
        log.info("resumed teacher training after epoch %d", start)

    def loss_fn(m, x, y):
        return F.cross_entropy(m(x), y, label_smoothing=cfg.label_smoothing)

    for epoch in range(start, cfg.epochs):
        data.train.set_epoch(epoch)
        loss = train_epoch(model, data.train, optimizer, scheduler, loss_fn, device, epoch, "teacher epoch")
        top1 = evaluate(model, data.test, device)
        history.append({"epoch": epoch + 1, "loss": loss, "top1": top1})
        log.info("teacher epoch %d/%d: loss %.4f, test top-1 %.2f%%", epoch + 1, cfg.epochs, loss, top1)
        save_checkpoint(ckpt, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "epoch": epoch + 1, "history": history})
    model.eval()
    # Re-measure from the fp16 file actually shipped, so the stated accuracy is the bundled model's.
    save(model.cpu(), out, dtype=torch.float16)
    shipped = load(out)
    top1 = evaluate(shipped, data.test, torch.device("cpu"))
    result = {"model": DEFAULT_TEACHER, "top1": top1, "epochs": cfg.epochs, "history": history,
              "config": {k: v for k, v in asdict(cfg).items() if k != "out"}, "continues": earlier}
    atomic_write_text(Path(out) / "training.json", json.dumps(result, indent=1))
    ckpt.unlink()
    log.info("teacher written to %s: test top-1 %.2f%% (fp16 weights)", out, top1)
    return result
