"""UVC against a frozen-search control and baselines at equal MACs and equal training; writes BENCHMARKS.md.

    python bench/run.py            # full: budgets 0.3 / 0.5, 5 seeds, 70 runs, ~85 min on 2 free CPU cores (estimated below)
    python bench/run.py --resume   # after a kill, or to re-time: reuses the finished runs of the same settings
    python bench/run.py --quick    # a few minutes: budget 0.5, one seed, small data (runs/bench/quick/)

Equal training: every method trains `search_epochs + post_epochs` epochs in all, with the seed's data
order, AdamW and soft KD from the teacher. UVC, its ablations and the control go through
`uvc.compress` (search, fit, slimming, post-training); the baselines are pruned without training and
post-trained for the whole `search_epochs + post_epochs` by `uvc.compress.post_train`. The control
is `uvc.compress` with `SearchConfig(frozen=True, skip="none")`: the uniform plan trained through the
same masks and KD, nothing searched, so UVC against the control measures the search alone.

Every run monitors the validation split; the test split is read once, at the end of each run.
Results go to bench/results/results.json (quick mode: runs/bench/quick/results.json), rewritten after
every run so that `--resume` continues a killed benchmark; the tables go to BENCHMARKS.md (quick mode:
runs/bench/quick/BENCHMARKS.md, so a pipeline check never overwrites the full tables).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import uvc
from uvc.adapters import adapter_for
from uvc.budget import uniform_plan
from uvc.compress import CompressConfig, Run, compress, post_train
from uvc.data import DataConfig, build_data
from uvc.distill import KDConfig
from uvc.errors import UVCError
from uvc.io import atomic_write_text
from uvc.oneshot import one_shot
from uvc.search import SearchConfig

from baselines import plan_of_slimmed, taylor_gradients, torch_pruning_to_budget
from pretrained import teacher_digest, teacher_dir
from speed import deit_small_speed, speed_pair, steady_allocator, step_cost
from summary import (ABLATIONS, BENCH_TEACHER, BUNDLED_TEACHER, LABELS, MAIN_METHODS, RESULTS_FORMAT, SEARCHED,
                     TEACHER_NOTES, UNTRAINED, write_summary)

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench")
# The uniform baseline's ranking and allocation: "compensated" differs from "uniform" by the compensation alone.
COMPENSATED_IMPORTANCE = "weight"


# Each method's post-training rate per 128 images, chosen on validation by bench/tune.py: the best mean over
# both budgets of the equal grid 1e-5 / 1e-4 / 1e-3 (seed 0), which every method ran on both teachers
# (BENCHMARKS.md section 6b, BENCHMARKS_PRETRAINED.md section 6), so that no rival trains at a rate chosen for
# UVC. Methods that start from a least-squares refit tie at every rate on both teachers (post-training never
# raised the refit's validation score, so keep_best hands the refit back) and keep the gentle rate, the default
# of `uvc compress`. The uncompensated baselines must recover: on the pretrained teacher they do best at 1e-4,
# on bench/teacher at 1e-3 (FULL_POST_LRS). The control and the UVC ablations take UVC's, so that they differ
# from it by their switch alone; Torch-Pruning's Taylor ablation, outside the grid, takes magnitude's.
POST_LRS = {**dict.fromkeys(SEARCHED, 1e-5), "oneshot": 1e-5, "compensated": 1e-5,
            "uniform": 1e-4, "tp_magnitude": 1e-4, "tp_taylor": 1e-4,
            "oneshot_only": 1e-5}  # never used: no training
FULL_POST_LRS = {**POST_LRS, "uniform": 1e-3, "tp_magnitude": 1e-3, "tp_taylor": 1e-3}


@dataclass(frozen=True)
class Settings:
    """How much work each part gets; `--quick` swaps in QUICK."""

    budgets: tuple[float, ...]
    seeds: int  # seeds 0 .. seeds-1 for `methods`; the `ablations` (and the untrained rows) run seed 0 only
    train_limit: int | None  # training images, of the 55,000 outside the validation split (bench/teacher trained on those)
    val_limit: int | None
    test_limit: int | None
    batch_size: int
    search_epochs: float  # UVC / control search; the baselines post-train search_epochs + post_epochs instead
    search_warmup_epochs: float
    post_epochs: float
    taylor_batches: int
    calibration_images: int  # unlabeled training images for least squares: one-shot, compensated, the rewound end
    speed_batches: tuple[int, ...]  # teacher against UVC's slimmed models
    speed_rounds: int
    deit_batches: tuple[int, ...]
    cost_steps: int
    deit_budgets: tuple[float, ...] = (0.5, 0.3)
    deit_width_multiples: tuple[int, ...] = (1, 8)
    post_lrs: dict[str, float] = field(default_factory=lambda: dict(POST_LRS))  # each method's, per 128 images
    methods: tuple[str, ...] = MAIN_METHODS
    ablations: tuple[str, ...] = ABLATIONS


# Timings behind FULL (2-core CPU, free; the 2026-11-25 full run): a search step at batch 128 takes ~0.70 s,
# a post-training step ~0.3-0.4 s, and a run evaluates ~20,000 slimmed images (validation before and after
# post-training, test; the teacher once per invocation). With 6,400 training images (50 steps an epoch) a
# search + post run takes ~65-75 s and a baseline ~50-80 s: 70 runs ~75 min, speed (on 1 and 2 threads)
# and search cost ~9 min (2 free cores). On one thread a seed of the main methods at both budgets took
# ~22 min (2026-11-26: seeds 3 and 4 in 45 min); BENCHMARKS.md's header sums the recorded runs' "seconds"
# in bench/results/results.json.
# Five seeds, not three: at B = 0.5 the methods differ by about one standard deviation of the seeds, and
# three draws give that standard deviation itself to within about +-50 %.
# 10,000 training images would take ~60 min.
FULL = Settings(budgets=(0.3, 0.5), seeds=5, train_limit=6400, val_limit=None, test_limit=None, batch_size=128,
                search_epochs=1.0, search_warmup_epochs=0.2, post_epochs=1.0, taylor_batches=8, calibration_images=1000,
                speed_batches=(1, 64), speed_rounds=5, deit_batches=(1, 64), cost_steps=20,
                post_lrs=dict(FULL_POST_LRS))
# The pretrained teacher (bench/pretrained.py: DINOv2-S/14 at 98 px, 1.10 G MACs, 12x bench/teacher's per
# image) on 2 CPU cores. At 112 px and 2,000 images a UVC run took ~10 min (2026-12-05); at 98 px the tokens fall
# from 65 to 50, and 1,000 training images (the smaller few-images case) halve the steps; evaluated on
# 1,000 validation and 2,000 test images. Measured 2026-12-07 on one thread beside another job: a UVC run 7-10 min,
# a --one-shot + KD run 6-11 min; the rewound end's refit took 170 s on 1,000 images, 81 s on the 500 used since.
# On both threads alone a UVC or control run took 199-217 s (bench/tune.py, 2026-12-07). The 2-hour limit
# therefore holds the methods only: 5 methods x 2 budgets x 3 seeds = 30 runs, and --one-shot without
# training once per budget (no seed enters it). Timed whole on 2 threads (2026-12-07): 61.8 min, the runs 51-159 s
# each (BENCHMARKS_PRETRAINED.md); no UVC ablations, no compensated baseline (--one-shot is the compensated method users get) and no
# DeiT-Small timing (it does not depend on the teacher: FULL's). Post-training rates: bench/teacher's, which the
# pretrained teacher's own grid confirmed on validation (bench/results/pretrained/tune.json, seed 0, both budgets,
# 1e-5 / 1e-4 / 1e-3 for every method: 1e-4 best for uniform and Torch-Pruning; UVC, the control and --one-shot
# tie at every rate, since post-training never raised the refit's validation score and keep_best hands the refit
# back, so the gentler rate, the default, stays).
PRETRAINED = Settings(budgets=(0.3, 0.5), seeds=3, train_limit=1000, val_limit=1000, test_limit=2000, batch_size=64,
                      search_epochs=1.0, search_warmup_epochs=0.2, post_epochs=1.0, taylor_batches=4,
                      calibration_images=500, speed_batches=(1, 64), speed_rounds=5, deit_batches=(1, 64), cost_steps=8,
                      deit_budgets=(), methods=("uvc", "control", "uniform", "tp_magnitude", "oneshot"),
                      ablations=UNTRAINED)
QUICK = Settings(budgets=(0.5,), seeds=1, train_limit=2048, val_limit=1000, test_limit=2000, batch_size=64,
                 search_epochs=1.0, search_warmup_epochs=0.25, post_epochs=1.0, taylor_batches=2, calibration_images=1000,
                 speed_batches=(1, 64), speed_rounds=2, deit_batches=(1,), cost_steps=8,
                 ablations=(*ABLATIONS, *UNTRAINED))  # every method once: the whole pipeline


def settings_for(teacher: str, quick: bool = False) -> Settings:
    """The benchmark's settings for a `--teacher` value: QUICK for a pipeline check, PRETRAINED for the
    pretrained teacher (12x bench/teacher's MACs per image), FULL otherwise."""
    if quick:
        return QUICK
    return PRETRAINED if teacher == "pretrained" else FULL


def planned_runs(s: Settings) -> list[tuple[str, float, int]]:
    """(method, budget, seed) of every accuracy run, seed by seed, so that an interrupted benchmark
    already holds one complete table."""
    return [(method, budget, seed) for seed in range(s.seeds) for budget in s.budgets
            for method in (*s.methods, *s.ablations) if seed == 0 or method in s.methods]


def training_epochs(s: Settings, method: str) -> tuple[float, float]:
    """(search epochs, post-training epochs) of a method: the same total for every method but the untrained ones."""
    if method in UNTRAINED:
        return 0.0, 0.0
    return (s.search_epochs, s.post_epochs) if method in SEARCHED else (0.0, s.search_epochs + s.post_epochs)


def at_post_lr(s: Settings, lr: float) -> Settings:
    """`s` with one post-training rate for every method."""
    return dataclasses.replace(s, post_lrs=dict.fromkeys(s.post_lrs, lr))


def compress_config(s: Settings, budget: float, out: Path, method: str, seed: int = 0,
                    read_test: bool = True) -> CompressConfig:
    """One configuration for every method: only the control and the UVC ablations flip their switch, and
    the baselines' post-training takes the epochs UVC spends searching. `read_test=False` leaves the test
    split unread, for choices made on validation."""
    defaults = CompressConfig()
    search = SearchConfig(
        schedule=dataclasses.replace(defaults.search.schedule, epochs=s.search_epochs),
        warmup_epochs=s.search_warmup_epochs, frozen=method == "control",
        skip="both" if method == "uvc_skip" else "none", importance="norm" if method == "uvc_norm" else defaults.search.importance,
        start="compensate" if method == "uvc_compensated" else "fade",
        end="searched" if method == "uvc_searched" else defaults.search.end)
    post = dataclasses.replace(defaults.post, epochs=training_epochs(s, method)[1], lr=s.post_lrs[method])
    data = DataConfig(train_limit=s.train_limit, val_limit=s.val_limit, test_limit=s.test_limit, batch_size=s.batch_size)
    return CompressConfig(budget=budget, out=str(out), device="cpu", seed=seed, data=data, search=search, post=post,
                          kd=KDConfig(), calibration_images=s.calibration_images, eval_during_search=False, test_at_end=read_test,
                          throughput_rounds=1, throughput_batch=8,  # speed is measured apart, in section 2
                          overwrite=True)  # the benchmark owns its run folders; its --resume reuses finished ones


def teacher_data(cfg: CompressConfig, teacher):
    """The benchmark's data as the teacher takes it, as `uvc.compress` builds it (Fashion-MNIST resized and
    replicated for the pretrained teacher)."""
    return build_data(cfg.data, seed=cfg.seed, input_size=adapter_for(teacher).input_size(teacher),
                      pretrained_cfg=getattr(teacher, "pretrained_cfg", None))


def prune_baseline(method: str, teacher, budget: float, cfg: CompressConfig, s: Settings):
    """(slimmed model, plan) of a baseline, pruned from the teacher without training; the teacher is not changed."""
    if method == "uniform":
        plan = uniform_plan(teacher, budget)
        return uvc.slim(teacher, plan), plan
    if method in ("compensated", "oneshot", "oneshot_only"):
        batches = teacher_data(cfg, teacher).calibration  # unaugmented, fixed order, as `--one-shot` uses
        choice = dict(importance=COMPENSATED_IMPORTANCE, allocation="uniform") if method == "compensated" else {}
        slimmed, plan, _ = one_shot(model=teacher, budget=budget, batches=batches, compensate=True,
                                    calibration_images=s.calibration_images, **choice)  # "oneshot*": `--one-shot`'s defaults
        return slimmed, plan
    criterion = method.removeprefix("tp_")
    source = teacher
    if criterion == "taylor":
        source = taylor_gradients(teacher, teacher_data(cfg, teacher).train, s.taylor_batches)
    slimmed = torch_pruning_to_budget(source, budget, criterion)
    return slimmed, plan_of_slimmed(slimmed)


def run_method(method: str, budget: float, seed: int, teacher, s: Settings, out: Path,
               teacher_scores: dict[str, float | None], read_test: bool = True) -> dict:
    """Compress the teacher to `budget` with one method and seed; returns the figures the tables need.

    `teacher_scores` is the teacher's top-1 on each split, the same in every run (evaluation draws
    no random numbers and the splits do not depend on the seed), so it is computed once.
    """
    cfg = compress_config(s, budget, out, method, seed, read_test)
    start = time.perf_counter()
    if method in SEARCHED:
        report = compress(cfg, model=teacher, teacher=teacher, teacher_scores=teacher_scores)
    else:
        slimmed, plan = prune_baseline(method, teacher, budget, cfg, s)
        report = post_train(cfg, slimmed, plan, model=teacher, teacher=teacher, teacher_scores=teacher_scores)
    return run_record(report, method, seed, training_epochs(s, method), time.perf_counter() - start, out)


def run_record(report: dict, method: str, seed: int, epochs: tuple[float, float], seconds: float, out: Path) -> dict:
    """What the results files keep of one run's report."""
    return {"method": method, "budget": report["budget"], "seed": seed, "epochs": list(epochs),
            "ratio": report["ratio"], "macs": report["macs"], "macs_dense": report["macs_dense"],
            "top1": report["top1"], "top1_val": report["top1_val"], "top1_val_before_post": report["top1_val_after_search"],
            "top1_teacher": report["top1_teacher"], "top1_val_teacher": report["top1_val_teacher"],
            "search_gap": report.get("search_gap"), "kept_epoch": report.get("kept_epoch"), "params": report["params"], "layers": report["layers"],
            "seconds": seconds, "out": os.path.relpath(out, ROOT)}


def machine(threads: int) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        names = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import timm
    import torch_pruning

    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "timm": timm.__version__, "torch_pruning": getattr(torch_pruning, "__version__", "?"),
            "python": platform.python_version(), "os": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def add_teacher_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", default=BENCH_TEACHER,
                   help=f"a model folder saved by uvc.save (relative to the repository or absolute), 'bundled' for the "
                        f"teacher `uvc compress` uses by default, or 'pretrained' for bench/pretrained.py's DINOv2-S/14 "
                        f"classifier (default: {BENCH_TEACHER}, {TEACHER_NOTES[BENCH_TEACHER]})")


def teacher_label(name: str) -> str:
    """How results files name a teacher: the folder as given, BUNDLED_TEACHER, or "pretrained" with the digest
    of its weights, which change when bench/pretrained.py is run again with other settings (or threads): a sweep
    then refuses to continue over the other teacher's runs."""
    if name != "pretrained":
        return BUNDLED_TEACHER if name == "bundled" else name
    return f"pretrained {teacher_digest()}"


def load_teacher(name: str):
    folder = {"bundled": None, "pretrained": teacher_dir()}.get(name, ROOT / name)
    try:
        return uvc.load_model(None if folder is None else str(folder))
    except UVCError as e:
        advice = " Build it with python bench/pretrained.py." if name == "pretrained" else ""
        sys.exit(f"bench: cannot load the teacher {name!r}: {e}.{advice}\n"
                 "Pass --teacher DIR (a model folder written by uvc.save), --teacher bundled or --teacher pretrained.")


def places(quick: bool, teacher: str = BENCH_TEACHER) -> tuple[Path, Path, Path]:
    """(folder of results.json and the plots, BENCHMARKS.md, folder of the runs' models) of a mode; the
    pretrained teacher's full run writes beside the bundled teacher's, never over it (its models too:
    --resume and the speed timings read them back)."""
    runs = ROOT / "runs" / "bench"
    if quick:
        return runs / "quick", runs / "quick" / "BENCHMARKS.md", runs / "quick"
    if teacher == "pretrained":
        return ROOT / "bench" / "results" / "pretrained", ROOT / "BENCHMARKS_PRETRAINED.md", runs / "pretrained"
    return ROOT / "bench" / "results", ROOT / "BENCHMARKS.md", runs / "full"


def save(results: dict, path: Path) -> None:
    """Write a results file atomically: a killed benchmark leaves the previous version whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=1))


def continue_sweep(path: Path, results: dict, same: tuple[str, ...], grows: tuple[str, ...] = ()) -> dict:
    """`results` holding the runs a killed sweep left in `path`, if the fields `same` agree (else one line and exit),
    but for the keys `grows` of a `settings` among them, which only add runs: the sweep keeps its first date and
    the history the file records, and lists each continuation's date under "resumed"."""
    if not path.is_file():
        return results
    earlier = json.loads(path.read_text())

    def fixed(r: dict) -> dict:
        out = json.loads(json.dumps({k: r.get(k) for k in same}))
        if isinstance(out.get("settings"), dict):
            out["settings"] = {k: v for k, v in out["settings"].items() if k not in grows}
        return out

    if fixed(earlier) != fixed(results):
        sys.exit(f"bench: {os.path.relpath(path, ROOT)} holds runs of another {' or '.join(same)}; move it away to start over")
    history = {k: v for k, v in earlier.items() if k not in SWEEP_END}  # e.g. "replaced", "rebuilt_tables"
    return {**history, **results, "runs": earlier["runs"], "date": earlier["date"],
            "resumed": [*earlier.get("resumed", []), results["date"]]}


SWEEP_END = ("finished", "seconds", "load_average_end")  # what a sweep writes when it ends: a continuation has not yet


# "deit_budget" is the name DeiT-Small's single budget had before "deit_budgets".
NOT_READ_BY_RUNS = {"seeds", "speed_batches", "speed_rounds", "deit_batches", "deit_budgets", "deit_budget",
                    "deit_width_multiples", "cost_steps", "methods", "ablations"}


def _run_settings(settings: dict) -> dict:
    """The settings two invocations must share for a run to be reused: all but those no accuracy run reads
    (the seed count only says how many runs there are; the timings come after the runs) and the post-training
    rates, which each run reads only for its own method (`previous_runs` compares that one)."""
    return {k: v for k, v in settings.items() if k not in NOT_READ_BY_RUNS and k != "post_lrs"}


def previous_runs(results: dict, folder: Path) -> dict:
    """Accuracy runs of an earlier invocation with the same settings (the seed count and timings aside) and
    teacher, by (method, budget, seed). Anything else is refused rather than started over: --resume asks
    for the earlier runs, and a fresh benchmark takes more than an hour."""
    path = folder / "results.json"
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    before, now = _run_settings(old.get("settings", {})), _run_settings(json.loads(json.dumps(results["settings"])))
    differences = [name for name, a, b in (("format", old.get("format"), RESULTS_FORMAT),
                                           ("teacher", old.get("teacher"), results["teacher"])) if a != b]
    differences += sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if differences:
        sys.exit(f"bench: {os.path.relpath(path, ROOT)} differs from this invocation in {', '.join(differences)}, "
                 "so its runs cannot be reused; run without --resume to start over")
    rate_before, rate_now = old.get("settings", {}).get("post_lrs", {}), results["settings"]["post_lrs"]
    return {(r["method"], r["budget"], r["seed"]): r for r in old.get("accuracy", [])
            if rate_before.get(r["method"]) == rate_now[r["method"]]
            and (not is_timed(r["method"], r["seed"]) or (ROOT / r["out"] / "model.safetensors").is_file())}


def is_timed(method: str, seed: int) -> bool:
    """Whether the speed timings read this run's model back (UVC's of seed 0); any other run's record is all
    --resume needs of it."""
    return method == "uvc" and seed == 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="budget 0.5, one seed, small data: a few minutes")
    add_teacher_arg(p)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for everything (fixed for the timings)")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds 0 .. N-1 instead of the settings' (a later --resume with more seeds adds the rest)")
    p.add_argument("--resume", action="store_true", help="keep the finished accuracy runs of the same settings and teacher")
    p.add_argument("--report-only", action="store_true", help="rewrite BENCHMARKS.md and the plots from results.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    folder, md_path, out_root = places(args.quick, args.teacher)
    if args.report_only:
        if not (folder / "results.json").is_file():
            sys.exit(f"bench: no {folder / 'results.json'} to report; run the benchmark first")
        write_summary(json.loads((folder / "results.json").read_text()), md_path, folder)
        return 0

    try:
        import torch_pruning  # noqa: F401  (checked before an hour of work, not after)
    except ImportError:
        sys.exit("bench: torch-pruning is missing; install the project's bench extra: pip install -e '.[bench]'")
    torch.set_num_threads(args.threads)
    s = settings_for(args.teacher, args.quick)
    if args.seeds is not None:
        if args.seeds < 1:
            sys.exit(f"bench: --seeds must be at least 1, got {args.seeds}")
        s = dataclasses.replace(s, seeds=args.seeds)
    teacher = load_teacher(args.teacher)
    started = time.perf_counter()
    results = {
        "format": RESULTS_FORMAT, "mode": "quick" if args.quick else "full", "settings": asdict(s),
        "teacher": teacher_label(args.teacher),
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(args.threads), "load_average_start": os.getloadavg(), "accuracy": [], "speed": [],
    }
    done = previous_runs(results, folder) if args.resume else {}
    todo = planned_runs(s)
    results["reused_runs"] = sum(key in done for key in todo)
    log.info("%d accuracy runs, %d reused", len(todo), results["reused_runs"])

    teacher_scores = None
    for i, (method, budget, seed) in enumerate(todo, 1):
        if (method, budget, seed) not in done:
            log.info("=== [%d/%d] %s at B = %.2f, seed %d", i, len(todo), LABELS[method], budget, seed)
            if teacher_scores is None:
                teacher_scores = Run(compress_config(s, budget, out_root / "teacher", "uvc", 0), model=teacher,
                                     teacher=teacher).score_teacher()
            done[(method, budget, seed)] = run_method(method, budget, seed, teacher, s,
                                                      out_root / f"{method}-b{budget}-s{seed}", teacher_scores)
        results["accuracy"].append(done[(method, budget, seed)])
        save(results, folder / "results.json")

    # Small models gain less from a second thread than their dense teacher does, so the speedup is
    # measured on one thread as well as on the run's.
    speed_threads = sorted({1, args.threads})
    results["allocator"] = steady_allocator()
    log.info("=== throughput on %s thread(s): the teacher against UVC's slimmed models of seed 0; %s",
             " and ".join(map(str, speed_threads)), results["allocator"])
    input_size = adapter_for(teacher).input_size(teacher)
    for budget in s.budgets:
        run = done[("uvc", budget, 0)]
        slimmed = uvc.load(ROOT / run["out"])
        results["speed"].append({"method": "uvc", "budget": budget, "seed": 0, "ratio": run["ratio"],
                                 "pairs": [speed_pair(teacher, slimmed, input_size, b, s.speed_rounds, threads=t)
                                           for t in speed_threads for b in s.speed_batches]})
    save(results, folder / "results.json")

    log.info("=== throughput: deit_small_patch16_224 at R <= %s, widths at multiples of %s",
             " and ".join(map(str, s.deit_budgets)), " and ".join(map(str, s.deit_width_multiples)))
    results["deit_small"] = [deit_small_speed(b, s.deit_batches, s.speed_rounds, width_multiple=w, threads=t)
                             for b in s.deit_budgets for t in speed_threads for w in s.deit_width_multiples]
    save(results, folder / "results.json")

    log.info("=== search cost: UVC search step against a plain KD step")
    results["search_cost"] = step_cost(compress_config(s, 0.5, out_root / "step-cost", "uvc"), teacher, s.cost_steps)
    results["seconds"] = time.perf_counter() - started
    results["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    results["load_average_end"] = os.getloadavg()
    save(results, folder / "results.json")
    write_summary(results, md_path, folder)
    log.info("done in %.1f min: %s and %s", results["seconds"] / 60, os.path.relpath(md_path, ROOT),
             os.path.relpath(folder, ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
