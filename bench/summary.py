"""BENCHMARKS.md and the plots, from the results dict `run.py` measured (nothing here measures)."""
from __future__ import annotations

from pathlib import Path

TARGET_DROP = 0.5  # points of top-1 UVC may lose at B = 0.5
TARGET_SPEED = 0.85  # measured speedup / (1 / R) at batch 64
TARGET_STEP = 1.3  # search step / plain KD step
LABELS = {
    "uvc": "UVC",
    "uvc_no_skip": "UVC w/o skipping",
    "uvc_no_prune": "UVC w/o pruning (skipping only)",
    "uvc_no_kd": "UVC w/o KD",
    "uniform": "uniform ratio (magnitude) + KD",
    "tp_magnitude": "Torch-Pruning global magnitude + KD",
    "tp_taylor": "Torch-Pruning global Taylor + KD",
}
BASELINES = ("uniform", "tp_magnitude", "tp_taylor")


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else "met" if ok else "**MISSED**"


def targets(results: dict) -> list[tuple[str, str, str]]:
    """(target, what was measured, verdict) for each target of issue 4."""
    acc = {(r["method"], r["budget"]): r for r in results["accuracy"]}
    rows = []
    uvc_half = acc.get(("uvc", 0.5))
    if uvc_half:
        drop = uvc_half["top1_teacher"] - uvc_half["top1"]
        rows.append((f"UVC loses <= {TARGET_DROP} point at B = 0.5",
                     f"{uvc_half['top1_teacher']:.2f}% -> {uvc_half['top1']:.2f}% ({-drop:+.2f})", _verdict(drop <= TARGET_DROP)))
    else:
        rows.append((f"UVC loses <= {TARGET_DROP} point at B = 0.5", "-", _verdict(None)))
    for budget in (0.5, 0.3):
        uvc_run = acc.get(("uvc", budget))
        others = [acc[(b, budget)] for b in BASELINES if (b, budget) in acc]
        if uvc_run and others:
            best = max(others, key=lambda r: r["top1"])
            rows.append((f"UVC beats every baseline at B = {budget}",
                         f"UVC {uvc_run['top1']:.2f}% vs best baseline ({LABELS[best['method']]}) {best['top1']:.2f}%",
                         _verdict(uvc_run["top1"] > best["top1"])))
        else:
            rows.append((f"UVC beats every baseline at B = {budget}", f"B = {budget} not run in this mode", _verdict(None)))
    eff = [(r["budget"], p["speedup"] * r["ratio"]) for r in results["speed"] if r["method"] == "uvc"
           for p in r["pairs"] if p["batch"] == 64]
    rows.append((f"measured speedup >= {TARGET_SPEED} x 1/R at batch 64 (CPU), UVC models",
                 ", ".join(f"B = {b}: {e:.2f} x 1/R" for b, e in eff) or "-",
                 _verdict(all(e >= TARGET_SPEED for _, e in eff) if eff else None)))
    cost = results.get("search_cost")
    rows.append((f"search step <= {TARGET_STEP} x plain KD step",
                 f"{cost['ratio']:.2f} x" if cost else "-", _verdict(cost["ratio"] <= TARGET_STEP if cost else None)))
    return rows


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_accuracy(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, label in LABELS.items():
        runs = sorted((r for r in results["accuracy"] if r["method"] == method), key=lambda r: r["ratio"])
        if runs:
            style = "o-" if method.startswith("uvc") else "s--"
            ax.plot([r["ratio"] for r in runs], [r["top1"] for r in runs], style, label=label, lw=2 if method == "uvc" else 1)
    teacher = results["accuracy"][0]["top1_teacher"]
    ax.axhline(teacher, color="k", ls=":", lw=1, label=f"teacher {teacher:.2f}%")
    ax.set(xlabel="R = MACs / teacher MACs (achieved)", ylabel="test top-1 %",
           title=f"Fashion-MNIST, accuracy at equal MACs ({results['mode']} mode)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_speedup(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for batch, marker in zip(results["settings"]["speed_batches"], "ox"):
        ideal = [1 / r["ratio"] for r in results["speed"]]
        measured = [p["speedup"] for r in results["speed"] for p in r["pairs"] if p["batch"] == batch]
        ax.scatter(ideal, measured, marker=marker, label=f"Fashion-MNIST models, batch {batch}")
    deit = results.get("deit_small")
    if deit:
        for p in deit["speed"]:
            ax.scatter([1 / deit["ratio"]], [p["speedup"]], marker="*", s=120, label=f"DeiT-Small, batch {p['batch']}")
    top = max([1 / r["ratio"] for r in results["speed"]] + [2.0]) * 1.1
    ax.plot([1, top], [1, top], "k:", lw=1, label="ideal: 1 / R")
    ax.plot([1, top], [TARGET_SPEED, TARGET_SPEED * top], "k--", lw=0.7, label=f"target: {TARGET_SPEED} / R")
    ax.set(xlabel="ideal speedup 1 / R", ylabel="measured speedup (CPU)", title="measured inference speedup against the MACs ratio")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(results: dict, md_path: Path, plot_dir: Path) -> None:
    plot_dir.mkdir(parents=True, exist_ok=True)
    plot_accuracy(results, plot_dir / "accuracy_vs_macs.png")
    plot_speedup(results, plot_dir / "speedup.png")
    rel = plot_dir.relative_to(md_path.parent)
    m, s = results["machine"], results["settings"]
    quick = results["mode"] == "quick"
    out = ["# Benchmarks", ""]
    if quick:
        out += ["> **Quick mode**: small settings (below) to check the pipeline, not the full benchmark. "
                "Accuracies from so little post-training are far from converged; run `make bench` for the full tables.", ""]
    out += [
        f"- command: `{results['command']}`",
        f"- date: {results['date']}; wall time {results.get('seconds', 0) / 60:.1f} min"
        + (f" ({results['reused_runs']} accuracy runs reused from an interrupted invocation by --resume)"
           if results.get("reused_runs") else ""),
        f"- machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch threads fixed at {m['threads']}; "
        f"torch {m['torch']}, timm {m['timm']}, torch-pruning {m['torch_pruning']}, Python {m['python']}, {m['os']}",
        f"- load average (1, 5, 15 min) at start {', '.join(f'{x:.2f}' for x in results['load_average_start'])}, "
        f"at end {', '.join(f'{x:.2f}' for x in results.get('load_average_end', []))} "
        "(anything above 0 is other work sharing these cores during the timings)",
        f"- GPU: {m['gpu'] or 'none on this machine: GPU rows are omitted, not estimated'}",
        f"- teacher: {results['teacher']}"
        + ("" if results["teacher"].startswith("bundled") else " (passed with --teacher: not the bundled teacher)")
        + f"; budgets {', '.join(str(b) for b in s['budgets'])}",
        f"- settings: {s['train_limit'] or 'all 60000'} training images, {s['test_limit'] or 'all 10000'} test images, "
        f"batch {s['batch_size']}; UVC search {s['search_epochs']} epoch(s) (warm-up {s['search_warmup_epochs']}), "
        f"post-training {s['post_epochs']} epoch(s) for every method, soft KD from the teacher (except the w/o-KD ablation); "
        f"Taylor importance from {s['taylor_batches']} batches; throughput: median of {s['speed_repeats']} rounds after warm-up",
        "", "## Targets", "",
        _table(["target", "measured", "verdict"], [list(t) for t in targets(results)]),
        "", "## 1. Accuracy at equal MACs (Fashion-MNIST test top-1)", "",
        "Every method post-trains its slimmed model with the same epochs, data order, optimizer and KD "
        "(`uvc.compress.post_train`); UVC variants also train during their search, the others are pruned "
        "in one shot. R is measured on the delivered model with `uvc.macs`.", "",
    ]
    for budget in s["budgets"]:
        runs = [r for r in results["accuracy"] if r["budget"] == budget]
        rows = [[LABELS[r["method"]], f"{r['ratio']:.3f}", f"{r['top1']:.2f}", f"{r['top1'] - r['top1_teacher']:+.2f}",
                 f"{r['top1_before_post']:.2f}", f"{r['params'] / 1e6:.2f}", f"{r['seconds']:.0f}"] for r in runs]
        out += [f"### B = {budget} (teacher {runs[0]['top1_teacher']:.2f}%)", "",
                _table(["method", "R", "top-1 %", "vs teacher", "top-1 % before post-training", "params (M)", "wall s"], rows), ""]
    out += [f"![accuracy against MACs]({rel / 'accuracy_vs_macs.png'})", "",
            "## 2. Measured inference speed (CPU)", "",
            "Images per second with `uvc.engine.throughput`; the teacher is timed right before each slimmed model. "
            "Efficiency = measured speedup / ideal speedup (1 / R).", ""]
    rows = []
    for r in results["speed"]:
        for p in r["pairs"]:
            rows.append([LABELS[r["method"]], r["budget"], f"{r['ratio']:.3f}", f"{1 / r['ratio']:.2f}", p["batch"],
                         f"{p['dense']:.0f}", f"{p['slimmed']:.0f}", f"{p['speedup']:.2f}", f"{p['speedup'] * r['ratio']:.2f}"])
    out += [_table(["method", "B", "R", "1/R", "batch", "teacher img/s", "slimmed img/s", "speedup", "efficiency"], rows), ""]
    deit = results.get("deit_small")
    if deit:
        out += [f"**DeiT-Small** (`deit_small_patch16_224`, 224 px, random weights) slimmed with the uniform plan "
                f"(same keep ratio of head dimensions and MLP neurons in every block) to R = {deit['ratio']:.3f}:", "",
                _table(["batch", "dense img/s", "slimmed img/s", "speedup", "efficiency"],
                       [[p["batch"], f"{p['dense']:.1f}", f"{p['slimmed']:.1f}", f"{p['speedup']:.2f}",
                         f"{p['speedup'] * deit['ratio']:.2f}"] for p in deit["speed"]]), ""]
    out += [f"![measured speedup]({rel / 'speedup.png'})", ""]
    cost = results.get("search_cost")
    if cost:
        out += ["## 3. Search cost", "",
                f"Median seconds per training step over {cost['steps']} steps (after warm-up), batch {cost['batch']}, "
                "the two kinds alternating on the same batches in one process. The search step is past the search's "
                "warm-up, so weights, ratios, gates and duals all move; the plain step fine-tunes the dense model "
                "with the same soft KD.", "",
                _table(["step", "seconds", "ratio"],
                       [["UVC search step (`Run.search_step`)", f"{cost['search_s']:.3f}", f"{cost['ratio']:.2f}"],
                        ["plain KD step of the dense model", f"{cost['plain_s']:.3f}", "1.00"]]), ""]
    out += ["## How the baselines are built", "",
            "- **uniform**: `uvc.budget.uniform_removal` keeps the same fraction of head dimensions and MLP neurons in "
            "every block (R <= B); the kept ones have the largest squared weight norms (output-projection columns, "
            "fc2 columns: the importance UVC uses). Then `uvc.slim`.",
            "- **Torch-Pruning**: `MetaPruner` with global ranking (`GroupMagnitudeImportance(p=2)` or "
            "`GroupTaylorImportance` from label-loss gradients) over attention head dimensions (the same ones in "
            "every head of a block, `num_heads` passed for timm's fused qkv) and MLP channels; the patch embedding and "
            "classifier are ignored, so the embedding width stays. Its channel ratio is bisected until B - 0.005 <= R <= B "
            "by `uvc.macs`. Whole-head removal is off: with 3 heads per block its global ranking can empty a block "
            "(a crash at high ratios). The pruned network is rebuilt from uvc's slim blocks with the teacher's softmax "
            "scale, so every method runs the same attention code in the speed table.",
            "- All of them, and UVC, are post-trained by `uvc.compress.post_train` / `uvc.compress` with identical settings.", ""]
    md_path.write_text("\n".join(out))
