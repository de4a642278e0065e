"""UVC as published (`--preset paper`) beside uvc's default, and what each departure from the paper does.

    python bench/paper.py --threads 1                                   # bench/teacher: ~50 min on one core
    python bench/paper.py --teacher pretrained --budgets 0.5 --seeds 1  # the pretrained teacher at B = 0.5

Three stages, all at the benchmark's equal training (bench/run.py's settings for the teacher: the same
images, epochs, batch, KD teacher and data order as every other method):
1. tuning: the preset's post-training rate is chosen on validation from the grid every method's was chosen
   from (`POST_LR_GRID`, seed 0, every budget; the best mean over the budgets), test unread;
2. the headline: uvc's default (its own rate, run.POST_LRS) and the preset at its chosen rate, `--seeds`
   seeds, every budget, test read once at the end of each run;
3. the ablation, seed 0: the preset with one switch at a time set to uvc's default (`SWITCHES`).
Writes bench/results/paper.json (paper_pretrained.json for --teacher pretrained) after every run; run
again with the same arguments to continue a killed sweep. `python bench/run.py --report-only` puts it
in BENCHMARKS.md (section 7).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from run import (NOT_READ_BY_RUNS, POST_LRS, ROOT, add_teacher_arg, compress_config, continue_sweep, load_teacher, machine,
                 run_record, save, settings_for, teacher_label, training_epochs)
from summary import PAPER_LABELS
from uvc.compress import CompressConfig, Run, compress
from uvc.presets import PRESETS, apply_preset, set_fields

log = logging.getLogger("bench")
# Per 128 images: the equal grid every method's rate was chosen from (bench/tune.py, BENCHMARKS.md section 6b),
# with 3e-5, where UVC's and --one-shot's were first chosen.
POST_LR_GRID = (1e-3, 1e-4, 3e-5, 1e-5)
# One switch at a time from the preset to uvc's default: the fields each sets (labels: summary.PAPER_LABELS).
SWITCHES = {
    "paper": {},
    "paper_price": {"search.dual": "price"},
    "paper_hard": {"search.gates": "hard"},
    "paper_rewind": {"search.end": "rewind"},
    "paper_kd": {"kd.alpha": 0.5, "kd.reduction": "sample"},
}


def variant_config(s, variant: str, budget: float, seed: int, post_lr: float, out: Path, read_test: bool) -> CompressConfig:
    """The benchmark's UVC configuration, or for a paper variant the preset on top of it, its switch, and
    `post_lr`; epochs, data and evaluation stay the benchmark's, so every variant trains equally."""
    cfg = compress_config(s, budget, out, "uvc", seed, read_test)
    if variant != "uvc":
        apply_preset(cfg, "paper")
        set_fields(cfg, SWITCHES[variant])
    cfg.post = dataclasses.replace(cfg.post, lr=post_lr)
    return cfg


def run_variant(teacher, s, variant: str, budget: float, seed: int, post_lr: float, out: Path, scores: dict,
                read_test: bool) -> dict:
    cfg = variant_config(s, variant, budget, seed, post_lr, out, read_test)
    started = time.perf_counter()
    report = compress(cfg, model=teacher, teacher=teacher, teacher_scores=scores)
    record = run_record(report, variant, seed, training_epochs(s, "uvc"), time.perf_counter() - started, out)
    return {**record, "post_lr": post_lr, "stage": "headline" if read_test else "tuning"}


def best_rate(runs: list[dict]) -> float:
    """The tuning rate with the best mean validation top-1 over the budgets."""
    by_rate: dict[float, list[float]] = {}
    for r in runs:
        by_rate.setdefault(r["post_lr"], []).append(r["top1_val"])
    return max(by_rate, key=lambda lr: statistics.fmean(by_rate[lr]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_teacher_arg(p)
    p.add_argument("--budgets", type=float, nargs="+", default=None, help="None: the benchmark's")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 of the headline rows")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-ablation", action="store_true", help="skip stage 3")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    s = settings_for(args.teacher)
    budgets = tuple(args.budgets or s.budgets)
    teacher = load_teacher(args.teacher)
    name = "paper_pretrained" if args.teacher == "pretrained" else "paper"
    path, runs_dir = ROOT / "bench" / "results" / f"{name}.json", ROOT / "runs" / "bench" / name
    results = {"command": shlex.join([os.path.relpath(sys.executable), *sys.argv]), "teacher": teacher_label(args.teacher),
               "settings": dataclasses.asdict(s), "budgets": budgets, "post_lr_grid": POST_LR_GRID,
               "preset": {k: v for k, v in PRESETS["paper"].items()}, "switches": SWITCHES,
               "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "machine": machine(args.threads), "load_average_start": os.getloadavg(), "runs": []}
    # The benchmark's seed count, method lists and timings are not read by these runs: a change of them keeps the sweep.
    results = continue_sweep(path, results, ("teacher", "settings", "preset"), tuple(NOT_READ_BY_RUNS))
    done = {(r["stage"], r["method"], r["budget"], r["seed"], r["post_lr"]) for r in results["runs"]}
    scores = Run(compress_config(s, budgets[0], runs_dir / "teacher", "uvc"), model=teacher, teacher=teacher).score_teacher()

    def run(stage: str, variant: str, budget: float, seed: int, lr: float) -> None:
        if (stage, variant, budget, seed, lr) in done:
            return
        log.info("=== %s: %s at B = %.2f, seed %d, post-training rate %g", stage, PAPER_LABELS[variant], budget, seed, lr)
        out = runs_dir / f"{stage}-{variant}-b{budget}-lr{lr:g}-s{seed}"
        results["runs"].append(run_variant(teacher, s, variant, budget, seed, lr, out,
                                           scores if stage == "headline" else {"test": None, "val": scores["val"]},
                                           read_test=stage == "headline"))
        done.add((stage, variant, budget, seed, lr))
        save(results, path)

    for lr in POST_LR_GRID:
        for budget in budgets:
            run("tuning", "paper", budget, 0, lr)
    results["paper_post_lr"] = lr_paper = best_rate([r for r in results["runs"] if r["stage"] == "tuning"])
    log.info("the preset's post-training rate, chosen on validation: %g", lr_paper)
    for seed in range(args.seeds):
        for budget in budgets:
            run("headline", "uvc", budget, seed, POST_LRS["uvc"])
            run("headline", "paper", budget, seed, lr_paper)
    if not args.no_ablation:
        for variant in SWITCHES:
            for budget in budgets:
                if variant != "paper":
                    run("headline", variant, budget, 0, lr_paper)
    results["load_average_end"] = os.getloadavg()
    results["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    save(results, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
