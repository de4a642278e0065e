"""Choose the benchmark's training settings on validation alone: UVC's split, the post-training rate, and
what each part of the search adds.

    python bench/tune.py --budgets 0.5 0.3 --post-lrs 1e-4 --seeds 3 --threads 2   # search 0.5 / 1 / 1.5 of 2 epochs: ~22 min
    python bench/tune.py --budgets 0.5 --search-epochs 1 --post-lrs 1e-4 3e-5 --methods uvc oneshot --threads 2
    python bench/tune.py --search-epochs 1 --search-set y_init=0 y_lr=0 --threads 2   # UVC without the proximal shrink

The benchmark (bench/run.py) trains every method 2 epochs in all; UVC spends `search_epochs` of them
searching and the rest post-training. Each search length tried here keeps that total and scales the
search's warm-up and fade with it, so the search keeps its shape and only its length changes. The
post-training rate is each method's own (`Settings.post_lrs`): each rate tried here runs for every
method named, and each method keeps the best of its rates, so no rival trains at a rate chosen for UVC.
No run reads the test split (`CompressConfig.test_at_end=False`), so the choice can be made here and
the benchmark's test figures stay untouched by it. The sweep is only honest with a teacher that never
trained on the validation images, as the default bench/teacher never did (`--teacher bundled` did).

The rate defaults to UVC's in the benchmark, now 1e-5. The first split sweep in bench/results/tune.json
ran at 1e-4, the benchmark's rate then, so its recorded command repeats it only with `--post-lrs 1e-4`;
the split was swept again at 1e-5 (`--search-epochs 0.5 1.5`).

Writes bench/results/NAME.json after every run (a killed sweep continues where it stopped when run
again with the same arguments) and prints validation top-1, mean and std over seeds, per setting.
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

from run import (FULL, ROOT, Settings, settings_for, add_teacher_arg, at_post_lr, compress_config, load_teacher, machine, run_method, save,
                 teacher_label, training_epochs)
from summary import LABELS, search_set_items, tuning_table
from uvc.compress import CompressConfig, Run, compress
from uvc.errors import UVCError
from uvc.search import SearchConfig

log = logging.getLogger("bench")
TOTAL_EPOCHS = FULL.search_epochs + FULL.post_epochs  # what every method trains in the benchmark
SEARCH_SET_METHODS = ("uvc", "control")  # take --search-epochs and --search-set: the control differs from UVC by `frozen`


def split_settings(base: Settings, search_epochs: float) -> Settings:
    """`base` with `search_epochs` of search (its warm-up scaled alike) and the rest of the same total post-training."""
    total = base.search_epochs + base.post_epochs
    if not 0 < search_epochs < total:
        raise SystemExit(f"tune: --search-epochs must lie strictly between 0 and {total:g}, got {search_epochs:g}")
    return dataclasses.replace(base, search_epochs=search_epochs, post_epochs=total - search_epochs,
                               search_warmup_epochs=base.search_warmup_epochs * search_epochs / base.search_epochs)


BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


def parse_search_set(pairs: list[str]) -> dict[str, bool | int | float | str]:
    """`--search-set` KEY=VALUE pairs as SearchConfig fields, each VALUE read as its field's default's type;
    refused before any work if a key is not a field, a value does not read, or the result does not validate.
    `lr` is the search schedule's rate (per 128 images), the one field of `schedule` a sweep varies."""
    defaults = {f.name: getattr(SearchConfig(), f.name) for f in dataclasses.fields(SearchConfig) if f.name != "schedule"}
    defaults["lr"] = SearchConfig().schedule.lr
    changes: dict[str, bool | int | float | str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in defaults:
            raise SystemExit(f"tune: --search-set takes KEY=VALUE with KEY one of {', '.join(sorted(defaults))}; got {pair!r}")
        kind = type(defaults[key])
        try:
            changes[key] = BOOLEANS[value.lower()] if kind is bool else kind(value)
        except (KeyError, ValueError):
            raise SystemExit(f"tune: --search-set {pair}: {key} takes a value of type {kind.__name__}") from None
    try:
        with_search_set(SearchConfig(), changes).validate()
    except UVCError as e:
        raise SystemExit(f"tune: --search-set {' '.join(pairs)}: {e}") from e
    return changes


def tuning_config(base: Settings, budget: float, seed: int, search_epochs: float, out: Path,
                  search_set: dict | None = None) -> CompressConfig:
    """The benchmark's UVC configuration at another split (the fade scales with the search) with the
    `search_set` changes on top; test stays unread."""
    cfg = compress_config(split_settings(base, search_epochs), budget, out, "uvc", seed, read_test=False)
    cfg.search.fade_epochs = SearchConfig().fade_epochs * search_epochs / base.search_epochs
    cfg.search = with_search_set(cfg.search, search_set or {})
    return cfg


def with_search_set(search: SearchConfig, changes: dict) -> SearchConfig:
    """`search` with `--search-set` changes: `lr` sets the schedule's rate, every other key its own field."""
    fields = {k: v for k, v in changes.items() if k != "lr"}
    if "lr" in changes:
        fields["schedule"] = dataclasses.replace(search.schedule, lr=changes["lr"])
    return dataclasses.replace(search, **fields)


def tuning_run(teacher, base: Settings, method: str, budget: float, seed: int, search_epochs: float,
               teacher_val: float, out: Path, search_set: dict | None = None) -> dict:
    """One run of the sweep, validation figures only: UVC at `search_epochs` with the `search_set` changes, its
    frozen-search control the same way (it differs from UVC by `frozen` alone), any other method as the
    benchmark runs it (`search_epochs` and `search_set` are then ignored), each at its rate in `base`."""
    started = time.perf_counter()
    searched = method in SEARCH_SET_METHODS
    search_set, search = search_set if searched else {}, None
    if searched:
        cfg = tuning_config(base, budget, seed, search_epochs, out, search_set)
        cfg.search.frozen = method == "control"
        report = compress(cfg, model=teacher, teacher=teacher, teacher_scores={"test": None, "val": teacher_val})
        search_epochs, post_epochs = cfg.search.schedule.epochs, cfg.post.epochs
        ratio, val, val_before, kept = report["ratio"], report["top1_val"], report["top1_val_after_search"], report["kept_epoch"]
        # Every field as run, not only the changes: a later change of SearchConfig's defaults leaves the record readable.
        search = {k: v for k, v in dataclasses.asdict(cfg.search).items() if k != "schedule"} | {"lr": cfg.search.schedule.lr}
    else:
        record = run_method(method, budget, seed, teacher, base, out, {"test": None, "val": teacher_val}, read_test=False)
        (search_epochs, post_epochs), ratio = record["epochs"], record["ratio"]
        val, val_before, kept = record["top1_val"], record["top1_val_before_post"], record["kept_epoch"]
    return {"method": method, "budget": budget, "seed": seed, "search_epochs": search_epochs, "post_epochs": post_epochs,
            "post_lr": base.post_lrs[method], "search_set": search_set or {}, "ratio": ratio, "top1_val": val, "top1_val_before_post": val_before,
            "kept_epoch": kept, "search": search, "seconds": time.perf_counter() - started}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_teacher_arg(p)
    p.add_argument("--budgets", type=float, nargs="+", default=list(FULL.budgets))
    p.add_argument("--search-epochs", type=float, nargs="+", default=[0.5, 1.0, 1.5],
                   help=f"search lengths to try; post-training takes the rest of {TOTAL_EPOCHS:g} epochs")
    p.add_argument("--post-lrs", type=float, nargs="+", default=[FULL.post_lrs["uvc"]],
                   help="post-training rates per 128 images to try, each for every method (default: UVC's in the benchmark)")
    p.add_argument("--methods", nargs="+", default=["uvc"], choices=list(LABELS),
                   help="methods to run at each rate; only UVC and its control take --search-epochs and --search-set "
                        "(default: uvc)")
    p.add_argument("--search-set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="SearchConfig changes for UVC's and its control's runs, e.g. y_init=0 y_lr=0 (no proximal shrink) "
                        "or fade_epochs=0")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default=None,
                   help="results file bench/results/NAME.json; run folders runs/bench/NAME/ (None: tune, or "
                        "pretrained/tune with --teacher pretrained, which BENCHMARKS_PRETRAINED.md reads)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    settings = settings_for(args.teacher)
    args.name = args.name or ("pretrained/tune" if args.teacher == "pretrained" else "tune")
    for search in args.search_epochs:
        split_settings(settings, search)  # refuse a bad length before any work
    search_set = parse_search_set(args.search_set)
    set_key = tuple(sorted(search_set.items()))
    set_name = "".join(f"-{k}{v}" for k, v in search_set_items(search_set))  # a folder name
    torch.set_num_threads(args.threads)
    teacher = load_teacher(args.teacher)
    path = ROOT / "bench" / "results" / f"{args.name}.json"
    results = {"commands": [shlex.join([os.path.relpath(sys.executable), *sys.argv])],
               "teacher": teacher_label(args.teacher),
               "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "machine": machine(args.threads), "runs": []}
    earlier = json.loads(path.read_text()) if path.is_file() else {}
    if earlier and earlier.get("teacher") != results["teacher"]:
        sys.exit(f"tune: {os.path.relpath(path, ROOT)} holds a sweep of the teacher {earlier.get('teacher')!r}; "
                 "pass another --name to keep it")
    if earlier:
        results["runs"] = earlier["runs"]
        results["commands"] = [c for c in earlier["commands"] if c not in results["commands"]] + results["commands"]
        log.info("%d runs of an earlier sweep with this teacher kept (%s)", len(results["runs"]), path)
    done = {(r["method"], r["budget"], r["seed"], r["search_epochs"], r["post_lr"],
             tuple(sorted(r.get("search_set", {}).items()))) for r in results["runs"]}
    cfg = compress_config(settings, args.budgets[0], ROOT / "runs" / "bench" / args.name / "teacher", "uvc", read_test=False)
    teacher_val = results["teacher_val"] = Run(cfg, model=teacher, teacher=teacher).score_teacher()["val"]
    for seed in range(args.seeds):
        for budget in args.budgets:
            for lr in args.post_lrs:
                base = at_post_lr(settings, lr)
                for method in args.methods:
                    searched = method in SEARCH_SET_METHODS
                    for search in args.search_epochs if searched else [training_epochs(settings, method)[0]]:
                        changes = set_key if searched else ()
                        if (method, budget, seed, search, lr, changes) in done:
                            continue
                        log.info("=== %s at B = %.2f, seed %d, post-training rate %g%s%s", LABELS[method], budget, seed,
                                 lr, f", search {search:g} + post-training {TOTAL_EPOCHS - search:g} epochs"
                                 if searched else "", f", {dict(changes)}" if changes else "")
                        out = (ROOT / "runs" / "bench" / args.name /
                               f"{method}-b{budget}-search{search:g}-lr{lr:g}{set_name if changes else ''}-s{seed}")
                        results["runs"].append(tuning_run(teacher, base, method, budget, seed, search, teacher_val, out,
                                                          dict(changes)))
                        save(results, path)
    print(tuning_table(results, settings.search_epochs, settings.post_lrs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
