"""The picture of a compression run: per-layer architecture and the R / z / accuracy curves."""
from __future__ import annotations

from pathlib import Path

from .io import atomic_write
from .resource import RESOURCES


def percent(top1: float | None) -> str:
    """A top-1 figure for a log line or a title; None is a split the run did not read (`test_at_end=False`)."""
    return "unread" if top1 is None else f"{top1:.2f}%"


def outcome(report: dict) -> str:
    """A run's accuracy in words: test and validation top-1, or a backbone's feature cosine and linear probe."""
    if report.get("task") != "backbone":
        return (f"test top-1 {percent(report['top1'])} (teacher {percent(report['top1_teacher'])}), "
                f"validation {percent(report['top1_val'])}")
    probe = report["linear_probe_val"]
    return (f"feature cosine to the teacher {report['feature_cosine_val']:.4f} (validation)"
            + (f", linear probe {probe['dense']:.2f}% -> {probe['slimmed']:.2f}%" if probe else ""))


def speed_text(report: dict) -> str:
    """The timing in words, or that it was skipped."""
    if report["throughput"] is None:
        return "speed not timed"
    return f"{report['throughput_dense']:.0f} -> {report['throughput']:.0f} images/s"


def write_report(report: dict, path: str | Path) -> None:
    """Draw report.png from a report dict (the same data as report.json)."""
    import matplotlib  # imported here, at the end of a run: matplotlib adds about a second to every start-up

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    idx = list(range(len(layers)))

    ax = axes[0, 0]
    attn_width = [l["heads"] * l["head_dim"] if l["attn"] else 0 for l in layers]
    ax.bar(idx, attn_width, color="tab:blue")
    for i, l in enumerate(layers):
        label = f"{l['heads']}x{l['head_dim']}" if l["attn"] else "skip"
        ax.text(i, attn_width[i], label, ha="center", va="bottom", fontsize=7)
    ax.set(title="attention kept: heads x head width", xlabel="block", ylabel="q/k/v width")

    ax = axes[0, 1]
    neurons = [l["hidden"] if l["mlp"] else 0 for l in layers]
    ax.bar(idx, neurons, color="tab:orange")
    for i, l in enumerate(layers):
        if not l["mlp"]:
            ax.text(i, 0, "skip", ha="center", va="bottom", fontsize=7)
    ax.set(title="MLP neurons kept", xlabel="block", ylabel="neurons")

    history = report["history"]
    steps = list(range(len(history)))
    phases = [h["phase"] for h in history]
    search = [i for i, p in enumerate(phases) if p == "search"]
    ax = axes[1, 0]
    if search:
        ax.plot([steps[i] for i in search], [history[i]["R"] for i in search], label="R")
        ax.axhline(report["budget"], color="k", ls="--", lw=1, label=f"budget {report['budget']}")
        ax2 = ax.twinx()
        ax2.plot([steps[i] for i in search], [history[i]["z"] for i in search], color="tab:red", alpha=0.6, label="z / price")
        ax2.set_ylabel("dual z (in units of its starting price)", color="tab:red")
        ax.legend(loc="upper right", fontsize=8)
    resource = RESOURCES[report.get("resource", "macs")]
    ax.set(title=f"search: ratio of {resource} and budget dual" if search else "no search (one-shot)", xlabel="logged step",
           ylabel=f"R ({resource})")

    ax = axes[1, 1]
    evals = report.get("evals", [])
    backbone = report.get("task") == "backbone"
    key, what = ("cosine_val", "feature cosine to the teacher") if backbone else ("top1_val", "top-1 %")
    for phase, color in (("search", "tab:green"), ("post", "tab:purple")):
        pts = [e for e in evals if e["phase"] == phase]
        if pts:
            ax.plot([e["epoch"] for e in pts], [e[key] for e in pts], "o-", color=color, label=f"{phase} (validation)")
    if backbone:
        probe = report["linear_probe_val"]
        title = (f"final: feature cosine {report['feature_cosine_val']:.4f} (validation) at R = {report['ratio']:.3f}"
                 + (f"\nlinear probe {probe['dense']:.2f}% -> {probe['slimmed']:.2f}%" if probe else ""))
    else:
        ax.axhline(report["top1_val_teacher"], color="k", ls="--", lw=1,
                   label=f"teacher {report['top1_val_teacher']:.2f}% (validation)")
        title = f"final: {report['top1_val']:.2f}% validation, {percent(report['top1'])} test at R = {report['ratio']:.3f}"
    ax.set(title=title, xlabel="epoch of phase", ylabel=what)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)

    speed = speed_text(report) + ("" if report["throughput"] is None else f" (batch {report['throughput_batch']})")
    fig.suptitle(f"uvc: {report['macs_dense'] / 1e6:.1f} M -> {report['macs'] / 1e6:.1f} M MACs "
                 f"({report['macs'] / report['macs_dense']:.3f}), {report['params_dense'] / 1e6:.2f} M -> "
                 f"{report['params'] / 1e6:.2f} M parameters ({report['params'] / report['params_dense']:.3f}), {speed}"
                 + ("" if report.get("latency_ratio_measured") is None else
                    f":\nlatency {report['latency_ratio_measured']:.3f} of the dense model's, measured")
                 + ("" if report.get("latency_ratio_predicted") is None else f" ({report['latency_ratio_predicted']:.3f} "
                                                                              "predicted by the latency table)"))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)
