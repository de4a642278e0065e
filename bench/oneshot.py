"""One-shot pruning of a teacher (bench/teacher by default), with and without compensation (issue 14); no gradient step.

    python bench/oneshot.py                    # budgets 0.5 and 0.3, ~15 min on 2 CPU cores
    python bench/oneshot.py --budgets 0.5 --test-limit 2000   # quicker
    python bench/oneshot.py --teacher pretrained --sweep-only --threads 1   # the ridge on the pretrained teacher

For each budget, importance ("weight", "activation") and allocation ("uniform", "global"), the
teacher is pruned by `uvc.oneshot` and measured right after slimming: without compensation, with
the bias fold only, and with the ridge refit against each target ("block", "stream"). Calibration:
the first 1,000 images of the seeded training order (no augmentation, labels unused). Every choice
(importance, allocation, target, ridge) is made on the validation split; test is reported beside
it. With `--teacher bundled` the validation figures are optimistic: that teacher was trained on all
60,000 training images, validation included, so they rank the pruned variants, nothing else.
Times: wall and process CPU seconds of importance + plan + slimming, and of the compensation
(evaluation excluded). Another process may share the CPU: then run with --threads 1, since two
torch threads on one free core spin against each other (measured 83 s instead of 8 s).
Writes bench/results/oneshot.json, with the defaults of `uvc compress --one-shot` beside the best
configuration on validation. `--sweep-only` skips the grid and sweeps the ridge of `--one-shot`'s own
configuration; the pretrained teacher is read at its input size, preprocessing and the benchmark's
validation size (bench/run.py's PRETRAINED), and writes oneshot_pretrained.json.
Each sweep row also gives how far the refit moved the weights: the largest ratio, over the refitted
layers, of a layer's weight RMS to its slimmed weights' before the refit. A large ratio is a fit that
leans on nearly collinear features, which later training steps then throw off.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import inspect
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from uvc.adapters import adapter_for
from uvc.compensate import DEFAULT_RIDGE, compensate
from uvc.data import DataConfig, build_data
from uvc.engine import evaluate
from uvc.oneshot import ALLOCATIONS, IMPORTANCES, one_shot, take_images

from run import add_teacher_arg, load_teacher, settings_for, teacher_label

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {"none": None, "bias": dict(mode="bias"), "refit-block": dict(target="block"), "refit-stream": dict(target="stream")}
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1)


def one_shot_defaults() -> dict[str, str]:
    """What `uvc compress --one-shot` uses unless told otherwise, in this bench's terms."""
    params = inspect.signature(one_shot).parameters
    return {"importance": params["importance"].default, "allocation": params["allocation"].default,
            "compensation": (f"refit-{inspect.signature(compensate).parameters['target'].default}"
                             if params["compensate"].default else "none")}


def counts(layer) -> dict:
    return {"heads": len(layer.heads), "head_dim": len(layer.dims[0]) if layer.dims else 0, "neurons": len(layer.neurons)}


def weight_growth(before, after) -> float:
    """The largest ratio of a refitted layer's weight RMS after compensation to before it (1: unmoved)."""
    old = dict(before.named_parameters())
    return max(float(w.pow(2).mean().sqrt() / old[n].pow(2).mean().sqrt())
               for n, w in after.named_parameters() if n.endswith(("attn.proj.weight", "mlp.fc2.weight")))


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_teacher_arg(parser)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--calibration", type=int, default=None, help="default: the benchmark's (1,000; 500 pretrained)")
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--ridges", type=float, nargs="+", default=list(RIDGES))
    parser.add_argument("--sweep-only", action="store_true",
                        help="only the ridge sweep, at --one-shot's importance, allocation and target")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads; use 1 while another process holds a core (2 threads on 1 free core run ~10x slower)")
    parser.add_argument("--out", default=None, help="default: bench/results/oneshot.json (oneshot_pretrained.json)")
    args = parser.parse_args()
    settings = settings_for(args.teacher)
    args.calibration = args.calibration or settings.calibration_images
    args.out = args.out or str(RESULTS / ("oneshot_pretrained.json" if args.teacher == "pretrained" else "oneshot.json"))
    os.environ.setdefault("UVC_PROGRESS", "0")
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")

    teacher = load_teacher(args.teacher)
    data = build_data(DataConfig(augment=False, batch_size=100, eval_batch_size=500, val_limit=settings.val_limit,
                                 test_limit=args.test_limit or settings.test_limit),
                      input_size=adapter_for(teacher).input_size(teacher), pretrained_cfg=getattr(teacher, "pretrained_cfg", None))
    calibration = take_images(data.train, args.calibration)

    def measure(model) -> dict:
        return {"val": evaluate(model, data.val, cpu), "test": evaluate(model, data.test, cpu)}

    teacher_scores = {"val": evaluate(teacher, data.val, cpu)} if args.sweep_only else measure(teacher)  # test unread
    results = {"teacher": teacher_scores, "teacher_model": teacher_label(args.teacher),
               "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
               "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "calibration_images": args.calibration, "ridge": DEFAULT_RIDGE, "defaults": one_shot_defaults(),
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} threads",
               "rows": [], "ridge_sweep": []}
    print(f"teacher: val {results['teacher']['val']:.2f} %", flush=True)
    header = f"{'B':>4} {'importance':>10} {'allocation':>10} {'compensation':>13} {'R':>7} {'val':>6} {'test':>6} {'plan s':>7} {'comp s':>7}"
    print(header + "\n" + "-" * len(header), flush=True)
    for budget in [] if args.sweep_only else args.budgets:
        for importance in IMPORTANCES:
            for allocation in ALLOCATIONS:
                (slimmed, plan, stats), plan_time = timed(lambda: one_shot(
                    teacher, budget, calibration, importance=importance, allocation=allocation, compensate=False))
                for name, kwargs in VARIANTS.items():
                    model, comp_time = copy.deepcopy(slimmed), {"wall_s": 0.0, "cpu_s": 0.0}
                    if kwargs is not None:
                        _, comp_time = timed(lambda: compensate(teacher, model, plan, calibration, **kwargs))
                    row = {"budget": budget, "importance": importance, "allocation": allocation, "compensation": name,
                           "ratio": stats["ratio"], **measure(model), "plan_time": plan_time, "compensation_time": comp_time,
                           "counts": [counts(p) for p in plan]}
                    results["rows"].append(row)
                    print(f"{budget:>4} {importance:>10} {allocation:>10} {name:>13} {row['ratio']:>7.4f} {row['val']:>6.2f} "
                          f"{row['test']:>6.2f} {plan_time['wall_s']:>7.1f} {comp_time['wall_s']:>7.1f}", flush=True)

    if args.sweep_only:
        defaults = results["defaults"]
        best = (defaults["importance"], defaults["allocation"], defaults["compensation"])
    else:
        best = best_compensated(results, args.budgets)
    print(f"\nthe ridge sweep's configuration: {best}", flush=True)
    for budget in args.budgets:
        slimmed, plan, _ = one_shot(teacher, budget, calibration, importance=best[0], allocation=best[1], compensate=False)
        for ridge in args.ridges:
            model = copy.deepcopy(slimmed)
            compensate(teacher, model, plan, calibration, ridge=ridge, target=best[2].split("-")[1])
            val = evaluate(model, data.val, cpu)
            growth = weight_growth(slimmed, model)
            results["ridge_sweep"].append({"budget": budget, "ridge": ridge, "val": val, "weight_rms_growth_max": growth})
            print(f"ridge sweep: B {budget} lambda {ridge:g}: val {val:.2f}, weight RMS grown up to {growth:.2f}x", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


def best_compensated(results: dict, budgets: list[float]) -> tuple[str, str, str]:
    """The compensated configuration with the best mean validation top-1 over budgets (choices on validation only)."""
    compensated = [r for r in results["rows"] if r["compensation"].startswith("refit")]
    keys = sorted({(r["importance"], r["allocation"], r["compensation"]) for r in compensated})
    mean_val = {k: sum(r["val"] for r in compensated if (r["importance"], r["allocation"], r["compensation"]) == k)
                / len(budgets) for k in keys}
    best = max(keys, key=mean_val.get)
    results["mean_val"] = {" / ".join(k): round(v, 3) for k, v in mean_val.items()}
    results["best_on_validation"] = dict(zip(("importance", "allocation", "compensation"), best))
    print(f"\nbest on validation (mean over budgets): {best}, {mean_val[best]:.2f} %", flush=True)
    return best


if __name__ == "__main__":
    main()
