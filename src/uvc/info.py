"""`uvc info`: what a model keeps per block, its MACs and parameters, and the budgets a dense model can reach
(with `latency`: its measured time too, which costs a timing)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .adapters import adapter_for
from .budget import smallest_ratio
from .engine import compare_throughput
from .flops import block_shape, macs, skeleton_of
from .latency import LatencyConfig, latency_model, measure_table, predicted_dense_seconds
from .models import load_model, param_count
from .preprocess import LABEL_NAMES
from .resource import RESOURCES, shape_macs
from .slim import is_slim


def describe(model: str | nn.Module | None = None, checkpoint: str | None = None, latency: LatencyConfig | None = None,
             **timm_kwargs) -> str:
    """A table of the model's blocks (a slimmed model shows what each kept), with totals and reachable budgets;
    `timm_kwargs` (e.g. `img_size=112`) build a timm name at another resolution, whose token count the MACs follow.
    With `latency` the model is timed on the CPU at its batch and threads (a dense one: its latency table)."""
    net = load_model(model, checkpoint=checkpoint, **timm_kwargs)
    adapter = adapter_for(net)
    input_size = adapter.input_size(net)
    tokens = adapter.tokens(net, input_size)
    total = macs(net, input_size)
    lines = [f"{model or 'the bundled teacher'}: {type(net).__name__}, input {'x'.join(map(str, input_size))}, "
             f"{tokens} tokens, {'slimmed' if is_slim(net) else 'dense'}",
             f"{'block':>5}  {'attention (heads x width)':>26}  {'MLP neurons':>11}  {'MACs (M)':>9}  {'params (M)':>10}"]
    for i, block in enumerate(adapter.blocks(net)):
        s = block_shape(block)
        attn = f"{s.heads} x {s.head_dim}" if s.runs_attn else "skipped"
        mlp = str(s.hidden) if s.runs_mlp else "skipped"
        lines.append(f"{i:>5}  {attn:>26}  {mlp:>11}  {shape_macs(tokens, s) / 1e6:>9.2f}  "
                     f"{param_count(block) / 1e6:>10.3f}")
    lines.append(f"total: {total / 1e6:.2f} M MACs per image ({adapter.fixed_macs(net, input_size) / 1e6:.2f} M outside "
                 f"the blocks), {param_count(net) / 1e6:.2f} M parameters")
    if names := (getattr(net, "pretrained_cfg", None) or {}).get(LABEL_NAMES):
        lines.append(f"classes: {len(names)} ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
    table = measure_table(net, input_size, torch.device("cpu"), latency.batch, latency.threads, latency.rounds,
                          latency.seconds) if latency is not None and not is_slim(net) else None
    if table is not None:
        lines.append(_latency_line(table))
    elif latency is not None:
        speed = compare_throughput({"model": net}, input_size, latency.batch, torch.device("cpu"), threads=latency.threads)["model"]
        lines.append(f"latency: {1e3 * latency.batch / speed['median']:.2f} ms per batch of {latency.batch} on this CPU, "
                     f"{speed['threads']} threads (median of {len(speed['rounds'])} rounds)")
    if not is_slim(net):
        for resource in RESOURCES if table is not None else ("macs", "params"):
            skel = skeleton_of(net, input_size, resource, latency_model(table) if table is not None else None)
            lines.append(f"reachable budgets (fraction of these {RESOURCES[resource]}, --resource {resource}): up to 1.0; at least "
                         f"{smallest_ratio(skel, prune=True, skip=True):.4f} with pruning and skipping, "
                         f"{smallest_ratio(skel, prune=True, skip=False):.4f} with pruning alone, "
                         f"{smallest_ratio(skel, prune=False, skip=True):.4f} with skipping alone")
    elif ratios := _dense_ratios(model):
        lines.append(ratios)
    return "\n".join(lines)


def _latency_line(table: dict) -> str:
    """The table's fixed parts and full-width halves in milliseconds, and its sum against the dense model's timing."""
    key, shape = table["key"], table["shapes"][table["blocks"][0]] if table["blocks"] else None
    halves = f", a block's attention {1e3 * shape['attn'][-1][-1]:.2f} ms and MLP {1e3 * shape['mlp'][-1]:.2f} ms" if shape else ""
    predicted = predicted_dense_seconds(table)
    return (f"latency on {key['device']}, batch {key['batch']}, {key['threads']} threads: measured {1e3 * table['dense_measured']:.2f} ms "
            f"per batch; table: fixed parts {1e3 * table['fixed']:.2f} ms{halves} (block 0), sum {1e3 * predicted:.2f} ms")


def _dense_ratios(model) -> str | None:
    """A run folder's model against the dense model it came from, read off the report.json beside it
    (a slimmed model alone does not say what it was cut from)."""
    path = Path(model) / "report.json" if isinstance(model, (str, Path)) else None
    try:
        report = json.loads(path.read_text()) if path is not None and path.is_file() else None
        measured = report.get("latency_ratio_measured") if report is not None else None
        timed = "" if measured is None else (f", {measured:.4f} of its measured latency (batch {report['throughput_batch']}, "
                                             f"{report['device']})")
        return None if report is None else (
            f"of the dense model (report.json): {report['macs'] / report['macs_dense']:.4f} of its MACs, "
            f"{report['params'] / report['params_dense']:.4f} of its parameters{timed}")
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None
