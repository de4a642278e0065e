"""Budgets in MACs against budgets in measured latency, side by side, at equal training (issue 30, item 6).

    python bench/budgets.py           # B = 0.5 / 0.3, 3 seeds, skip gates off and on, latency at batch 64 and 1 (2 threads)
    python bench/budgets.py --quick   # B = 0.5, one seed, small data, batch 64 only: the pipeline (a few minutes)
    python bench/budgets.py --rebuild-table 1   # after a change in how tables are measured: batch 1's runs again

Every run is `uvc compress` of the benchmark's teacher with `bench/run.py`'s configuration of UVC
(`compress_config`: the same data, epochs, KD and post-training rate), differing only in `resource`
(MACs, or latency measured on this CPU at the given batch and thread count) and in the skip gates.
The latency table of each batch is measured once and passed to every run (`--latency-table`), so
all runs at one batch price latency alike. Each report's measured latency ratio (dense and slimmed
alternating, `throughput_rounds` rounds of 1 s) gives the speed-up; test top-1 is read once per run.
Every model is timed against the teacher at every batch afterwards, so a MACs model (trained once: its
plan does not depend on the batch) is compared at each batch with the latency model of that batch; MACs
runs at lower budgets (`macs_line`) extend the MACs models' speed to the latency models'.
Results: bench/results/budgets.json, rewritten after every run (run again to continue a killed sweep);
`python bench/run.py --report-only` puts it in BENCHMARKS.md (quick mode: runs/bench/quick/budgets.json).
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

import uvc
from uvc.adapters import adapter_for
from uvc.budget import plan_ratio, smallest_ratio
from uvc.compress import Run, compress
from uvc.flops import skeleton_of
from uvc.latency import TABLE_FILE, LatencyConfig, latency_model, measured_ratio, table_for
from uvc.plan import LayerPlan

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402
from summary import budgets_section  # noqa: E402

log = logging.getLogger("bench")


@dataclasses.dataclass(frozen=True)
class BudgetSettings:
    training: bench.Settings  # data, epochs and rates: bench/run.py's
    budgets: tuple[float, ...]
    seeds: int
    batches: tuple[int, ...]  # inference batches a latency budget is measured at
    skips: tuple[str, ...]
    threads: int = 2
    rounds: int = 5  # alternating rounds of the final timing and of a latency budget's checks
    macs_line: tuple[float, ...] = ()  # more MACs budgets (skip gates off), so that the MACs models reach the
    # latency models' speed: the targets compare accuracy at equal measured speed


FULL = BudgetSettings(training=bench.FULL, budgets=(0.5, 0.3), seeds=3, batches=(64, 1), skips=("none", "both"),
                      macs_line=(0.2, 0.15, 0.1))
GROWS = ("budgets", "seeds", "batches", "skips", "macs_line")  # settings a continued sweep may extend
QUICK = BudgetSettings(training=dataclasses.replace(bench.QUICK, train_limit=1024, val_limit=500, test_limit=1000),
                       budgets=(0.5,), seeds=1, batches=(64,), skips=("none",), rounds=2)


def planned(s: BudgetSettings) -> list[dict]:
    """Every run, seed-major: one MACs run per skip mode and budget (its model does not depend on the batch; it is
    timed at every batch afterwards) and one latency run per batch."""
    resources = [("macs", s.batches[0])] + [("latency", b) for b in s.batches]
    main = [{"resource": r, "batch": b, "skip": skip, "budget": budget, "seed": seed} for seed in range(s.seeds)
            for budget in s.budgets for skip in s.skips for r, b in resources]
    return main + [{"resource": "macs", "batch": s.batches[0], "skip": "none", "budget": budget, "seed": seed}
                   for seed in range(s.seeds) for budget in s.macs_line]


def run_name(entry: dict) -> str:
    return f"{entry['resource']}-b{entry['batch']}-skip{entry['skip']}-B{entry['budget']}-s{entry['seed']}"


def latency_skeleton(teacher, table: Path):
    """The teacher's resource skeleton priced by the latency table in the file `table`."""
    return skeleton_of(teacher, resource="latency", latency=latency_model(json.loads(table.read_text())))


def one_run(entry: dict, s: BudgetSettings, teacher, scores: dict, tables: dict[int, Path], out: Path) -> dict:
    """One run's record; a budget below what its mode can reach is recorded as such ("unreachable": the lowest R)."""
    if entry["resource"] == "latency":
        lowest = smallest_ratio(latency_skeleton(teacher, tables[entry["batch"]]), prune=True, skip=entry["skip"] != "none")
        if entry["budget"] < lowest:
            log.info("unreachable: latency at batch %d cannot fall below %.3f of the dense model's with skip=%s",
                     entry["batch"], lowest, entry["skip"])
            return {**entry, "unreachable": lowest}
    cfg = bench.compress_config(s.training, entry["budget"], out, "uvc_skip" if entry["skip"] == "both" else "uvc",
                                entry["seed"])
    cfg.resource, cfg.throughput_batch, cfg.throughput_rounds = entry["resource"], entry["batch"], s.rounds
    cfg.latency = LatencyConfig(threads=s.threads, table=str(tables[entry["batch"]]))
    started = time.perf_counter()
    report = compress(cfg, model=teacher, teacher=teacher, teacher_scores=scores)
    record = {**entry, "top1": report["top1"], "top1_val": report["top1_val"], "kept_epoch": report["kept_epoch"],
              "top1_val_before_post": report["top1_val_after_search"], "ratio": report["ratio"],
              "macs_ratio": report["macs_ratio"], "params_ratio": report["params_ratio"], "latency_fit": report["latency_fit"],
              "seconds": time.perf_counter() - started, "timed": {}}
    slimmed, plan = uvc.load(out), [LayerPlan.from_dict(p) for p in report["plan"]]
    input_size = adapter_for(teacher).input_size(teacher)
    for batch in s.batches:  # the measured speed-up at every batch, the same way for every run
        timed = measured_ratio(teacher, slimmed, input_size, torch.device("cpu"), batch, s.threads, rounds=s.rounds)
        predicted = plan_ratio(latency_skeleton(teacher, tables[batch]), plan)
        record["timed"][str(batch)] = {"measured": timed["median"], "range": [timed["min"], timed["max"]],
                                       "speedup": 1 / timed["median"], "predicted": predicted}
    return record


def retabled(results: dict, batches: list[int], teacher, tables: dict[int, Path], out_root: Path) -> dict:
    """`results` after new tables at `batches`: their latency runs dropped (to run again), every other run's
    prediction at those batches recomputed from the plan in its run folder (None where the folder is gone)."""
    runs = [r for r in results["runs"] if not (r["resource"] == "latency" and r["batch"] in batches)]
    for batch in batches:
        skeleton = latency_skeleton(teacher, tables[batch])
        for r in runs:
            if "timed" in r:
                report = out_root / run_name(r) / "report.json"
                plan = [LayerPlan.from_dict(p) for p in json.loads(report.read_text())["plan"]] if report.is_file() else None
                r["timed"][str(batch)]["predicted"] = plan_ratio(skeleton, plan) if plan else None
    log.info("new latency tables at batch %s: %d latency runs to run again", ", ".join(map(str, batches)),
             len(results["runs"]) - len(runs))
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return {**results, "runs": runs, "rebuilt_tables": [*results.get("rebuilt_tables", []), {"batches": batches, "date": date}]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="B = 0.5, one seed, small data, batch 64: a few minutes")
    bench.add_teacher_arg(p)
    p.add_argument("--seeds", type=int, default=None, help="seeds 0 .. N-1 (None: 3, or 1 with --quick)")
    p.add_argument("--budgets", type=float, nargs="+", default=None, help="None: 0.5 and 0.3, or 0.5 with --quick")
    p.add_argument("--rebuild-table", type=int, nargs="+", default=[], metavar="BATCH",
                   help="measure the latency table at BATCH again (after a change in how tables are measured): the "
                        "latency runs at BATCH run again, the other runs' predictions at BATCH are recomputed")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    s = QUICK if args.quick else FULL
    s = dataclasses.replace(s, seeds=args.seeds or s.seeds, budgets=tuple(args.budgets or s.budgets))
    torch.set_num_threads(s.threads)
    allocator = bench.steady_allocator()  # before any timing: bench/speed.py says why
    teacher = bench.load_teacher(args.teacher)
    folder = bench.ROOT / ("runs/bench/quick" if args.quick else "bench/results")
    out_root = bench.ROOT / "runs" / "bench" / ("quick" if args.quick else "full") / "budgets"
    started = time.perf_counter()
    input_size = adapter_for(teacher).input_size(teacher)
    tables = {}
    for batch in s.batches:  # one table per batch, shared by every run at that batch
        if batch in args.rebuild_table:
            (out_root / f"table-b{batch}" / TABLE_FILE).unlink(missing_ok=True)
        table_for(teacher, input_size, torch.device("cpu"), LatencyConfig(threads=s.threads), batch, out_root / f"table-b{batch}")
        tables[batch] = out_root / f"table-b{batch}" / TABLE_FILE
    scores = Run(bench.compress_config(s.training, s.budgets[0], out_root / "teacher", "uvc"), model=teacher,
                 teacher=teacher).score_teacher()
    path = folder / "budgets.json"
    results = {"command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
               "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "settings": json.loads(json.dumps(dataclasses.asdict(s))), "teacher": bench.teacher_label(args.teacher),
               "machine": bench.machine(s.threads), "allocator": allocator, "teacher_scores": scores,
               "load_average_start": os.getloadavg(), "runs": []}
    results = bench.continue_sweep(path, results, ("settings", "teacher"), GROWS)  # a killed sweep goes on
    if args.rebuild_table:
        results = retabled(results, args.rebuild_table, teacher, tables, out_root)
        bench.save(results, path)
    done = {run_name(r) for r in results["runs"]}
    todo = planned(s)
    for i, entry in enumerate(todo, 1):
        if run_name(entry) in done:
            continue
        log.info("=== [%d/%d] %s", i, len(todo), entry)
        results["runs"].append(one_run(entry, s, teacher, scores, tables, out_root / run_name(entry)))
        bench.save(results, path)
    results["seconds"] = time.perf_counter() - started
    results["load_average_end"] = os.getloadavg()
    results["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    bench.save(results, path)
    print("\n".join(budgets_section(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
