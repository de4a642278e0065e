"""Budgets in MACs against budgets in measured latency, side by side, at equal training (issue 30, item 6).

    python bench/budgets.py           # B = 0.5 / 0.3, 3 seeds, skip gates off and on, latency at batch 64 and 1 (2 threads)
    python bench/budgets.py --quick   # B = 0.5, one seed, small data, batch 64 only: the pipeline (a few minutes)

Every run is `uvc compress` of the benchmark's teacher with `bench/run.py`'s configuration of UVC
(`compress_config`: the same data, epochs, KD and post-training rate), differing only in `resource`
(MACs, or latency measured on this CPU at the given batch and thread count) and in the skip gates.
The latency table of each batch is measured once and passed to every run (`--latency-table`), so
all runs at one batch price latency alike. Each report's measured latency ratio (dense and slimmed
alternating, `throughput_rounds` rounds of 1 s) gives the speed-up; test top-1 is read once per run.
Results: bench/results/budgets.json and BENCHMARKS.md's "Budgets" section (quick mode:
runs/bench/quick/budgets.json only: a pipeline check never writes the benchmark's tables).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from uvc.adapters import adapter_for
from uvc.compress import Run, compress
from uvc.io import atomic_write_text
from uvc.latency import TABLE_FILE, LatencyConfig, table_for

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402

log = logging.getLogger("bench")
BEGIN, END = "<!-- bench/budgets.py -->", "<!-- /bench/budgets.py -->"


@dataclasses.dataclass(frozen=True)
class BudgetSettings:
    training: bench.Settings  # data, epochs and rates: bench/run.py's
    budgets: tuple[float, ...]
    seeds: int
    batches: tuple[int, ...]  # inference batches a latency budget is measured at
    skips: tuple[str, ...]
    threads: int = 2
    rounds: int = 5  # alternating rounds of the final timing and of a latency budget's checks


FULL = BudgetSettings(training=bench.FULL, budgets=(0.5, 0.3), seeds=3, batches=(64, 1), skips=("none", "both"))
QUICK = BudgetSettings(training=dataclasses.replace(bench.QUICK, train_limit=1024, val_limit=500, test_limit=1000),
                       budgets=(0.5,), seeds=1, batches=(64,), skips=("none",), rounds=2)


def planned(s: BudgetSettings) -> list[dict]:
    """Every run: MACs and each latency batch, for each skip mode, budget and seed (seed-major)."""
    resources = [("macs", b) for b in s.batches] + [("latency", b) for b in s.batches]
    return [{"resource": r, "batch": b, "skip": skip, "budget": budget, "seed": seed} for seed in range(s.seeds)
            for budget in s.budgets for skip in s.skips for r, b in resources]


def one_run(entry: dict, s: BudgetSettings, teacher, scores: dict, tables: dict[int, Path], out: Path) -> dict:
    cfg = bench.compress_config(s.training, entry["budget"], out, "uvc_skip" if entry["skip"] == "both" else "uvc",
                                entry["seed"])
    cfg.resource, cfg.throughput_batch, cfg.throughput_rounds = entry["resource"], entry["batch"], s.rounds
    cfg.latency = LatencyConfig(threads=s.threads, table=str(tables[entry["batch"]]))
    started = time.perf_counter()
    report = compress(cfg, model=teacher, teacher=teacher, teacher_scores=scores)
    return {**entry, "top1": report["top1"], "top1_val": report["top1_val"], "ratio": report["ratio"],
            "macs_ratio": report["macs_ratio"], "params_ratio": report["params_ratio"],
            "latency_ratio_predicted": report["latency_ratio_predicted"],
            "latency_ratio_measured": report["latency_ratio_measured"],
            "latency_ratio_measured_range": report["latency_ratio_measured_range"],
            "speedup": 1 / report["latency_ratio_measured"], "latency_fit": report["latency_fit"],
            "seconds": time.perf_counter() - started}


def summary(runs: list[dict]) -> list[str]:
    """One table row per (resource, batch, skip, budget): mean +- std over seeds of test top-1 and measured speed-up."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["budget"], r["batch"], r["skip"], r["resource"]), []).append(r)
    lines = ["| budget | batch | skip | resource | seeds | test top-1 | measured speed-up | MACs ratio | latency ratio (table) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (budget, batch, skip, resource), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0], -kv[0][1], kv[0][2], kv[0][3])):
        def spread(key):
            values = [r[key] for r in rs]
            return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")
        table = [r["latency_ratio_predicted"] for r in rs if r["latency_ratio_predicted"] is not None]
        predicted = f"{statistics.mean(table):.3f}" if table else "n/a"
        lines.append(f"| {budget} | {batch} | {skip} | {resource} | {len(rs)} | {spread('top1')} | {spread('speedup')}x | "
                     f"{statistics.mean(r['macs_ratio'] for r in rs):.3f} | {predicted} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="B = 0.5, one seed, small data, batch 64: a few minutes")
    bench.add_teacher_arg(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    s = QUICK if args.quick else FULL
    torch.set_num_threads(s.threads)
    allocator = bench.steady_allocator()  # before any timing: bench/speed.py says why
    teacher = bench.load_teacher(args.teacher)
    folder = bench.ROOT / ("runs/bench/quick" if args.quick else "bench/results")
    out_root = bench.ROOT / "runs" / "bench" / ("quick" if args.quick else "full") / "budgets"
    started = time.perf_counter()
    input_size = adapter_for(teacher).input_size(teacher)
    tables = {}
    for batch in s.batches:  # one table per batch, shared by every run at that batch
        table_for(teacher, input_size, torch.device("cpu"), LatencyConfig(threads=s.threads), batch, out_root / f"table-b{batch}")
        tables[batch] = out_root / f"table-b{batch}" / TABLE_FILE
    scores = Run(bench.compress_config(s.training, s.budgets[0], out_root / "teacher", "uvc"), model=teacher,
                 teacher=teacher).score_teacher()
    results = {"settings": dataclasses.asdict(s), "teacher": bench.teacher_label(args.teacher),
               "machine": bench.machine(s.threads), "allocator": allocator, "teacher_scores": scores, "runs": []}
    for i, entry in enumerate(planned(s), 1):
        log.info("=== [%d/%d] %s", i, len(planned(s)), entry)
        name = f"{entry['resource']}-b{entry['batch']}-skip{entry['skip']}-B{entry['budget']}-s{entry['seed']}"
        results["runs"].append(one_run(entry, s, teacher, scores, tables, out_root / name))
        bench.save(results, folder / "budgets.json")
    results["seconds"] = time.perf_counter() - started
    bench.save(results, folder / "budgets.json")
    lines = summary(results["runs"])
    print("\n".join(lines))
    if not args.quick:
        md = bench.ROOT / "BENCHMARKS.md"
        text = md.read_text() if md.is_file() else ""
        section = "\n".join([BEGIN, "## Budgets: MACs against measured latency (`bench/budgets.py`)", "",
                             f"{results['machine']['cpu']}, {s.threads} threads, teacher {results['teacher']} "
                             f"(test {scores['test']:.2f} %); {results['seconds'] / 60:.0f} min.", "", *lines, END]) + "\n"
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END) + 1:] if BEGIN in text else text + "\n" + section
        atomic_write_text(md, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
