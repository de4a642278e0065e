"""Choose how UVC splits the benchmark's training between search and post-training, on validation alone.

    python bench/tune.py --budgets 0.5 0.3 --seeds 3 --threads 2   # search 0.5 / 1 / 1.5 of the 2 epochs: ~22 min

The benchmark (bench/run.py) trains every method 2 epochs in all; UVC spends `search_epochs` of them
searching and the rest post-training. Each search length tried here keeps that total and scales the
search's warm-up and fade with it, so the search keeps its shape and only its length changes. No run
reads the test split (`CompressConfig.test_at_end=False`), so the choice can be made here and the
benchmark's test figures stay untouched by it. The sweep is only honest with a teacher that never
trained on the validation images, as the default bench/teacher never did (`--teacher bundled` did).

Writes bench/results/NAME.json after every run (a killed sweep continues where it stopped when run
again with the same arguments) and prints validation top-1, mean and std over seeds, per split.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from run import FULL, ROOT, Settings, add_teacher_arg, compress_config, load_teacher, machine, save, teacher_label
from summary import tuning_table
from uvc.compress import CompressConfig, Run, compress
from uvc.search import SearchConfig

log = logging.getLogger("bench")
TOTAL_EPOCHS = FULL.search_epochs + FULL.post_epochs  # what every method trains in the benchmark


def split_settings(base: Settings, search_epochs: float) -> Settings:
    """`base` with `search_epochs` of search (its warm-up scaled alike) and the rest of the same total post-training."""
    total = base.search_epochs + base.post_epochs
    if not 0 < search_epochs < total:
        raise SystemExit(f"tune: --search-epochs must lie strictly between 0 and {total:g}, got {search_epochs:g}")
    return dataclasses.replace(base, search_epochs=search_epochs, post_epochs=total - search_epochs,
                               search_warmup_epochs=base.search_warmup_epochs * search_epochs / base.search_epochs)


def tuning_config(base: Settings, budget: float, seed: int, search_epochs: float, out: Path) -> CompressConfig:
    """The benchmark's UVC configuration at another split: the fade scales with the search, and test stays unread."""
    cfg = compress_config(split_settings(base, search_epochs), budget, out, "uvc", seed)
    cfg.search.fade_epochs = SearchConfig().fade_epochs * search_epochs / base.search_epochs
    cfg.test_at_end = False
    return cfg


def tuning_run(teacher, base: Settings, budget: float, seed: int, search_epochs: float, teacher_val: float,
               out: Path) -> dict:
    """One UVC run of the sweep: validation figures only."""
    cfg = tuning_config(base, budget, seed, search_epochs, out)
    started = time.perf_counter()
    report = compress(cfg, model=teacher, teacher=teacher, teacher_scores={"test": None, "val": teacher_val})
    return {"budget": budget, "seed": seed, "search_epochs": search_epochs, "post_epochs": cfg.post.epochs,
            "ratio": report["ratio"], "top1_val": report["top1_val"], "top1_val_before_post": report["top1_val_after_search"],
            "seconds": time.perf_counter() - started}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_teacher_arg(p)
    p.add_argument("--budgets", type=float, nargs="+", default=list(FULL.budgets))
    p.add_argument("--search-epochs", type=float, nargs="+", default=[0.5, 1.0, 1.5],
                   help=f"search lengths to try; post-training takes the rest of {TOTAL_EPOCHS:g} epochs")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="tune", help="results file bench/results/NAME.json; run folders runs/bench/NAME/")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for search in args.search_epochs:
        split_settings(FULL, search)  # refuse a bad length before any work
    torch.set_num_threads(args.threads)
    teacher = load_teacher(args.teacher)
    path = ROOT / "bench" / "results" / f"{args.name}.json"
    results = {"command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
               "teacher": teacher_label(args.teacher),
               "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "machine": machine(args.threads), "runs": []}
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    if earlier.get("teacher") == results["teacher"]:
        results["runs"] = earlier["runs"]
        log.info("%d runs of an earlier sweep with this teacher kept (%s)", len(results["runs"]), path)
    done = {(r["budget"], r["seed"], r["search_epochs"]) for r in results["runs"]}
    cfg = compress_config(FULL, args.budgets[0], ROOT / "runs" / "bench" / args.name / "teacher", "uvc")
    cfg.test_at_end = False
    teacher_val = results["teacher_val"] = Run(cfg, model=teacher, teacher=teacher).score_teacher()["val"]
    for seed in range(args.seeds):
        for budget in args.budgets:
            for search in args.search_epochs:
                if (budget, seed, search) in done:
                    continue
                log.info("=== B = %.2f, seed %d, search %g + post-training %g epochs", budget, seed, search,
                         TOTAL_EPOCHS - search)
                out = ROOT / "runs" / "bench" / args.name / f"uvc-b{budget}-search{search:g}-s{seed}"
                results["runs"].append(tuning_run(teacher, FULL, budget, seed, search, teacher_val, out))
                save(results, path)
    print(tuning_table(results, FULL.search_epochs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
