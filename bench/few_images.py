"""Compression with few training images (issue 14): 1,000 and 3,000 of Fashion-MNIST's, the rest unused.

    python bench/few_images.py --threads 1 --seeds 3   # B = 0.5; about 10 minutes a seed on one core
    python bench/few_images.py --post-lr 5e-5 --name few_images_post_lr_5e-5   # another post-training rate
    python bench/few_images.py --teacher pretrained --images 3000 --seeds 3 --threads 2   # UVC against --one-shot + KD

At equal training (2 epochs over the few images: UVC 1 search + 1 post-training, the baselines 2 of
post-training), the teacher is compressed by each of `--methods`: by default on bench/teacher UVC, the
uniform plan + KD and one-shot pruning with least-squares compensation + KD; on the pretrained teacher
UVC and `--one-shot` + KD, the comparison its issue sets a target on. The calibration images of the
compensation are among the same few images. Validation and test as in the benchmark protocol
(bench/run.py). Writes bench/results/few_images.json (pretrained/few_images.json) after every run;
run again with the same arguments, a killed sweep goes on from its finished runs (more `--seeds` or
`--images` add runs). `python bench/run.py --report-only` puts it in BENCHMARKS.md (BENCHMARKS_PRETRAINED.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import shlex
import sys

import torch

from run import (ROOT, settings_for, add_teacher_arg, at_post_lr, compress_config, continue_sweep, load_teacher, machine,
                 run_method, save, teacher_label)
from summary import LABELS
from uvc.compress import Run

METHODS = ("uvc", "uniform", "compensated")
PRETRAINED_METHODS = ("uvc", "oneshot")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_teacher_arg(p)
    p.add_argument("--images", type=int, nargs="+", default=[1000, 3000])
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--seeds", type=int, default=1, help="seeds 0 .. N-1 (the data order, and which images a seed sees "
                                                       "first, follow the seed; the few images are the same)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--post-lr", type=float, default=None, help="one post-training rate per 128 images for every method "
                                                                "(default: each method's in the benchmark)")
    p.add_argument("--methods", nargs="+", choices=list(LABELS), default=None,
                   help=f"(default: {' '.join(METHODS)}; with --teacher pretrained {' '.join(PRETRAINED_METHODS)})")
    p.add_argument("--name", default=None, help="results file bench/results/NAME.json (None: few_images, or "
                   "pretrained/few_images with --teacher pretrained, which BENCHMARKS_PRETRAINED.md reads)")
    args = p.parse_args()
    methods = args.methods or (PRETRAINED_METHODS if args.teacher == "pretrained" else METHODS)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    teacher = load_teacher(args.teacher)
    base = settings_for(args.teacher)
    args.name = args.name or ("pretrained/few_images" if args.teacher == "pretrained" else "few_images")
    path = ROOT / "bench" / "results" / f"{args.name}.json"
    results = {"command": shlex.join([os.path.relpath(sys.executable), *sys.argv]), "budget": args.budget,
               "teacher": teacher_label(args.teacher),
               "post_lrs": {m: (args.post_lr or base.post_lrs[m]) for m in methods},
               "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "machine": machine(args.threads), "load_average_start": os.getloadavg(), "runs": []}
    results = continue_sweep(path, results, ("teacher", "budget", "post_lrs"))
    done = {(r["images"], r["method"], r["seed"]) for r in results["runs"]}
    scores = None
    for seed in range(args.seeds):
        for images in args.images:
            # Batches of 64 so that a thousand images still give 15 steps an epoch.
            s = dataclasses.replace(base, budgets=(args.budget,), seeds=args.seeds, train_limit=images, batch_size=64,
                                    calibration_images=min(images, base.calibration_images))
            s = at_post_lr(s, args.post_lr) if args.post_lr else s
            for method in methods:
                if (images, method, seed) in done:
                    continue
                out = ROOT / "runs" / "bench" / args.name / f"{method}-n{images}-s{seed}"
                if scores is None:
                    scores = Run(compress_config(s, args.budget, out, method), model=teacher, teacher=teacher).score_teacher()
                record = run_method(method, args.budget, seed, teacher, s, out, scores)
                results["runs"].append({"images": images, **record})
                logging.info("seed %d, %d images, %s: test %.2f%%, validation %.2f%% at R = %.4f", seed, images, method,
                             record["top1"], record["top1_val"], record["ratio"])
                results["load_average_end"] = os.getloadavg()
                save(results, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
