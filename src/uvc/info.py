"""`uvc info`: what a model keeps per block, its MACs and parameters, and the budgets a dense model can reach."""
from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from .adapters import adapter_for
from .budget import smallest_ratio
from .flops import block_shape, macs, skeleton_of
from .models import load_model, param_count
from .preprocess import LABEL_NAMES
from .resource import RESOURCES, shape_macs
from .slim import is_slim


def describe(model: str | nn.Module | None = None, checkpoint: str | None = None, **timm_kwargs) -> str:
    """A table of the model's blocks (a slimmed model shows what each kept), with totals and reachable budgets;
    `timm_kwargs` (e.g. `img_size=112`) build a timm name at another resolution, whose token count the MACs follow."""
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
    if not is_slim(net):
        for resource in RESOURCES:
            skel = skeleton_of(net, input_size, resource)
            lines.append(f"reachable budgets (fraction of these {RESOURCES[resource]}, --resource {resource}): up to 1.0; at least "
                         f"{smallest_ratio(skel, prune=True, skip=True):.4f} with pruning and skipping, "
                         f"{smallest_ratio(skel, prune=True, skip=False):.4f} with pruning alone, "
                         f"{smallest_ratio(skel, prune=False, skip=True):.4f} with skipping alone")
    elif ratios := _dense_ratios(model):
        lines.append(ratios)
    return "\n".join(lines)


def _dense_ratios(model) -> str | None:
    """A run folder's model against the dense model it came from, read off the report.json beside it
    (a slimmed model alone does not say what it was cut from)."""
    path = Path(model) / "report.json" if isinstance(model, (str, Path)) else None
    try:
        report = json.loads(path.read_text()) if path is not None and path.is_file() else None
        return None if report is None else (
            f"of the dense model (report.json): {report['macs'] / report['macs_dense']:.4f} of its MACs, "
            f"{report['params'] / report['params_dense']:.4f} of its parameters")
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None
