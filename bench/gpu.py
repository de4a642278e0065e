"""GPU speed of slimmed DeiTs: dense against slimmed throughput at MACs and latency budgets, eager and compiled.

    python bench/gpu.py           # CUDA: DeiT-S and DeiT-B at 224 px, bf16, batch 1 and 256 (<= 5 minutes on an H100)
    python bench/gpu.py --quick   # CPU, a tiny ViT at 32 px, seconds: the pipeline alone (the test suite runs it)

Random weights (speed does not depend on them). For each model: a latency table per batch size
(`uvc.latency.measure_table`), then plans at MACs budgets and at latency budgets 0.5 and 0.3, each the
uniform plan of its resource (no training), slimmed, and timed against the dense model in alternating
rounds (`uvc.engine.compare_throughput`), eager and under `torch.compile` (compiled at the large batch
only, while the time limit allows). Last, a UVC search step against a plain KD step of the dense model
(`bench/speed.py`'s `step_cost`) on random images. Results: bench/results/gpu.json and a section of
BENCHMARKS.md naming the device (quick mode: runs/bench/quick/).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

import uvc
from uvc.budget import plan_ratio, uniform_plan
from uvc.compress import CompressConfig
from uvc.data import DataConfig
from uvc.engine import compare_throughput
from uvc.errors import UVCError
from uvc.flops import skeleton_of
from uvc.io import atomic_write_text
from uvc.latency import device_name, latency_model, measure_table
from uvc.search import SearchConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import step_cost  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- bench/gpu.py -->", "<!-- /bench/gpu.py -->"


@dataclasses.dataclass(frozen=True)
class GpuSettings:
    models: tuple[str, ...]
    img_size: int
    batches: tuple[int, ...]
    budgets: tuple[float, ...] = (0.5, 0.3)
    rounds: int = 3
    seconds: float = 0.3
    table_rounds: int = 3
    table_seconds: float = 0.05
    compile: bool = True
    step_batch: int = 64
    steps: int = 5
    time_limit: float = 270.0  # compiled timings start only while this many seconds have not passed
    dtype: str = "bfloat16"


FULL = GpuSettings(models=("deit_small_patch16_224", "deit_base_patch16_224"), img_size=224, batches=(1, 256))
QUICK = GpuSettings(models=("vit_tiny_patch16_224",), img_size=32, batches=(4,), rounds=1, seconds=0.02,
                    table_rounds=1, table_seconds=0.005, compile=False, step_batch=4, steps=1, time_limit=60.0,
                    dtype="float32")  # bf16 matrix products are slow on CPUs without bf16 units


def build(name: str, s: GpuSettings, num_classes: int = 1000) -> torch.nn.Module:
    kwargs = {"img_size": s.img_size, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3} if s is QUICK else {}
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs).eval()


def plans(dense, input_size, device, batch: int, s: GpuSettings) -> tuple[list[dict], dict]:
    """The uniform plan at each budget in MACs and in the latency table measured at `batch`, with its ratios."""
    table = measure_table(dense, input_size, device, batch, rounds=s.table_rounds, seconds=s.table_seconds)
    lm = latency_model(table)
    skel = skeleton_of(dense, input_size, "latency", lm)
    out = []
    for resource in ("macs", "latency"):
        for budget in s.budgets:
            try:
                plan = uniform_plan(dense, budget, input_size, resource=resource, latency=lm)
            except UVCError as e:
                out.append({"resource": resource, "budget": budget, "unreachable": str(e)})
                continue
            slimmed = uvc.slim(dense, plan)
            out.append({"resource": resource, "budget": budget, "model": slimmed,
                        "macs_ratio": uvc.macs(slimmed, input_size) / uvc.macs(dense, input_size),
                        "latency_ratio_predicted": plan_ratio(skel, plan)})
    return out, {k: table[k] for k in ("key", "fixed", "dense_measured", "build_seconds")}


def timed(dense, slimmed, input_size, batch: int, device, s: GpuSettings, compiled: bool) -> dict:
    models = {"dense": dense, "slimmed": slimmed}
    if compiled:
        models = {k: torch.compile(m) for k, m in models.items()}
    rates = compare_throughput(models, input_size, batch, device, rounds=s.rounds, seconds=s.seconds)
    ratios = [d / m for d, m in zip(rates["dense"]["rounds"], rates["slimmed"]["rounds"])]
    return {"batch": batch, "compiled": compiled, "dense": rates["dense"]["median"], "slimmed": rates["slimmed"]["median"],
            "speedup": rates["slimmed"]["median"] / rates["dense"]["median"],
            "latency_ratio_measured": float(np.median(ratios)), "latency_ratio_range": [min(ratios), max(ratios)]}


def random_image_folder(root: Path, size: int, per_class: int) -> Path:
    """An ImageFolder of random RGB images in two classes: what a search step reads does not change its time."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def search_cost(name: str, device, s: GpuSettings) -> dict:
    teacher = build(name, s, num_classes=2).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        data = random_image_folder(Path(tmp) / "images", s.img_size, s.step_batch)
        cfg = CompressConfig(budget=0.5, out=str(Path(tmp) / "run"), device=device.type, eval_during_search=False,
                             data=DataConfig(data=str(data), batch_size=s.step_batch, workers=0, input_size=s.img_size),
                             search=SearchConfig(warmup_epochs=0.0))
        return {"model": name, **step_cost(cfg, teacher, s.steps, warmup=1)}


def run(s: GpuSettings, device: torch.device) -> dict:
    started = time.perf_counter()
    input_size = (3, s.img_size, s.img_size)
    results = {"device": device_name(device), "torch": torch.__version__, "dtype": s.dtype, "settings": dataclasses.asdict(s),
               "models": [], "search_step": []}
    for name in s.models:
        dense = build(name, s).to(device, getattr(torch, s.dtype))
        record = {"model": name, "macs": uvc.macs(dense, input_size), "tables": {}, "timings": []}
        for batch in s.batches:
            planned, record["tables"][str(batch)] = plans(dense, input_size, device, batch, s)
            for entry in planned:
                slimmed = entry.pop("model", None)
                for compiled in (False, True) if s.compile else (False,):
                    late = compiled and (batch != max(s.batches) or time.perf_counter() - started > s.time_limit)
                    if slimmed is None or late:
                        continue
                    record["timings"].append({**entry, **timed(dense, slimmed, input_size, batch, device, s, compiled)})
                if slimmed is None:
                    record["timings"].append({**entry, "batch": batch})
        results["models"].append(record)
    results["search_step"].append(search_cost(s.models[0], device, s))
    results["seconds"] = time.perf_counter() - started
    return results


def markdown(results: dict) -> str:
    lines = [BEGIN, "## GPU: slimmed DeiTs, eager and compiled (`bench/gpu.py`)", "",
             f"{results['device']}, torch {results['torch']}, {results['dtype']} weights, random weights, uniform plans (no training); "
             f"alternating rounds of {results['settings']['seconds']} s, {results['settings']['rounds']} rounds; "
             f"{results['seconds']:.0f} s in all.", "",
             "| model | budget | batch | mode | MACs ratio | latency ratio predicted | measured (range) | images/s dense -> slimmed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for record in results["models"]:
        for t in record["timings"]:
            if "unreachable" in t:
                lines.append(f"| {record['model']} | {t['budget']} {t['resource']} | {t['batch']} | | unreachable by the uniform plan | | | |")
                continue
            low, high = t["latency_ratio_range"]
            lines.append(f"| {record['model']} | {t['budget']} {t['resource']} | {t['batch']} | "
                         f"{'compiled' if t['compiled'] else 'eager'} | {t['macs_ratio']:.3f} | {t['latency_ratio_predicted']:.3f} | "
                         f"{t['latency_ratio_measured']:.3f} ({low:.3f}-{high:.3f}) | {t['dense']:.0f} -> {t['slimmed']:.0f} |")
    for c in results["search_step"]:
        lines += ["", f"Search step against a plain KD step ({c['model']}, batch {c['batch']}, median of {c['steps']} steps): "
                      f"{c['search_s'] * 1e3:.1f} ms against {c['plain_s'] * 1e3:.1f} ms ({c['ratio']:.2f}x)."]
    return "\n".join([*lines, END]) + "\n"


def write(results: dict, folder: Path, md_path: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "gpu.json", json.dumps(results, indent=1))
    text = md_path.read_text() if md_path.is_file() else ""
    section = markdown(results)
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END) + 1:]
    else:
        text = text + ("\n" if text else "") + section
    atomic_write_text(md_path, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CPU, a tiny ViT: checks the pipeline in seconds")
    p.add_argument("--out", default=None, help="results folder (default: bench/results, quick: runs/bench/quick)")
    args = p.parse_args(argv)
    if not args.quick and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA GPU is visible; run it on a GPU machine, or --quick for the CPU pipeline check")
    s, device = (QUICK, torch.device("cpu")) if args.quick else (FULL, torch.device("cuda"))
    folder = Path(args.out) if args.out else ROOT / ("runs/bench/quick" if args.quick else "bench/results")
    results = run(s, device)
    write(results, folder, folder / "BENCHMARKS.md" if args.quick or args.out else ROOT / "BENCHMARKS.md")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
