"""`uvc.compress`: search under a budget, slim, post-train with distillation, measure, report.

Phases, each resumable from an atomic checkpoint written at every epoch boundary (and every
`checkpoint_every` steps): search (primal-dual over weights, ratios, gates and duals) -> hard
decisions fitted to the budget -> physical slimming -> post-training of the slimmed model with KD.
The reported accuracy and MACs are those of the slimmed model that is saved.

Under torchrun the weights train with DistributedDataParallel and the search state stays identical
on every rank (distributed.py says how); rank 0 alone writes checkpoints, the model and the report.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from . import distributed
from .budget import check_budget, skeleton_of
from .data import DataConfig, build_data
from .distill import KD_KINDS, KDConfig, distillation_loss
from .engine import (autocast, evaluate, load_checkpoint, make_optimizer, optimizer_step, predict_logits, progress,
                     resolve_device, save_checkpoint, seed_everything, throughput)
from .errors import UVCError
from .flops import macs
from .gates import LayerPlan, make_compressible
from .io import arch_of, atomic_write_text, build_from_arch, ensure_writable_dir, save
from .models import load_model
from .primal_dual import SKIP_MODES, PrimalDual, SearchConfig
from .slim import slim

log = logging.getLogger("uvc")
CHECKPOINT = "checkpoint.pt"


@dataclass
class CompressConfig:
    """Everything `uvc compress` takes. The defaults compress the bundled teacher to half its MACs."""

    model: str | None = None  # timm name, folder saved by uvc.save, or None for the bundled teacher
    checkpoint: str | None = None  # local weights for a timm `model`
    pretrained: bool = False
    teacher: str | None = None  # default: the input model itself
    budget: float = 0.5
    out: str = "runs/compress"
    data: DataConfig = field(default_factory=DataConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    post_epochs: float = 2.0
    post_lr: float = 3e-4
    post_weight_decay: float = 0.05
    post_warmup_epochs: float = 0.1
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    checkpoint_every: int = 0  # extra checkpoints every N steps (0: only at epoch and phase ends)
    log_every: int = 10
    throughput_batch: int = 64
    eval_during_search: bool = True

    def validate(self) -> None:
        if not isinstance(self.budget, (int, float)) or not 0 < self.budget <= 1:
            raise UVCError(f"budget {self.budget} is outside (0, 1]; it is the fraction of MACs to keep, e.g. 0.5")
        if self.kd.kind not in KD_KINDS:
            raise UVCError(f"KD kind {self.kd.kind!r} is not one of {', '.join(KD_KINDS)}")
        if self.search.skip not in SKIP_MODES:
            raise UVCError(f"skip mode {self.search.skip!r} is not one of {', '.join(SKIP_MODES)}")
        if self.search.epochs <= 0 or self.post_epochs < 0 or self.search.warmup_epochs < 0:
            raise UVCError("search epochs must be > 0, and post-training and warm-up epochs >= 0")


def _batches(loader, epoch: int, skip: int):
    """The batches of one epoch after the first `skip` (resuming mid-epoch replays the same order)."""
    for setter in (getattr(loader, "set_epoch", None), getattr(getattr(loader, "sampler", None), "set_epoch", None)):
        if setter is not None:
            setter(epoch)
    for i, batch in enumerate(loader):
        if i >= skip:
            yield batch


class Run:
    """One compression run: its models, data, state and the phase loops."""

    def __init__(self, cfg: CompressConfig, model: nn.Module | None = None, teacher: nn.Module | None = None):
        cfg.validate()
        self.cfg = cfg
        seed_everything(cfg.seed)  # the same seed on every rank: see distributed.py
        self.device = distributed.setup(resolve_device(cfg.device))
        with distributed.main_first():
            student = model if model is not None else load_model(cfg.model, checkpoint=cfg.checkpoint, pretrained=cfg.pretrained)
            if teacher is None:
                teacher = load_model(cfg.teacher) if cfg.teacher else copy.deepcopy(student)
        self.teacher = teacher.to(self.device).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.data = build_data(cfg.data, seed=cfg.seed)
        self.input_size = self.data.input_size
        self._check_compatible(student)
        self.skel = skeleton_of(student, self.input_size)
        check_budget(cfg.budget, self.skel, cfg.search.prune, cfg.search.skip != "none")
        self.out = ensure_writable_dir(cfg.out)
        self.dense_macs = macs(student, self.input_size)
        # The copy trains even when `model` is frozen (e.g. the very object passed as the teacher).
        self.student = make_compressible(copy.deepcopy(student)).requires_grad_(True).to(self.device)
        self.train_student = distributed.wrap(self.student, self.device)
        self.dense = student
        self.pd = PrimalDual(self.student, cfg.budget, cfg.search, self.skel).to(self.device)
        self.steps_per_epoch = len(self.data.train)
        if self.steps_per_epoch == 0:
            raise UVCError("the training set is smaller than one batch; lower --batch-size or use more data")
        self.search_steps = max(1, round(cfg.search.epochs * self.steps_per_epoch))
        self.warmup_steps = round(cfg.search.warmup_epochs * self.steps_per_epoch)
        self.post_steps = round(cfg.post_epochs * self.steps_per_epoch)
        self.optimizer, self.scheduler = make_optimizer(self.student, cfg.search.lr, cfg.search.weight_decay,
                                                        cfg.search.epochs, self.steps_per_epoch,
                                                        cfg.search.lr_warmup_epochs)
        self.slimmed: nn.Module | None = None
        self.train_slimmed: nn.Module | None = None
        self.state = {"phase": "search", "step": 0, "history": [], "evals": [], "metrics": {},
                      "budget": cfg.budget, "dense_macs": self.dense_macs}

    def _check_compatible(self, student: nn.Module) -> None:
        x = torch.zeros(1, *self.input_size)
        try:
            with torch.no_grad():
                s_out, t_out = predict_logits(student.eval(), x), predict_logits(self.teacher.cpu(), x)
        except RuntimeError as e:
            raise UVCError(f"the model does not accept this data's input of shape {tuple(self.input_size)}: {e}") from e
        finally:
            self.teacher.to(self.device)
        if s_out.shape[-1] != self.data.num_classes or t_out.shape[-1] != self.data.num_classes:
            raise UVCError(f"the data has {self.data.num_classes} classes but the model predicts {s_out.shape[-1]} "
                           f"and the teacher {t_out.shape[-1]}; pass a model trained for this data")

    # ---- checkpoints -------------------------------------------------------------------------
    def checkpoint(self) -> None:
        if self.state["phase"] == "search":
            self._check_ranks_agree()
        if distributed.is_main():
            state = dict(self.state, rng=torch.get_rng_state(), np_rng=np.random.get_state(),
                         optimizer=self.optimizer.state_dict())
            if self.state["phase"] == "search":
                state.update(student=self.student.state_dict(), search=self.pd.search_state())
            else:
                state.update(arch=arch_of(self.slimmed), slimmed=self.slimmed.state_dict())
            save_checkpoint(self.out / CHECKPOINT, state)
        distributed.barrier()

    def _check_ranks_agree(self) -> None:
        """The search state and the masks it implies must be bit-identical on every rank."""
        distributed.same_on_all_ranks("the search state", [*self.pd.state_dict().values(), *self.student.buffers()])

    def resume(self) -> bool:
        path = self.out / CHECKPOINT
        if not path.is_file():
            log.info("no checkpoint in %s; starting from the beginning", self.out)
            return False
        state = load_checkpoint(path)
        if state.get("budget") != self.cfg.budget or state.get("dense_macs") != self.dense_macs:
            raise UVCError(f"{path} belongs to a run with another model or budget; use another --out or drop --resume")
        if state["phase"] == "search":
            self.student.load_state_dict(state["student"])
            self.pd.load_search_state(state["search"])
        else:
            self._start_post_training(build_from_arch(state["arch"]))
            self.slimmed.load_state_dict(state["slimmed"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        np.random.set_state(state["np_rng"])  # mixup's draws
        self.state = {k: state[k] for k in ("phase", "step", "history", "evals", "metrics", "budget", "dense_macs")}
        log.info("resumed from %s: %s step %d", path, state["phase"], state["step"])
        return True

    # ---- phases ------------------------------------------------------------------------------
    def _loop(self, total: int, step_fn, desc: str) -> None:
        spe = self.steps_per_epoch
        bar = progress(range(total), desc=desc, initial=self.state["step"], total=total)
        while self.state["step"] < total:
            step = self.state["step"]
            for x, y in _batches(self.data.train, step // spe, step % spe):
                x, y = x.to(self.device), y.to(self.device)
                if self.data.mixup is not None:
                    x, y = self.data.mixup(x, y)
                figures = step_fn(x, y, self.state["step"])
                self.state["step"] += 1
                step = self.state["step"]
                bar.update(1)
                bar.set_postfix({k: f"{v:.3g}" for k, v in figures.items()})
                if step % self.cfg.log_every == 0 or step == total:
                    self.state["history"].append({"phase": self.state["phase"], "step": step, **figures})
                if step % spe == 0 or step == total:
                    self._end_of_epoch(step // spe if step % spe == 0 else step / spe)
                if step % spe == 0 or step == total or (self.cfg.checkpoint_every and step % self.cfg.checkpoint_every == 0):
                    self.checkpoint()
                if step >= total:
                    break
        bar.close()

    def _end_of_epoch(self, epoch: float) -> None:
        phase = self.state["phase"]
        if phase == "search" and not self.cfg.eval_during_search:
            return
        model = self.slimmed if phase == "post" else self.student
        if phase == "search":
            self.pd.apply_masks(self.student)
            self.pd.sample_gates(self.student, training=False)
        top1 = evaluate(model, self.data.test, self.device, desc=f"eval {phase}")
        ratio = float(self.pd.resource(hard=True).detach()) if phase == "search" else macs(self.slimmed, self.input_size) / self.dense_macs
        self.state["evals"].append({"phase": phase, "epoch": epoch, "top1": top1, "R": ratio})
        log.info("%s epoch %.2f: top-1 %.2f%% at R = %.3f", phase, epoch, top1, ratio)

    def _loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Task + KD loss; the student and teacher forward passes run under bf16 autocast on CUDA."""
        with autocast(self.device):
            out = model(x)
            teacher_logits = None if self.cfg.kd.kind == "none" else predict_logits(self.teacher, x)
        return distillation_loss(out, y, teacher_logits, self.cfg.kd, self.data.label_smoothing)

    def _set_distilled_training(self, model: nn.Module) -> None:
        if hasattr(model, "set_distilled_training"):
            model.set_distilled_training(self.cfg.kd.kind != "none")

    def search_step(self, x, y, step: int) -> dict:
        searching = step >= self.warmup_steps
        self.student.train()
        self.pd.apply_masks(self.student)
        self.pd.sample_gates(self.student, training=True)
        loss = optimizer_step(self._loss(self.train_student, x, y), self.optimizer, self.scheduler, step, "search")
        if self.pd.gate_logits.grad is not None:
            # The only rank-dependent input of the search step. What earlier steps accumulated is already
            # identical on every rank, so averaging the sum averages this step's task gradient.
            distributed.all_reduce_mean_(self.pd.gate_logits.grad)
        self.pd.proximal_shrink(self.student, self.optimizer.param_groups[0]["lr"])
        return {"loss": distributed.mean_over_ranks(loss), **self.pd.step(searching)}

    def post_step(self, x, y, step: int) -> dict:
        self.slimmed.train()
        loss = optimizer_step(self._loss(self.train_slimmed, x, y), self.optimizer, self.scheduler, step, "post-training")
        return {"loss": distributed.mean_over_ranks(loss)}

    def _start_post_training(self, slimmed: nn.Module) -> None:
        self.slimmed = slimmed.requires_grad_(True).to(self.device)
        self.train_slimmed = distributed.wrap(self.slimmed, self.device)
        self._set_distilled_training(self.slimmed)
        self.optimizer, self.scheduler = make_optimizer(self.slimmed, self.cfg.post_lr, self.cfg.post_weight_decay,
                                                        self.cfg.post_epochs, self.steps_per_epoch,
                                                        self.cfg.post_warmup_epochs)

    def _finish_search(self) -> None:
        plan = self.pd.final_plan(self.student)
        self._check_ranks_agree()
        if distributed.world_size() > 1:
            log.info("all %d ranks hold the same search state and architecture", distributed.world_size())
        self.begin_post_training(slim(self.student, plan), plan)

    def begin_post_training(self, slimmed: nn.Module, plan: list[LayerPlan]) -> None:
        """Switch to post-training `slimmed`: the search's result, or a model another method pruned (baselines)."""
        self.state["metrics"].update(plan=[p.to_dict() for p in plan],
                                     top1_after_search=evaluate(slimmed, self.data.test, self.device, desc="eval slimmed"))
        log.info("slimmed to R = %.4f, top-1 before post-training %.2f%%",
                 macs(slimmed, self.input_size) / self.dense_macs, self.state["metrics"]["top1_after_search"])
        self.state.update(phase="post", step=0)
        self._start_post_training(slimmed)
        self.checkpoint()

    def run(self) -> dict:
        cfg = self.cfg
        if not (cfg.resume and self.resume()):
            self.state["metrics"]["top1_teacher"] = evaluate(self.teacher, self.data.test, self.device, desc="eval teacher")
            log.info("teacher top-1 %.2f%%, dense model %.2f M MACs", self.state["metrics"]["top1_teacher"], self.dense_macs / 1e6)
        started = time.time()
        if self.state["phase"] == "search":
            self._set_distilled_training(self.student)
            self._loop(self.search_steps, self.search_step, "search")
            self._finish_search()
        self._loop(self.post_steps, self.post_step, "post-train")
        self.state["metrics"]["train_seconds_this_session"] = time.time() - started
        return self._finish()

    def _finish(self) -> dict:
        model = self.slimmed.eval()
        if hasattr(model, "set_distilled_training"):
            model.set_distilled_training(False)
        top1 = evaluate(model, self.data.test, self.device, desc="eval final")  # every rank evaluates its shard
        report = self._write_outputs(model, top1) if distributed.is_main() else None
        return distributed.broadcast_from_main(report)

    def _write_outputs(self, model: nn.Module, top1: float) -> dict:
        """Rank 0's part of the end: throughput, the saved model, report.json and report.png."""
        from .report import write_report

        m = self.state["metrics"]
        slim_macs = macs(model, self.input_size)
        dense_tp = throughput(self.dense, self.input_size, self.cfg.throughput_batch, self.device)
        slim_tp = throughput(model, self.input_size, self.cfg.throughput_batch, self.device)
        save(model.cpu(), self.out)
        report = {
            "budget": self.cfg.budget, "macs_dense": self.dense_macs, "macs": slim_macs,
            "ratio": slim_macs / self.dense_macs, "top1_teacher": m["top1_teacher"], "top1": top1,
            "top1_after_search": m["top1_after_search"], "throughput_dense": dense_tp, "throughput": slim_tp,
            "throughput_batch": self.cfg.throughput_batch, "device": str(self.device),
            "processes": distributed.world_size(),
            "params_dense": sum(p.numel() for p in self.dense.parameters()),
            "params": sum(p.numel() for p in model.parameters()),
            "layers": [_layer_summary(p) for p in m["plan"]], "history": self.state["history"],
            "evals": self.state["evals"], "config": _jsonable(asdict(self.cfg)),
        }
        atomic_write_text(self.out / "report.json", _dumps(report))
        write_report(report, self.out / "report.png")
        (self.out / CHECKPOINT).unlink(missing_ok=True)
        log.info("compressed to R = %.4f (budget %.2f): top-1 %.2f%% (teacher %.2f%%), %.0f -> %.0f images/s",
                 report["ratio"], self.cfg.budget, top1, m["top1_teacher"], dense_tp, slim_tp)
        return report


def _layer_summary(plan: dict) -> dict:
    return {"heads": len(plan["heads"]), "head_dim": len(plan["dims"][0]) if plan["dims"] else 0,
            "neurons": len(plan["neurons"]), "attn": plan["attn"], "mlp": plan["mlp"]}


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)


def _dumps(report: dict) -> str:
    import json

    return json.dumps(report, indent=1)


def compress(cfg: CompressConfig | None = None, model: nn.Module | None = None, teacher: nn.Module | None = None,
             **overrides) -> dict:
    """Compress a ViT to `cfg.budget` of its MACs; returns the report (also written to `cfg.out`)."""
    cfg = cfg or CompressConfig()
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise TypeError(f"unknown compress option {key!r}")
        setattr(cfg, key, value)
    return Run(cfg, model=model, teacher=teacher).run()


def post_train(cfg: CompressConfig, slimmed: nn.Module, plan: list[LayerPlan], model: nn.Module | None = None,
               teacher: nn.Module | None = None) -> dict:
    """Post-train a model slimmed by another method exactly as `compress` post-trains its own result.

    Same data order, KD, optimizer, schedule, evaluation and report as `compress(cfg, model, teacher)`
    after its search, so baselines compare at equal training. `plan` gives the report its per-block
    counts; `top1_after_search` is then the accuracy right after pruning.
    """
    run = Run(cfg, model=model, teacher=teacher)
    run.begin_post_training(slimmed, plan)
    return run.run()
