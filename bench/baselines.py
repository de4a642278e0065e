"""The baselines UVC is compared with, each ending as a uvc-slimmed model at R <= budget.

- uniform: the same keep ratio in every block (`uvc.budget.uniform_plan`), keeping the groups with
  the largest weight norms (the importance UVC itself uses), then `uvc.slim`.
- Torch-Pruning: global magnitude or Taylor ranking of attention head dimensions and MLP channels
  (the embedding width stays), its pruning ratio bisected until `uvc.macs` is within the budget.

Every pruned model is converted to uvc's `SlimBlock`s, so all methods run the same attention code
when their speed is measured, and keep the dense model's softmax scale (timm's fused attention
would silently rescale a head whose width Torch-Pruning shrank).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import uvc
from uvc.adapters import adapter_for
from uvc.flops import block_shape
from uvc.plan import LayerPlan

TP_CRITERIA = ("magnitude", "taylor")


def plan_of_slimmed(model: nn.Module) -> list[LayerPlan]:
    """A slimmed model's per-block shapes as keep-everything plans (what the report shows of a pruned model)."""
    plan = []
    for block in adapter_for(model).blocks(model):
        s = block_shape(block)
        plan.append(LayerPlan(heads=list(range(s.heads)), dims=[list(range(s.head_dim))] * s.heads,
                              neurons=list(range(s.hidden)), attn=s.runs_attn, mlp=s.runs_mlp))
    return plan


def taylor_gradients(model: nn.Module, batches, count: int) -> nn.Module:
    """A copy of `model` holding the gradients of the label loss summed over `count` batches (Taylor importance)."""
    model = copy.deepcopy(model).train()
    for p in model.parameters():
        p.requires_grad_(True)
    for i, (x, y) in enumerate(batches):
        if i >= count:
            break
        F.cross_entropy(model(x), y).backward()
    return model.eval()


def _copy_with_gradients(model: nn.Module) -> nn.Module:
    """deepcopy drops .grad; Taylor importance needs it on every trial copy."""
    clone = copy.deepcopy(model)
    for src, dst in zip(model.parameters(), clone.parameters()):
        dst.grad = None if src.grad is None else src.grad.clone()
    return clone


def _tp_prune(model: nn.Module, ratio: float, criterion: str, input_size) -> nn.Module:
    """A pruned copy of a timm ViT at Torch-Pruning channel ratio `ratio` (head dims + MLP channels, global)."""
    import torch_pruning as tp
    from timm.layers import Attention

    model = _copy_with_gradients(model).requires_grad_(True)  # Torch-Pruning traces the autograd graph
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    importance = tp.importance.GroupMagnitudeImportance(p=2) if criterion == "magnitude" else tp.importance.GroupTaylorImportance()
    pruner = tp.pruner.MetaPruner(
        model, torch.zeros(1, *input_size), importance=importance, global_pruning=True, pruning_ratio=ratio,
        max_pruning_ratio=0.95,  # global ranking may otherwise empty a whole layer
        # The patch embedding's output is the residual stream: ignoring it keeps the embedding width.
        ignored_layers=[model.head, model.patch_embed],
        num_heads={a.qkv: a.num_heads for a in attentions}, prune_head_dims=True, prune_num_heads=False,
        unwrapped_parameters=[(model.cls_token, 2), (model.pos_embed, 2)],
    )
    pruner.step()
    for a in attentions:  # Torch-Pruning changes the layers; the attention's bookkeeping is ours to update
        a.num_heads = pruner.num_heads[a.qkv]
        a.head_dim = a.qkv.out_features // (3 * a.num_heads)
        a.attn_dim = a.num_heads * a.head_dim
    model.zero_grad(set_to_none=True)
    return model


def torch_pruning_to_budget(model: nn.Module, budget: float, criterion: str, input_size=None,
                            tolerance: float = 0.005, max_trials: int = 16) -> nn.Module:
    """The least-pruned Torch-Pruning model with budget - tolerance <= R <= budget (or the closest below after `max_trials`).

    R is not monotone in Torch-Pruning's global channel ratio (the per-layer cap and the head-dim
    groups interact: on the bundled teacher ratio 0.6 gave R 0.36 and 0.71 gave 0.41), so a coarse
    scan finds the first ratio that meets the budget and bisection refines between it and the ratio
    before. `model` must already carry gradients for the Taylor criterion (`taylor_gradients`).
    Returns a uvc-slimmed model.
    """
    if criterion not in TP_CRITERIA:
        raise ValueError(f"criterion {criterion!r} is not one of {TP_CRITERIA}")
    input_size = tuple(input_size or adapter_for(model).input_size(model))
    dense = uvc.macs(model, input_size)

    def ratio_of(ratio: float):
        pruned = _tp_prune(model, ratio, criterion, input_size)
        return pruned, uvc.macs(pruned, input_size) / dense

    low, high, best, r = 0.0, None, None, None
    for ratio in [i / 20 for i in range(1, 20)]:
        pruned, r = ratio_of(ratio)
        if r <= budget:
            high, best = ratio, pruned
            break
        low = ratio
    if best is None:
        raise RuntimeError(f"Torch-Pruning reaches no R <= {budget} at channel ratios 0.05-0.95 (criterion {criterion})")
    for _ in range(max_trials if r < budget - tolerance else 0):
        ratio = (low + high) / 2
        pruned, r = ratio_of(ratio)
        if r <= budget:
            high, best = ratio, pruned
            if r >= budget - tolerance:
                break
        else:
            low = ratio
    return uvc.slim(best)
