"""UVC against baselines at equal MACs, measured speedup and search cost; writes BENCHMARKS.md.

    python bench/run.py            # full: budgets 0.3 / 0.5 / 0.7, at most ~60 min on 2 CPU cores
    python bench/run.py --quick    # a few minutes: budget 0.5 only, small data

Every method starts from the same teacher and gets the same post-training (epochs, data order, KD,
optimizer) through `uvc.compress.post_train`; UVC's own runs go through `uvc.compress`. Results
go to bench/results/results.json (rewritten after every run, so `--resume` continues a killed
benchmark), the plots to bench/results/, the tables to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import uvc
from uvc.compress import CompressConfig, compress, post_train
from uvc.data import DataConfig, build_data
from uvc.distill import KDConfig
from uvc.errors import UVCError
from uvc.adapters import adapter_for
from uvc.budget import uniform_plan
from uvc.engine import Schedule
from uvc.search import SearchConfig

from baselines import plan_of_slimmed, taylor_gradients, torch_pruning_to_budget
from speed import deit_small_speed, speed_pair, step_cost
from summary import LABELS, write_summary

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
log = logging.getLogger("bench")


@dataclass(frozen=True)
class Settings:
    """How much work each part gets; `--quick` swaps in QUICK."""

    budgets: tuple[float, ...]
    train_limit: int | None  # training images used by the search and post-training (the teacher saw all 60k)
    test_limit: int | None
    batch_size: int
    search_epochs: float
    search_warmup_epochs: float
    post_epochs: float
    taylor_batches: int
    speed_batches: tuple[int, ...]
    speed_repeats: int
    cost_steps: int
    deit_budget: float = 0.5


FULL = Settings(budgets=(0.3, 0.5, 0.7), train_limit=10_000, test_limit=None, batch_size=128, search_epochs=1.0,
                search_warmup_epochs=0.2, post_epochs=1.0, taylor_batches=8, speed_batches=(1, 64), speed_repeats=5,
                cost_steps=20)
QUICK = Settings(budgets=(0.5,), train_limit=2048, test_limit=2000, batch_size=64, search_epochs=1.0,
                 search_warmup_epochs=0.25, post_epochs=1.0, taylor_batches=2, speed_batches=(1, 64), speed_repeats=3,
                 cost_steps=8)


def compress_config(s: Settings, budget: float, out: Path, method: str) -> CompressConfig:
    """One configuration for every method; only the UVC ablations flip their one switch."""
    defaults = CompressConfig()
    search = SearchConfig(schedule=Schedule(s.search_epochs, defaults.search.schedule.lr, warmup_epochs=0.05),
                          warmup_epochs=s.search_warmup_epochs,
                          skip="none" if method == "uvc_no_skip" else "both", prune=method != "uvc_no_prune")
    post = Schedule(s.post_epochs, defaults.post.lr, defaults.post.weight_decay, defaults.post.warmup_epochs)
    return CompressConfig(budget=budget, out=str(out), device="cpu", post=post, eval_during_search=False,
                          data=DataConfig(train_limit=s.train_limit, test_limit=s.test_limit, batch_size=s.batch_size),
                          search=search, kd=KDConfig(kind="none" if method == "uvc_no_kd" else "soft"))


def run_method(method: str, budget: float, teacher, s: Settings, out: Path) -> dict:
    """Compress the teacher to `budget` with one method; returns the numbers the tables need."""
    cfg = compress_config(s, budget, out, method)
    start = time.perf_counter()
    if method.startswith("uvc"):
        report = compress(cfg, model=teacher, teacher=teacher)
    else:
        if method == "uniform":
            plan = uniform_plan(teacher, budget)
            slimmed = uvc.slim(teacher, plan)
        else:
            criterion = method.removeprefix("tp_")
            source = teacher
            if criterion == "taylor":
                train = build_data(cfg.data, seed=cfg.seed).train
                source = taylor_gradients(teacher, train, s.taylor_batches)
            slimmed = torch_pruning_to_budget(source, budget, criterion)
            plan = plan_of_slimmed(slimmed)
        report = post_train(cfg, slimmed, plan, model=teacher, teacher=teacher)
    return {"method": method, "budget": budget, "ratio": report["ratio"], "macs": report["macs"],
            "macs_dense": report["macs_dense"], "top1": report["top1"], "top1_before_post": report["top1_val_after_search"],
            "top1_teacher": report["top1_teacher"], "params": report["params"], "layers": report["layers"],
            "seconds": time.perf_counter() - start, "out": str(out.relative_to(ROOT))}


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        names = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import timm
    import torch_pruning

    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "timm": timm.__version__, "torch_pruning": getattr(torch_pruning, "__version__", "?"),
            "python": platform.python_version(), "os": platform.platform(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def load_teacher(path: str | None):
    try:
        return uvc.load_model(path)
    except UVCError as e:
        where = path or "the bundled teacher (src/uvc/assets/vit_tiny_patch7_fmnist)"
        sys.exit(f"bench: cannot load {where}: {e}\n"
                 "Or pass --teacher DIR (a model folder written by uvc.save) to benchmark another model.")


def save(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(RESULTS / "results.json")


def previous_runs(results: dict) -> dict:
    """Accuracy runs of an interrupted benchmark with the same settings and teacher, by (method, budget)."""
    path = RESULTS / "results.json"
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if old.get("settings") != json.loads(json.dumps(results["settings"])) or old.get("teacher") != results["teacher"]:
        log.warning("results.json is from other settings or another teacher; starting over")
        return {}
    return {(r["method"], r["budget"]): r for r in old.get("accuracy", [])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="budget 0.5 only and small data: a few minutes")
    p.add_argument("--teacher", default=None, help="a model folder saved by uvc.save (default: the bundled teacher)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for everything (fixed for the timings)")
    p.add_argument("--resume", action="store_true", help="keep the accuracy runs already in bench/results/results.json")
    p.add_argument("--report-only", action="store_true", help="rewrite BENCHMARKS.md and the plots from results.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    if args.report_only:
        write_summary(json.loads((RESULTS / "results.json").read_text()), ROOT / "BENCHMARKS.md", RESULTS)
        return 0

    try:
        import torch_pruning  # noqa: F401  (checked before an hour of work, not after)
    except ImportError:
        sys.exit("bench: torch-pruning is missing; install the project's bench extra: pip install -e '.[bench]'")
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    teacher = load_teacher(args.teacher)
    started = time.perf_counter()
    results = {
        "mode": "quick" if args.quick else "full", "settings": asdict(s),
        "teacher": args.teacher or "bundled vit_tiny_patch7_fmnist",
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(), "load_average_start": os.getloadavg(), "accuracy": [], "speed": [],
    }
    done = previous_runs(results) if args.resume else {}
    results["reused_runs"] = len(done)
    out_root = ROOT / "runs" / "bench" / results["mode"]

    for budget in s.budgets:
        for method in LABELS:
            if (method, budget) not in done:
                log.info("=== %s at B = %.2f", LABELS[method], budget)
                done[(method, budget)] = run_method(method, budget, teacher, s, out_root / f"{method}-b{budget}")
            results["accuracy"].append(done[(method, budget)])
            save(results)

    log.info("=== throughput: every slimmed model against the teacher")
    input_size = adapter_for(teacher).input_size(teacher)
    for run in results["accuracy"]:
        slimmed = uvc.load(ROOT / run["out"])
        results["speed"].append({"method": run["method"], "budget": run["budget"], "ratio": run["ratio"],
                                 "pairs": [speed_pair(teacher, slimmed, input_size, b, s.speed_repeats) for b in s.speed_batches]})
    save(results)

    log.info("=== throughput: deit_small_patch16_224 at R <= %.2f", s.deit_budget)
    results["deit_small"] = deit_small_speed(s.deit_budget, s.speed_batches, s.speed_repeats)
    save(results)

    log.info("=== search cost: UVC search step against a plain KD step")
    results["search_cost"] = step_cost(compress_config(s, 0.5, out_root / "step-cost", "uvc"), teacher, s.cost_steps)
    results["seconds"] = time.perf_counter() - started
    results["load_average_end"] = os.getloadavg()
    save(results)
    write_summary(results, ROOT / "BENCHMARKS.md", RESULTS)
    log.info("done in %.1f min: BENCHMARKS.md and %s", results["seconds"] / 60, RESULTS.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
