"""Training the bundled Fashion-MNIST teacher: a DeiT-Tiny-shaped ViT trained from scratch.

`uvc train-teacher` reproduces the weights shipped in `uvc/assets/`. Resumable: a checkpoint is
written atomically after every epoch and picked up by `--resume`. `--init` starts from a teacher
saved earlier, so a second, longer schedule can continue a first one; the record of the first run is
kept inside the new `training.json`.

`--tutor-epochs N` follows DeiT (Touvron et al. 2021): a small convnet is trained first and its
hard predictions are distilled into the ViT. Convolutions carry the locality prior that a ViT
seeing 16 patches of a 28x28 image lacks, and the tutor's labels pass it on. The tutor is a training
aid: it is kept beside the teacher (`tutor.safetensors`) so that a later run can reuse it with
`--tutor-from`, and its accuracy is recorded in `training.json`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .checkpoint import checkpoint_exists, flat_settings, load_for_resume, remove_checkpoint, restoring, save_checkpoint
from .data import DataConfig, build_data
from .distill import KDConfig, distillation_loss
from .engine import Schedule, evaluate, make_optimizer, resolve_device, seed_everything, train_epoch
from .errors import UVCError, check_finite
from .io import atomic_write_text, read_weights, tensor_digest, write_weights
from .models import DEFAULT_TEACHER, TEACHER_ARGS, default_teacher_dir, load, load_state_dict_checked, save
from .rundir import check_output_dir, claimed

log = logging.getLogger("uvc")
TUTOR_WEIGHTS = "tutor.safetensors"
CHECKPOINTS = {"teacher": "teacher_checkpoint.safetensors", "tutor": "tutor_checkpoint.safetensors"}
FLAGS = {"schedule.epochs": "--epochs", "schedule.lr": "--lr", "schedule.warmup_epochs": "--warmup-epochs",
         "tutor.lr": "--tutor-lr", "tutor_alpha": "--tutor-alpha", "drop_path": "--drop-path"}
# Settings a resume may change: they cannot change the weights trained.
RESULT_NEUTRAL = frozenset({"out", "resume", "overwrite", "data.workers", "data.eval_batch_size"})


@dataclass
class TeacherConfig:
    """`uvc train-teacher`: the ViT's schedule and, optionally, a convnet tutor's (epochs 0: no tutor)."""

    out: str = str(default_teacher_dir())
    schedule: Schedule = field(default_factory=lambda: Schedule(epochs=12, lr=1e-3, weight_decay=0.05, warmup_epochs=1.0))
    label_smoothing: float = 0.1
    drop_path: float = 0.05
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False  # replace an earlier run's teacher or checkpoints in `out`
    init: str | None = None  # a folder written by an earlier run: start from its weights
    tutor: Schedule = field(default_factory=lambda: Schedule(epochs=0, lr=2e-3, weight_decay=0.05, warmup_epochs=1.0))
    tutor_alpha: float = 0.5  # weight of the tutor's hard labels; the rest goes to the true labels
    tutor_from: str | None = None  # a folder of an earlier run with a tutor: reuse that tutor, train none
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> None:
        check_finite(self, FLAGS)
        if not 0 <= self.drop_path < 1:
            raise UVCError(f"--drop-path must be in [0, 1), got {self.drop_path}")
        self.schedule.validate("teacher", allow_zero=False)
        self.tutor.validate("tutor")
        self.data.validate()
        if self.tutor_from and self.tutor.epochs:
            raise UVCError("--tutor-from reuses a trained tutor and --tutor-epochs trains a new one; pass only one")
        if not 0 <= self.tutor_alpha <= 1:
            raise UVCError(f"--tutor-alpha must be in [0, 1], got {self.tutor_alpha}")


class ConvTutor(nn.Module):
    """A VGG-style convnet for small greyscale images: five 3x3 conv-BN-ReLU layers, two poolings."""

    def __init__(self, in_chans: int = TEACHER_ARGS["in_chans"], num_classes: int = TEACHER_ARGS["num_classes"],
                 width: int = 32):
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = width
        self.features = nn.Sequential(*conv(in_chans, w), *conv(w, w), nn.MaxPool2d(2),
                                      *conv(w, 2 * w), *conv(2 * w, 2 * w), nn.MaxPool2d(2),
                                      *conv(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _fit(model: nn.Module, data, device: torch.device, loss_fn, schedule: Schedule, resume: bool,
         ckpt: Path, name: str, batch_size: int, settings: dict) -> list[dict]:
    """Train `model` on `schedule` with an atomic checkpoint per epoch; returns the per-epoch history.

    The checkpoint is left in place (the caller removes it once everything is written), so that
    `--resume` after a kill in a later phase skips this one. A resume must have the same `settings`.
    """
    optimizer, scheduler = make_optimizer(model, schedule, len(data.train), batch_size)
    start, history, epochs = 0, [], int(schedule.epochs)
    settings = {**settings, f"initial weights of the {name}": tensor_digest(model.state_dict())}
    if resume and checkpoint_exists(ckpt):
        state = load_for_resume(ckpt, settings)
        with restoring(ckpt):
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start, history = int(state["epoch"]), list(state["history"])
        log.info("resumed %s training after epoch %d", name, start)
    for epoch in range(start, epochs):
        data.train.set_epoch(epoch)
        loss = train_epoch(model, data.train, optimizer, scheduler, loss_fn, device, epoch, f"{name} epoch")
        top1 = evaluate(model, data.val, device)
        history.append({"epoch": epoch + 1, "loss": loss, "top1_val": top1})
        log.info("%s epoch %d/%d: loss %.4f, validation top-1 %.2f%%", name, epoch + 1, epochs, loss, top1)
        save_checkpoint(ckpt, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "epoch": epoch + 1, "history": history, "settings": settings})
    return history


def _reuse_tutor(folder: str) -> tuple[ConvTutor, dict]:
    """The tutor an earlier run kept in `folder`, and that run's record of it."""
    path = Path(folder) / TUTOR_WEIGHTS
    if not path.is_file():
        raise UVCError(f"{folder} holds no {TUTOR_WEIGHTS}; --tutor-from takes the output folder of a "
                       "`uvc train-teacher --tutor-epochs N` run")
    tutor = ConvTutor()
    load_state_dict_checked(tutor, read_weights(path), str(path), advice="Retrain the tutor with --tutor-epochs.")
    log.info("reusing the tutor in %s", folder)
    return tutor, {**((_training_record(folder) or {}).get("tutor") or {}), "from": str(folder)}


def _training_record(folder: str) -> dict | None:
    """The `training.json` an earlier run wrote into `folder`, if it did."""
    record = Path(folder) / "training.json"
    return json.loads(record.read_text()) if record.is_file() else None


def train_teacher(cfg: TeacherConfig) -> dict:
    """Train the default teacher (after or with a convnet tutor, if asked); writes weights (fp16),
    arch.json, a JSON record of its accuracy and, with a tutor, `tutor.safetensors`.

    Per-epoch figures are on the validation split; the test split is read once, from the saved file.
    """
    cfg.validate()
    out = check_output_dir(cfg.out, checkpoints=CHECKPOINTS.values(), resume=cfg.resume, overwrite=cfg.overwrite,
                           inputs=[cfg.init, cfg.tutor_from, cfg.data.root])
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    data = build_data(cfg.data, seed=cfg.seed)
    with claimed(out):
        if cfg.overwrite and not cfg.resume:
            for name in CHECKPOINTS.values():
                remove_checkpoint(out / name)
        return _train(cfg, out, data, device)


def _train(cfg: TeacherConfig, out: Path, data, device: torch.device) -> dict:
    """`train_teacher`'s work, in an `out` this process holds."""
    settings = flat_settings(asdict(cfg), RESULT_NEUTRAL)
    model = VisionTransformer(**TEACHER_ARGS, drop_path_rate=cfg.drop_path)
    earlier = None
    if cfg.init:
        load_state_dict_checked(model, load(cfg.init).state_dict(), cfg.init,
                                advice="--init takes a teacher folder written by `uvc train-teacher`, not a slimmed model.")
        earlier = _training_record(cfg.init)
        log.info("starting from the teacher in %s", cfg.init)
    model.to(device)
    checkpoints = [out / CHECKPOINTS["teacher"]]
    tutor, tutor_record = None, None
    if cfg.tutor_from:
        tutor, tutor_record = _reuse_tutor(cfg.tutor_from)
    elif cfg.tutor.epochs > 0:
        tutor = ConvTutor()
        checkpoints.append(out / CHECKPOINTS["tutor"])

        def tutor_loss(m, x, y):
            return F.cross_entropy(m(x), y, label_smoothing=cfg.label_smoothing)

        tutor_history = _fit(tutor.to(device), data, device, tutor_loss, cfg.tutor, cfg.resume, checkpoints[1], "tutor",
                             cfg.data.batch_size, settings)
        tutor_record = {"epochs": cfg.tutor.epochs, "top1_val": tutor_history[-1]["top1_val"], "history": tutor_history}
    if tutor is not None:
        write_weights(out / TUTOR_WEIGHTS, tutor.to(device).eval())
    kd = KDConfig(kind="hard" if tutor is not None else "none", alpha=cfg.tutor_alpha)

    def loss_fn(m, x, y):
        with torch.no_grad():
            tutor_logits = tutor(x) if tutor is not None else None
        return distillation_loss(m(x), y, tutor_logits, kd, cfg.label_smoothing)

    history = _fit(model, data, device, loss_fn, cfg.schedule, cfg.resume, checkpoints[0], "teacher", cfg.data.batch_size,
                   settings)
    model.eval()
    # Re-measure from the fp16 file actually shipped, so the stated accuracy is the bundled model's.
    save(model.cpu(), out, dtype=torch.float16)
    shipped = load(out)
    top1 = evaluate(shipped, data.test, torch.device("cpu"))
    top1_val = evaluate(shipped, data.val, torch.device("cpu"))
    result = {"model": DEFAULT_TEACHER, "top1": top1, "top1_val": top1_val, "epochs": cfg.schedule.epochs,
              "history": history,
              "config": {k: v for k, v in asdict(cfg).items() if k != "out"}, "tutor": tutor_record,
              "continues": earlier}
    atomic_write_text(Path(out) / "training.json", json.dumps(result, indent=1))
    for ckpt in checkpoints:
        remove_checkpoint(ckpt)
    log.info("teacher written to %s: test top-1 %.2f%% (fp16 weights)", out, top1)
    return result
