"""`uvc.compress`: search under a budget, slim, post-train with distillation, measure, report.

Phases, each resumable from an atomic checkpoint written at every epoch boundary (and every
`checkpoint_every` steps): search (primal-dual over weights, ratios, gates and duals) -> hard
decisions fitted to the budget -> physical slimming (by default of the input model's weights at the
searched plan, refitted by least squares: `SearchConfig.end`) -> post-training of the slimmed model with KD.
Monitoring reads the validation split; the test split is read once, at the end. The reported
accuracy and MACs are those of the slimmed model that is saved.

Under torchrun the weights train with DistributedDataParallel and the search state stays identical
on every rank (distributed.py says how); rank 0 alone writes checkpoints, the model and the report.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import distributed
from .adapters import adapter_for
from .backbone import drop_head, feature_cosine, is_backbone
from .budget import check_budget, plan_ratio
from .checkpoint import (checkpoint_exists, flat_settings, load_for_resume, remove_checkpoint, restoring,
                         save_checkpoint)
from .compensate import compensate, compensate_masked
from .data import DataConfig, build_data
from .distill import KDConfig, distillation_loss, feature_distillation_loss, features_of
from .engine import (Schedule, autocast, evaluate, make_optimizer, model_dtype, optimizer_step,
                     predict_logits, progress, resolve_device, seed_everything)
from .errors import UVCError, check_finite
from .flops import check_resource, count, macs, skeleton_of
from .gates import make_compressible
from .io import atomic_write_text, tensor_digest
from .latency import LatencyConfig, fit_measured, latency_model, measured_ratio, table_for
from .models import DEFAULT_TEACHER, default_teacher_dir, load_model, param_count, save
from .oneshot import budget_plan, group_importance, one_shot, take_images
from .plan import LayerPlan
from .preprocess import LABEL_NAMES
from .presets import apply_preset
from .resource import RESOURCES
from .report import outcome, percent, speed_text, write_report
from .rundir import check_output_dir, claimed
from .schema import check_arch
from .search import Search, SearchConfig, fade_at
from .slim import arch_of, build_from_arch, slim
from .transfer import fit_head, linear_probe, predicts

log = logging.getLogger("uvc")
CHECKPOINT = "checkpoint.safetensors"
# Settings that cannot change what a run computes: a resume may change them (every other setting must match).
RESULT_NEUTRAL = frozenset({"out", "resume", "overwrite", "checkpoint_every", "log_every", "throughput_batch",
                            "throughput_rounds", "test_at_end", "data.workers", "data.eval_batch_size"})


# The command-line option behind each numeric field, for error messages.
FLAGS = {"budget": "--budget", "search.schedule.epochs": "--search-epochs", "search.schedule.lr": "--lr",
         "search.warmup_epochs": "--warmup-epochs", "post.epochs": "--post-epochs", "post.lr": "--post-lr",
         "kd.alpha": "--kd-alpha", "kd.temperature": "--kd-temperature", "data.mixup": "--mixup",
         "data.cutmix": "--cutmix", "data.smoothing": "--smoothing", "data.reprob": "--reprob",
         "data.crop_pct": "--crop-pct", "search.schedule.clip_grad": "--clip-grad", "post.clip_grad": "--post-clip-grad"}


@dataclass
class CompressConfig:
    """Everything `uvc compress` takes. The defaults compress the bundled teacher to half its MACs.

    `budget` is a fraction of the dense model's `resource`: "macs" (compute), "params" (size) or "latency" (time
    measured on the run's device: `latency` says at which batch and thread count; latency.py).

    `data` may be given as a string (a data set name or an ImageFolder path): it becomes `DataConfig(data=...)`.
    Learning rates (`search.schedule.lr`, `post.lr`) are per 128 images and scale linearly with the global batch
    (`engine.LR_BATCH`), as `--lr` and `--post-lr` are: `uvc compress` only copies its options into these fields.
    """

    model: str | None = None  # timm name, folder saved by uvc.save or save_pretrained, or None for the bundled teacher
    checkpoint: str | None = None  # local weights for a timm `model`
    pretrained: bool = False
    img_size: int | None = None  # build a timm `model` at this image size (position embeddings are resampled)
    teacher: str | None = None  # default: the input model itself
    # a model trained for other classes first gets a head for these (transfer, then compress); 0 drops the head and
    # compresses the model as a backbone, by distilling its features (as a model without a head always is)
    num_classes: int | None = None
    budget: float = 0.5
    resource: str = "macs"  # what the budget is a fraction of: "macs", "params" or "latency"
    latency: LatencyConfig = field(default_factory=LatencyConfig)  # the latency table and timings (every run's report)
    out: str = "runs/compress"
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    # KD post-training of the slimmed model; epochs None: 2 after a search, none after one-shot (`post_training`).
    # 1e-5, not the search's 1e-4: at 1e-4 a pretrained DINOv2-S/14 lost 46-55 points in 16-32 steps (docs/method.md)
    post: Schedule = field(default_factory=lambda: Schedule(epochs=None, lr=1e-5, weight_decay=0.05, warmup_epochs=0.1))
    # deliver the best on validation of the slimmed model before post-training and each post-training epoch's end
    # (timm's model_best): post-training can only add; a least-squares refit is often better than any epoch after it
    keep_best: bool = True
    one_shot: bool = False  # no search: rank groups, fit the plan, compensate by least squares, slim; then `post`
    # unlabeled training images: the activation scores, one-shot, the compensated start and the rewound end's refit
    calibration_images: int = 1000
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False  # replace the results or checkpoint of an earlier run in `out`
    deterministic: bool = False  # deterministic GPU kernels, so that a resumed GPU run is bit-exact (a little slower)
    checkpoint_every: int = 0  # extra checkpoints every N steps (0: only at epoch and phase ends)
    log_every: int = 10
    throughput_batch: int = 64
    throughput_rounds: int = 8  # rounds of >= 1 s each, the dense and the slimmed model alternating (0: no timing)
    eval_during_search: bool = True
    test_at_end: bool = True  # False: the test split stays unread (a tuning sweep chooses on validation alone)

    def __post_init__(self):
        if isinstance(self.data, str):
            self.data = DataConfig(data=self.data)

    @classmethod
    def from_preset(cls, name: str) -> "CompressConfig":
        """A config holding preset `name`'s values (presets.py; "paper": UVC as published). Fields set afterwards
        override them: `cfg.budget = 0.3`, or `compress(CompressConfig.from_preset("paper"), budget=0.3)`."""
        return apply_preset(cls(), name)

    def post_training(self) -> Schedule:
        """`post` with its epochs filled in. One-shot post-trains for none by default: at the default rate
        post-training undoes part of what its least-squares refit keeps (README, Benchmarks)."""
        if self.post.epochs is not None:
            return self.post
        return replace(self.post, epochs=0.0 if self.one_shot else 2.0)

    def skip_gates(self) -> str:
        """`search.skip` with "auto" decided. Skip gates paid only under a latency budget at batch 1, where a call's
        fixed overhead, which narrowing keeps and skipping drops, weighs most; under MACs budgets and at batch 64
        they cost accuracy (BENCHMARKS.md section 8). One-shot learns no gates: it skips only when told to
        (`--skip both`), and only where pruning alone cannot reach the budget."""
        if self.search.skip != "auto":
            return self.search.skip
        batch_one = self.resource == "latency" and (self.latency.batch or self.throughput_batch) == 1
        return "both" if batch_one and not self.one_shot else "none"

    def validate(self) -> None:
        check_finite(self, FLAGS)
        check_resource(self.resource)
        if not isinstance(self.budget, (int, float)) or not 0 < self.budget <= 1:
            raise UVCError(f"budget {self.budget} is outside (0, 1]; it is the fraction of {RESOURCES[self.resource]} to keep, "
                           "e.g. 0.5")
        self.data.validate()
        self.latency.validate()
        self.search.validate()
        self.kd.validate()
        self.post_training().validate("post-training")
        if self.calibration_images < 1:
            raise UVCError(f"--calibration-images must be >= 1, got {self.calibration_images}")
        if self.img_size is not None and self.img_size < 1:
            raise UVCError(f"--img-size must be a positive number of pixels, got {self.img_size}")
        if self.num_classes is not None and self.num_classes != 0 and self.num_classes < 2:
            raise UVCError(f"--num-classes must be >= 2 (the data's class count), or 0 to drop the head and compress "
                           f"a backbone, got {self.num_classes}")
        if self.throughput_rounds < 0:
            raise UVCError(f"--timing-rounds must be >= 0 (0: no speed timing), got {self.throughput_rounds}")


@dataclass
class RunState:
    """Where a run is and what it has measured: saved in every checkpoint, so a resumed run goes on from here."""

    budget: float
    dense_macs: int
    phase: str = "search"  # search | post
    step: int = 0
    first_epoch: int = 0  # the data epoch this phase's step 0 reads: post-training goes on past the search's epochs
    history: list[dict] = field(default_factory=list)  # logged training figures
    evals: list[dict] = field(default_factory=list)  # validation top-1 per epoch
    top1_teacher: float | None = None  # test
    top1_val_teacher: float | None = None
    top1_val_after_search: float | None = None  # right after slimming
    search_ratio: float | None = None  # R where the search itself ended, before the exact fit
    cosine_val_after_search: float | None = None  # a backbone's figure right after slimming (`feature_cosine`)
    probe_val_teacher: float | None = None  # a backbone's linear probe on the teacher's features (labelled data only)
    plan: list[dict] | None = None
    latency_fit: dict | None = None  # a latency budget's fits: predicted and measured ratios (latency.fit_measured)
    best: dict | None = None  # keep_best: {"epoch", "score"} of the best model so far (epoch 0: before post-training)


def _rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])  # mixup's draws
    random.setstate(states["python"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])  # dropout and mixup draws of a GPU run


class Run:
    """One compression run: its models, data, state and the phase loops."""

    def __init__(self, cfg: CompressConfig, model: nn.Module | None = None, teacher: nn.Module | None = None,
                 teacher_scores: dict[str, float] | None = None):
        cfg.validate()
        self.auto_skip = cfg.search.skip == "auto"  # said once the run starts (an input error prints alone)
        # the report and a resume see the epochs that ran and the skip gates learned
        self.cfg = cfg = replace(cfg, post=cfg.post_training(), search=replace(cfg.search, skip=cfg.skip_gates()))
        self.out = check_output_dir(cfg.out, checkpoints=[CHECKPOINT], resume=cfg.resume, overwrite=cfg.overwrite,
                                    inputs=[None if isinstance(model, nn.Module) else cfg.model or default_teacher_dir(),
                                            cfg.checkpoint, cfg.teacher, cfg.data.data, cfg.data.root])
        self.teacher_scores = teacher_scores
        seed_everything(cfg.seed)  # the same seed on every rank: see distributed.py
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts, later
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        self.device = distributed.setup(resolve_device(cfg.device))
        timm_kwargs = {"img_size": cfg.img_size} if cfg.img_size else {}
        with distributed.main_first():
            student = load_model(model if model is not None else cfg.model, checkpoint=cfg.checkpoint,
                                 pretrained=cfg.pretrained, **timm_kwargs)
            if teacher is None and cfg.teacher:
                teacher = load_model(cfg.teacher)
        if cfg.num_classes == 0 and not is_backbone(student):
            student = drop_head(copy.deepcopy(student))  # the caller's model keeps its head
        self.backbone = is_backbone(student)
        if self.backbone:
            self.cfg = cfg = _for_backbone(cfg)
        model_input = adapter_for(student).input_size(student)
        self.data = build_data(cfg.data, seed=cfg.seed, input_size=model_input,
                               pretrained_cfg=getattr(student, "pretrained_cfg", None), labels=not self.backbone)
        self.transfer = self._fit_head(student) if cfg.num_classes else None
        self.teacher = (teacher if teacher is not None else copy.deepcopy(student)).to(self.device).eval().requires_grad_(False)
        self.input_size = self.data.input_size
        self._check_compatible(student, model_input)
        self.latency_table = self._latency_table(student) if cfg.resource == "latency" or cfg.latency.table else None
        self.skel = skeleton_of(student, self.input_size, cfg.resource,
                                latency_model(self.latency_table) if self.latency_table else None)
        check_budget(cfg.budget, self.skel, cfg.search.prune, cfg.search.skip != "none")
        self.dense_macs = macs(student, self.input_size)
        self.dense_cost = self.skel.dense_cost if cfg.resource == "latency" else count(student, cfg.resource, self.input_size)
        # The copy trains even when `model` is frozen (e.g. the very object passed as the teacher).
        self.student = make_compressible(copy.deepcopy(student)).requires_grad_(True).to(self.device)
        self.dtype = model_dtype(self.student)
        self.train_student = distributed.wrap(self.student, self.device)
        self.dense = student
        self.search = Search(self.student, cfg.budget, cfg.search, self.skel)
        self.steps_per_epoch = len(self.data.train)
        if self.steps_per_epoch == 0:
            raise UVCError("the training set is smaller than one batch; lower --batch-size or use more data")
        self.search_steps = max(1, cfg.search.schedule.steps(self.steps_per_epoch))
        self.warmup_steps = round(cfg.search.warmup_epochs * self.steps_per_epoch)
        self.fade_steps = cfg.search.fade_steps(self.steps_per_epoch)
        self.post_steps = cfg.post.steps(self.steps_per_epoch)
        self.optimizer, self.scheduler = make_optimizer(self.student, cfg.search.schedule, self.steps_per_epoch,
                                                        cfg.data.batch_size)
        self.slimmed: nn.Module | None = None
        self.train_slimmed: nn.Module | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None  # keep_best: the weights of `state.best`, on the CPU
        self.state = RunState(budget=cfg.budget, dense_macs=self.dense_macs)
        self.settings = {**flat_settings(asdict(cfg), RESULT_NEUTRAL), "weights of the model": tensor_digest(student.state_dict()),
                         "weights of the teacher": tensor_digest(self.teacher.state_dict())}
        if model is None:
            _warn_if_random(cfg)  # last: a run that an input error stops prints that error alone

    def _fit_head(self, student: nn.Module) -> dict | None:
        """Transfer: a head for `num_classes` fitted on the student's frozen features (see transfer.py), unless it
        already predicts them; the fitted model is then the teacher too (when no other is given)."""
        if self.cfg.num_classes != self.data.num_classes:
            raise UVCError(f"--num-classes is {self.cfg.num_classes} but {self.data.name} has {self.data.num_classes} "
                           f"classes; pass --num-classes {self.data.num_classes}")
        if predicts(student) == self.cfg.num_classes:
            return None
        home = next(student.parameters()).device
        fitted = fit_head(student.to(self.device), self.data.calibration, self.data.val, self.cfg.num_classes, self.device)
        student.to(home)
        return fitted

    def _latency_table(self, student: nn.Module) -> dict:
        """The latency table, measured (or read from the cache in `out`) on rank 0 and shared with every rank."""
        table = table_for(student, self.input_size, self.device, self.cfg.latency, self.cfg.throughput_batch,
                          self.out) if distributed.is_main() else None
        return distributed.broadcast_from_main(table)

    def _time_against_dense(self, slimmed: nn.Module) -> dict:
        """The slimmed model's time over the dense one's at the latency batch and threads (`latency.measured_ratio`)."""
        latency = self.cfg.latency
        return measured_ratio(self.dense, slimmed, self.input_size, self.device, latency.batch or self.cfg.throughput_batch,
                              latency.threads, rounds=self.cfg.throughput_rounds)

    def _measured_ratio(self, slimmed: nn.Module) -> dict:
        """`_time_against_dense`, timed on rank 0 and shared with every rank (all ranks call it: the latency fit)."""
        return distributed.broadcast_from_main(self._time_against_dense(slimmed) if distributed.is_main() else None)

    def _fit(self, plan_at) -> list[LayerPlan]:
        """`plan_at(budget)`; a latency budget refits it until the slimmed model's measured ratio agrees."""
        if self.cfg.resource != "latency" or not self.cfg.throughput_rounds:
            return plan_at(self.cfg.budget)  # with --timing-rounds 0 the latency table's ratio alone decides
        plan, self.state.latency_fit = fit_measured(plan_at, self.skel, self.cfg.budget,
                                                    lambda p: self._measured_ratio(slim(self.dense, p)))
        return plan

    def _check_compatible(self, student: nn.Module, model_input: tuple[int, int, int]) -> None:
        """Refuse, before anything runs, data whose images or classes the model cannot take."""
        dynamic = getattr(student, "dynamic_img_size", False)
        data_input = tuple(self.data.input_size)
        if model_input[0] != data_input[0] or (not dynamic and tuple(model_input) != data_input):
            name = self.cfg.model or type(student).__name__
            size = "x".join(map(str, model_input))
            raise UVCError(f"{name} takes {size} images but {self.data.name} provides {'x'.join(map(str, data_input))}: "
                           f"leave --input-size out (the data then takes the model's size), or build the model at "
                           f"--img-size {data_input[-1]}")
        if self.backbone:
            return  # no classes to match: its features are distilled
        x = torch.zeros(1, *self.input_size, dtype=model_dtype(student))
        with torch.no_grad():
            s_out = predict_logits(student.eval(), x)
            t_out = predict_logits(self.teacher, x.to(self.device, model_dtype(self.teacher)))
        if s_out.shape[-1] != self.data.num_classes or t_out.shape[-1] != self.data.num_classes:
            raise UVCError(f"the data has {self.data.num_classes} classes but the model predicts {s_out.shape[-1]} "
                           f"and the teacher {t_out.shape[-1]}; pass --num-classes {self.data.num_classes} to fit a new "
                           "head on the model's features first (transfer, then compress), or a model trained for this data")

    # ---- checkpoints -------------------------------------------------------------------------
    def checkpoint(self) -> None:
        if self.state.phase == "search":
            self._check_ranks_agree()
        if distributed.is_main():
            state = {"run": asdict(self.state), "settings": self.settings, "rng": _rng_states(),
                     "optimizer": self.optimizer.state_dict()}
            if self.state.phase == "search":
                state.update(student=self.student.state_dict(), search=self.search.state_dict())
            else:
                state.update(arch=arch_of(self.slimmed), slimmed=self.slimmed.state_dict(), best=self.best_weights)
            save_checkpoint(self.out / CHECKPOINT, state)
        distributed.barrier()

    def _check_ranks_agree(self) -> None:
        """The search state and the masks it implies must be bit-identical on every rank."""
        distributed.same_on_all_ranks("the search state", [*self.search.state_dict().values(), *self.student.buffers()])

    def resume(self) -> bool:
        path = self.out / CHECKPOINT
        if not checkpoint_exists(path):
            log.info("no checkpoint in %s; starting from the beginning", self.out)
            return False
        state = load_for_resume(path, self.settings)  # on the CPU; every load below copies onto this run's device and dtype
        with restoring(path):
            run = RunState(**state["run"])
            if run.phase == "search":
                self.student.load_state_dict(state["student"])
                self.search.load_state_dict(state["search"])
            else:
                # The architecture is checked as arch.json is: a crafted checkpoint may carry any sizes.
                check_arch(path, state["arch"], path, {k: tuple(v.shape) for k, v in state["slimmed"].items()})
                self._start_post_training(build_from_arch(state["arch"]).to(self.device, self.dtype))
                self.slimmed.load_state_dict(state["slimmed"])
                self.best_weights = state.get("best")
            self.optimizer.load_state_dict(state["optimizer"])
            _set_rng_states(state["rng"])
        self.state = run
        log.info("resumed from %s: %s step %d", path, run.phase, run.step)
        return True

    # ---- phases ------------------------------------------------------------------------------
    def _loop(self, total: int, step_fn, desc: str) -> None:
        spe = self.steps_per_epoch
        bar = progress(range(total), desc=desc, initial=self.state.step, total=total)
        while self.state.step < total:
            step = self.state.step
            self.data.train.set_epoch(self.state.first_epoch + step // spe, skip=step % spe)  # a resume replays them
            for x, y in self.data.train:
                x, y = x.to(self.device, self.dtype), y.to(self.device)
                if self.data.mixup is not None:
                    x, y = self.data.mixup(x, y)
                figures = step_fn(x, y, self.state.step)
                self.state.step += 1
                step = self.state.step
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in figures.items()})
                if step % self.cfg.log_every == 0 or step == total:
                    self.state.history.append({"phase": self.state.phase, "step": step, **figures})
                if step % spe == 0 or step == total:
                    self._end_of_epoch(step // spe if step % spe == 0 else step / spe)
                if step % spe == 0 or step == total or (self.cfg.checkpoint_every and step % self.cfg.checkpoint_every == 0):
                    self.checkpoint()
                if step >= total:
                    break
        bar.close()

    def _end_of_epoch(self, epoch: float) -> None:
        phase = self.state.phase
        if phase == "search" and not self.cfg.eval_during_search:
            return
        if phase == "search":
            self.search.mark_groups()
            self.search.set_gates()
            model, ratio = self.student, float(self.search.resource().detach())
        else:
            model, ratio = self.slimmed, self._ratio(self.slimmed)
        score = self._val_score(model, f"val {phase}")
        self.state.evals.append({"phase": phase, "epoch": epoch, self._score_key(): score, "R": ratio})
        log.info("%s epoch %.2f: validation %s at R = %.3f", phase, epoch, self._score_text(score), ratio)
        if phase == "post":
            self._keep_if_best(epoch, score)

    def _keep_if_best(self, epoch: float, score: float) -> None:
        """keep_best: hold a CPU copy of the slimmed model's weights when they score at least the best so far (a tie
        goes to the later, trained model). Every rank takes the same decision: the score is over all ranks."""
        if not self.cfg.keep_best or (self.state.best is not None and score < self.state.best["score"]):
            return
        self.state.best = {"epoch": epoch, "score": score}
        self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in self.slimmed.state_dict().items()}

    def _val_score(self, model: nn.Module, desc: str) -> float:
        """A classifier's validation top-1; a backbone's mean cosine of its pooled feature to the teacher's."""
        if self.backbone:
            return feature_cosine(model, self.teacher, self.data.val, self.device, desc=desc)
        return evaluate(model, self.data.val, self.device, desc=desc)

    def _score_key(self) -> str:
        return "cosine_val" if self.backbone else "top1_val"

    def _score_text(self, score: float) -> str:
        return f"feature cosine to the teacher {score:.4f}" if self.backbone else f"top-1 {score:.2f}%"

    def _probe(self, model: nn.Module) -> float | None:
        """A backbone's linear-probe validation top-1 (a ridge head on its frozen features), None without labels."""
        if not self.data.num_classes:
            return None
        return linear_probe(model, self.data.calibration, self.data.val, self.data.num_classes, self.device)["top1_val"]

    def _loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Task + KD loss; the student and teacher forward passes run under bf16 autocast on CUDA."""
        if self.cfg.kd.kind == "features":
            return self._feature_loss(model, x, y)
        with autocast(self.device, self.dtype):
            out = model(x)
            teacher_logits = None if self.cfg.kd.kind == "none" else predict_logits(self.teacher, x.to(model_dtype(self.teacher)))
        return distillation_loss(out, y, teacher_logits, self.cfg.kd, self.data.label_smoothing)

    def _feature_loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Feature KD (distill.py): pooled features and final tokens against the teacher's; a backbone has no labels term."""
        with autocast(self.device, self.dtype), features_of(model) as student, features_of(self.teacher) as teacher:
            out = model(x)
            predict_logits(self.teacher, x.to(model_dtype(self.teacher)))
        return feature_distillation_loss(out, None if self.backbone else y, student, teacher, self.cfg.kd,
                                         self.data.label_smoothing)

    def _set_distilled_training(self, model: nn.Module) -> None:
        if hasattr(model, "set_distilled_training"):
            model.set_distilled_training(self.cfg.kd.kind in ("soft", "hard"))

    def search_step(self, x, y, step: int) -> dict:
        """One iteration of the primal-dual search (the order is Search's docstring's)."""
        search, frozen = self.search, self.cfg.search.frozen
        self.student.train()
        fade = fade_at(step, self.fade_steps)  # the control fades its start plan in the same way
        search.mark_groups(fade, probe=not frozen)
        search.set_gates(fade, probe=not frozen, sample=not frozen)
        loss = optimizer_step(self._loss(self.train_student, x, y), self.optimizer, self.scheduler, step, "search",
                              clip_grad=self.cfg.search.schedule.clip_grad)
        if frozen:
            return {"loss": distributed.mean_over_ranks(loss), **search.figures()}
        for grad in search.probe_gradients():
            distributed.all_reduce_mean_(grad)  # the only rank-dependent inputs of the search step
        search.record_importance()
        search.proximal_shrink(self.optimizer.param_groups[0]["lr"])
        if step >= self.warmup_steps:
            search.allocation_step()
            search.dual_step()
        return {"loss": distributed.mean_over_ranks(loss), **search.figures()}

    def post_step(self, x, y, step: int) -> dict:
        self.slimmed.train()
        loss = optimizer_step(self._loss(self.train_slimmed, x, y), self.optimizer, self.scheduler, step, "post-training",
                              clip_grad=self.cfg.post.clip_grad)
        return {"loss": distributed.mean_over_ranks(loss)}

    def _start_post_training(self, slimmed: nn.Module) -> None:
        self.slimmed = slimmed.requires_grad_(True)
        self.train_slimmed = distributed.wrap(self.slimmed, self.device)
        self._set_distilled_training(self.slimmed)
        self.optimizer, self.scheduler = make_optimizer(self.slimmed, self.cfg.post, self.steps_per_epoch,
                                                        self.cfg.data.batch_size)

    def _finish_search(self) -> None:
        self.state.search_ratio = float(self.search.resource().detach())
        log.info("the search ended at R = %.4f (budget %.2f); fitting it exactly", self.state.search_ratio, self.cfg.budget)

        def plan_at(budget: float) -> list[LayerPlan]:
            self.search.budget = budget
            return self.search.final_plan()
        plan = self._fit(plan_at)
        self._check_ranks_agree()
        if distributed.world_size() > 1:
            log.info("all %d ranks hold the same search state and architecture", distributed.world_size())
        self.begin_post_training(self._rewound(plan) if self.cfg.search.end == "rewind" else slim(self.student, plan), plan)

    def _rewound(self, plan: list[LayerPlan]) -> nn.Module:
        """The input model's own weights slimmed at the searched plan, each proj / fc2 refitted against it.

        The search spent its steps on a few images; what it learned that transfers is the plan. The
        dense weights plus a least-squares refit keep more of the pretrained function than the
        searched weights do (docs/method.md, "Rewinding: what post-training starts from")."""
        dense = self._input_copy().eval()
        slimmed = slim(dense, plan)
        stats = compensate(dense, slimmed, plan, self._calibration(), max_images=self.cfg.calibration_images)
        log.info("rewound to the input weights at the searched plan: %d proj / fc2 layers refitted on %d images in %.1f s",
                 len(stats["layers"]), stats["images"], stats["seconds"])
        return slimmed

    def _input_copy(self) -> nn.Module:
        """A copy of the input model on this run's device and dtype, to prune without touching `self.dense`."""
        return copy.deepcopy(self.dense).to(self.device, self.dtype)

    def _calibration(self):
        """The unlabeled, unaugmented calibration images on this run's device and dtype (labels dropped)."""
        return (x.to(self.device, self.dtype) for x, _ in self.data.calibration)

    def _activation_scores(self) -> None:
        """Before the first step, score every group by weight norm x mean squared activation of the input model on
        the calibration images, as one-shot does, where the search uses them: init="activation" starts the counts
        at one-shot's plan from them, importance="activation" ranks the groups by them for the whole search."""
        search = self.cfg.search
        # Skipping alone starts with every width whole, so only the ranking can use the scores.
        starts_there, ranks = search.init == "activation" and search.prune, search.importance == "activation"
        if not (starts_there or ranks):
            return
        started, dense = time.time(), self._input_copy().eval()
        images = take_images(self._calibration(), self.cfg.calibration_images)
        scores = group_importance(dense, "activation", images)
        if starts_there:
            plan = budget_plan(dense, self.cfg.budget, scores, images, search.skip, "global", self.input_size,
                               search.width_multiple, self.cfg.resource, self.skel.latency)
            if not all(p.attn and p.mlp for p in plan):  # a budget only skipping reaches
                log.info("budget %g lies below what pruning alone reaches: the search starts at one-shot's plan with "
                         "%d attention and %d MLP halves skipped, chosen on the calibration images", self.cfg.budget,
                         sum(not p.attn for p in plan), sum(not p.mlp for p in plan))
            self.search.start_from(plan)
        if ranks:
            self.search.rank_by(scores)
        log.info("activation scores of every group on %d images in %.1f s (init %s, importance %s)",
                 sum(len(x) for x in images), time.time() - started, search.init, search.importance)

    def _compensated_start(self) -> None:
        """Cut the start plan at once and refit what reads the cut groups, before the first step."""
        stats = compensate_masked(self.student, self.search.current_plan(), self._calibration(),
                                  max_images=self.cfg.calibration_images)
        log.info("compensated start: %d proj / fc2 layers refitted on %d images in %.1f s", len(stats["layers"]),
                 stats["images"], stats["seconds"])

    def _one_shot(self) -> None:
        """Importance from calibration images, the plan fitted to the budget, compensation, slimming: no gradient step."""
        slimmed, plan, stats = one_shot(self._input_copy(), self.cfg.budget, self._calibration(),
                                        calibration_images=self.cfg.calibration_images, input_size=self.input_size,
                                        multiple=self.cfg.search.width_multiple, resource=self.cfg.resource,
                                        latency=self.skel.latency, fit=self._fit, skip=self.cfg.search.skip)
        log.info("one-shot: %s importance, %s allocation, compensated on %d images", stats["importance"],
                 stats["allocation"], stats["images"])
        self.begin_post_training(slimmed, plan)

    def _ratio(self, model: nn.Module) -> float:
        """R of the slimmed model: its share of the dense model's budgeted resource (latency: the table's, for its plan)."""
        if self.cfg.resource == "latency":
            return plan_ratio(self.skel, [LayerPlan.from_dict(p) for p in self.state.plan])
        return count(model, self.cfg.resource, self.input_size) / self.dense_cost

    def begin_post_training(self, slimmed: nn.Module, plan: list[LayerPlan]) -> None:
        """Switch to post-training `slimmed`: the search's result, or a model another method pruned (baselines)."""
        slimmed = slimmed.to(self.device, self.dtype)
        self.state.plan = [p.to_dict() for p in plan]
        score = self._val_score(slimmed, "val slimmed")
        if self.backbone:
            self.state.cosine_val_after_search = score
        else:
            self.state.top1_val_after_search = score
        log.info("slimmed to R = %.4f, validation %s before post-training", self._ratio(slimmed), self._score_text(score))
        # After a search, post-training reads the epochs that follow it, as a baseline that post-trains
        # for the search's epochs too would; a model pruned without training starts at epoch 0.
        self.state.first_epoch = -(-self.state.step // self.steps_per_epoch)
        self.state.phase, self.state.step = "post", 0
        self._start_post_training(slimmed)
        self._keep_if_best(0.0, score)
        self.checkpoint()

    def score_teacher(self) -> dict[str, float | None]:
        """The teacher's top-1 on the test (None with `test_at_end` off) and validation splits; a benchmark running
        many seeds computes it once. A backbone has no top-1; its linear probe ("probe") where the data has labels."""
        if self.backbone:
            return {"test": None, "val": None, "probe": self._probe(self.teacher)}
        val = evaluate(self.teacher, self.data.val, self.device, desc="val teacher")
        return {"test": self._test_score(self.teacher, val, "test teacher"), "val": val}

    def _test_score(self, model: nn.Module, val: float, desc: str) -> float | None:
        """Top-1 on the test split, or None with `test_at_end` off. An ImageFolder has one held-out folder, val/,
        which is then both splits: it is evaluated once and its figure reported as both."""
        if not self.cfg.test_at_end:
            return None
        if self.data.test is self.data.val:
            return val
        return evaluate(model, self.data.test, self.device, desc=desc)

    def run(self, pruned: tuple[nn.Module, list[LayerPlan]] | None = None) -> dict:
        """The whole run, holding `out`'s lock (rank 0); `pruned` (a slimmed model and its plan) skips the search."""
        with claimed(self.out) if distributed.is_main() else contextlib.nullcontext():
            if self.cfg.overwrite and not self.cfg.resume and distributed.is_main():
                remove_checkpoint(self.out / CHECKPOINT)
            distributed.barrier()
            if pruned is not None:
                self.begin_post_training(*pruned)
            return self._run()

    def _run(self) -> dict:
        if not (self.cfg.resume and self.resume()):
            scores = self.teacher_scores or self.score_teacher()
            self.state.top1_teacher, self.state.top1_val_teacher = scores["test"], scores["val"]
            self.state.probe_val_teacher = scores.get("probe")
            if self.backbone:
                log.info("a backbone: distilling its features; teacher linear probe %s, dense model %.2f M MACs",
                         "(no labels)" if self.state.probe_val_teacher is None else f"{self.state.probe_val_teacher:.2f}%",
                         self.dense_macs / 1e6)
            else:
                log.info("teacher top-1 %s (validation %.2f%%), dense model %.2f M MACs", percent(self.state.top1_teacher),
                         self.state.top1_val_teacher, self.dense_macs / 1e6)
            if self.auto_skip and not self.cfg.one_shot:
                log.info("skip gates: %s (--skip auto: both under a latency budget at batch 1, none elsewhere)",
                         self.cfg.search.skip)
        started = time.time()
        if self.state.phase == "search" and self.cfg.one_shot:
            self._one_shot()
        elif self.state.phase == "search":
            if self.state.step == 0:
                self._activation_scores()
            if self.state.step == 0 and self.cfg.search.start == "compensate":
                self._compensated_start()
            self._set_distilled_training(self.student)
            self._loop(self.search_steps, self.search_step, "search")
            self._finish_search()
        self._loop(self.post_steps, self.post_step, "post-train")
        return self._finish(time.time() - started)

    def _finish(self, seconds: float) -> dict:
        model = self.slimmed.eval()
        if hasattr(model, "set_distilled_training"):
            model.set_distilled_training(False)
        # Every rank evaluates its shard; the test split is read here, once (or never: `test_at_end`).
        top1_val = self._restore_best() if self.state.best is not None else self._val_score(model, "val final")
        top1 = None if self.backbone else self._test_score(model, top1_val, "test final")
        report = self._write_outputs(model, top1, top1_val, seconds) if distributed.is_main() else None
        return distributed.broadcast_from_main(report)

    def _restore_best(self) -> float:
        """keep_best: load the best weights into the slimmed model; returns their validation score (already measured)."""
        best, last = self.state.best, self.state.evals[-1] if self.post_steps else None
        self.slimmed.load_state_dict(self.best_weights)
        if last is not None and best["epoch"] < last["epoch"]:
            log.info("kept the model of post-training epoch %g (0: before it), validation %s; the last epoch scored %s",
                     best["epoch"], self._score_text(best["score"]), self._score_text(last[self._score_key()]))
        return best["score"]

    def _write_outputs(self, model: nn.Module, top1: float | None, top1_val: float, seconds: float) -> dict:
        """Rank 0's part of the end: throughput, the saved model, report.json and report.png."""
        s = self.state
        slim_macs, params_dense, params = macs(model, self.input_size), param_count(self.dense), param_count(model)
        # saved with it: how its images were prepared, and what its outputs are called
        model.pretrained_cfg = {**self.data.preprocessing, **self._label_names(model)}
        save(model, self.out)  # before the speed timing, so an interruption there keeps the model
        timed = self._timing(model)
        speed, plan = timed and timed["speed"], [LayerPlan.from_dict(p) for p in s.plan]
        report = {
            "budget": self.cfg.budget, "resource": self.cfg.resource, "ratio": self._ratio(model),
            "macs_dense": self.dense_macs, "macs": slim_macs, "macs_ratio": slim_macs / self.dense_macs,
            "params_dense": params_dense, "params": params, "params_ratio": params / params_dense,
            "top1_teacher": s.top1_teacher, "top1_val_teacher": s.top1_val_teacher, **self._quality(model, top1, top1_val),
            "search_ratio": s.search_ratio, "kept_epoch": s.best and s.best["epoch"],
            "search_gap": None if s.search_ratio is None else s.search_ratio - self.cfg.budget,
            "latency_ratio_measured": timed and timed["median"],
            "latency_ratio_measured_range": timed and [timed["min"], timed["max"]],
            "latency_ratio_predicted": plan_ratio(replace(self.skel, resource="latency"), plan) if self.latency_table else None,
            "latency_fit": s.latency_fit, "latency_table": _table_summary(self.latency_table),
            "throughput_dense": speed["dense"]["median"] if speed else None,
            "throughput": speed["slimmed"]["median"] if speed else None,
            "throughput_detail": speed or "skipped (throughput_rounds 0, --timing-rounds 0)",
            "throughput_batch": speed["dense"]["batch"] if speed else self.cfg.throughput_batch, "device": str(self.device),
            "processes": distributed.world_size(), "train_seconds_this_session": seconds,
            "layers": [p.shape(d).to_dict() for p, d in zip(plan, self.skel.dim)],
            "plan": s.plan, "transfer": self.transfer, "history": s.history, "evals": s.evals, "config": _jsonable(asdict(self.cfg)),
        }
        atomic_write_text(self.out / "report.json", json.dumps(report, indent=1))
        write_report(report, self.out / "report.png")
        remove_checkpoint(self.out / CHECKPOINT)
        log.info("compressed to R = %.4f of the %s (budget %.2f): %s, %s", report["ratio"], RESOURCES[self.cfg.resource],
                 self.cfg.budget, outcome(report), speed_text(report))
        return report

    def _label_names(self, model: nn.Module) -> dict:
        """The class names of the result: the input model's own (a Hugging Face id2label, a timm label_names)
        unless a new head was fitted, else the data's (Fashion-MNIST's or the class folders'); none for a backbone."""
        classes = getattr(model, "num_classes", 0)
        own = None if self.transfer else (getattr(self.dense, "pretrained_cfg", None) or {}).get(LABEL_NAMES)
        for names in (own, self.data.class_names):
            if classes and names and len(names) == classes:
                return {LABEL_NAMES: tuple(names)}
        return {}

    def _timing(self, model: nn.Module) -> dict | None:
        """The dense and the slimmed model timed alternately (`_measured_ratio`); None when `throughput_rounds` is 0."""
        if not self.cfg.throughput_rounds:
            log.info("saved the slimmed model; speed timing skipped (--timing-rounds 0)")
            return None
        log.info("saved the slimmed model; timing it against the dense model (%d alternating rounds of 1 s each; "
                 "--timing-rounds 0 skips this)", self.cfg.throughput_rounds)
        return self._time_against_dense(model)  # rank 0 alone writes the outputs: no collective here

    def _quality(self, model: nn.Module, top1: float | None, val_score: float) -> dict:
        """The report's figures of how good the result is: a classifier's top-1; a backbone's feature cosine to the
        teacher and, with labels, its linear probe before and after."""
        if not self.backbone:
            return {"task": "classifier", "top1": top1, "top1_val": val_score,
                    "top1_val_after_search": self.state.top1_val_after_search}
        probe = None if self.state.probe_val_teacher is None else {"dense": self.state.probe_val_teacher,
                                                                   "slimmed": self._probe(model)}
        return {"task": "backbone", "top1": None, "top1_val": None, "top1_val_after_search": None,
                "feature_cosine_val": val_score, "feature_cosine_val_after_search": self.state.cosine_val_after_search,
                "linear_probe_val": probe}


def _for_backbone(cfg: CompressConfig) -> CompressConfig:
    """A backbone has no logits to distil and no labels to learn: its features are distilled (KD kind "features")."""
    if cfg.kd.kind == "none":
        raise UVCError("a backbone (a model without a classifier head) learns only from its teacher's features: "
                       "drop --kd none / --no-kd")
    return replace(cfg, kd=replace(cfg.kd, kind="features"))


def _warn_if_random(cfg: CompressConfig) -> None:
    """A timm name without released or local weights is built with random ones: compressing those is rarely meant."""
    name = cfg.model
    if name is None or name == DEFAULT_TEACHER or cfg.pretrained or cfg.checkpoint or Path(name).exists():
        return
    log.warning("%s has random weights (no --pretrained, no --checkpoint): pass --checkpoint PATH (a .safetensors/.pth "
                "state dict; CompressConfig(checkpoint=...)) or --pretrained (timm's released weights, needs network)", name)


def _table_summary(table: dict | None) -> dict | None:
    """Where and how the latency table was measured, for the report (the table itself is latency_table.json)."""
    return None if table is None else {**table["key"], "fixed": table["fixed"], "dense_measured": table["dense_measured"],
                                       "rounds": table["rounds"], "seconds_per_round": table["seconds_per_round"]}


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def compress(cfg: CompressConfig | None = None, model: nn.Module | None = None, teacher: nn.Module | None = None,
             teacher_scores: dict[str, float] | None = None, **overrides) -> dict:
    """Compress a ViT to `cfg.budget` of its MACs (or parameters: `cfg.resource`); returns the report (also
    written to `cfg.out`).

    `overrides` set fields of `cfg` by name, e.g. `compress(budget=0.3, data="/data/imagenet")`.
    `teacher_scores` ({"test": top-1, "val": top-1}) skips evaluating the teacher when it is known.
    """
    cfg = cfg or CompressConfig()
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise TypeError(f"unknown compress option {key!r}")
        setattr(cfg, key, value)
    cfg.__post_init__()
    return Run(cfg, model=model, teacher=teacher, teacher_scores=teacher_scores).run()


def post_train(cfg: CompressConfig, slimmed: nn.Module, plan: list[LayerPlan], model: nn.Module | None = None,
               teacher: nn.Module | None = None, teacher_scores: dict[str, float] | None = None) -> dict:
    """Post-train a model slimmed by another method exactly as `compress` post-trains its own result.

    Same data order, KD, optimizer, schedule, evaluation and report as `compress(cfg, model, teacher)`
    after its search, so baselines compare at equal training. `plan` gives the report its per-block
    shapes; `top1_val_after_search` is then the validation accuracy right after pruning.
    """
    return Run(cfg, model=model, teacher=teacher, teacher_scores=teacher_scores).run(pruned=(slimmed, plan))
