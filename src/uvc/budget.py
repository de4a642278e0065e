"""Budget arithmetic on hard decisions: validating a budget, the uniform plan, and the exact final fit.

Every method ends near its budget; `fit_to_budget` makes it exact: it removes the groups that cost
the least importance per MAC saved until R <= B, then gives back the most important groups that
still fit, so the delivered model lands in [B - tolerance, B] as `uvc.macs` (or, for a budget in
parameters, the parameter count) measures it. With
`multiple` > 1 the kept head widths and MLP widths move in steps of that many (widths that are
multiples of 8 run on faster GPU kernels).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from .adapters import adapter_for
from .errors import UVCError
from .flops import skeleton_of
from .importance import GroupNorms, group_norms, keep_masks
from .plan import LayerPlan
from .resource import RESOURCES, LatencyModel, Skeleton


def smallest_ratio(skel: Skeleton, prune: bool, skip: bool) -> float:
    """The lowest R reachable: everything skipped, or one head of width one and one neuron per block."""
    if skip:
        return skel.fixed_cost / skel.dense_cost
    if not prune:
        return 1.0
    ones = torch.ones(skel.depth)
    return float(skel.ratio(skel.sizes() - 1, ones, ones))


def check_budget(budget: float, skel: Skeleton, prune: bool, skip: bool) -> None:
    if not isinstance(budget, (int, float)) or math.isnan(budget) or not 0 < budget <= 1:
        raise UVCError(f"budget {budget} is outside (0, 1]; it is the fraction of the dense model's {RESOURCES[skel.resource]} "
                       "to keep, e.g. 0.5")
    low = smallest_ratio(skel, prune, skip)
    if budget < low:
        what = "pruning and skipping" if prune and skip else "pruning alone" if prune else "skipping alone" if skip else "nothing (pruning and skipping both off)"
        fix = "turn pruning or skip gates on (SearchConfig(skip='both'), --skip both)" if not (prune or skip) \
            else f"ask for at least {math.ceil(low * 1000) / 1000}"
        with_skips = smallest_ratio(skel, prune, True)
        if prune and not skip and budget >= with_skips:
            fix += (f", or let blocks be skipped too (--skip both, SearchConfig(skip='both')), which reaches "
                    f"R = {with_skips:.4f}")
        raise UVCError(f"budget {budget} is below the smallest model reachable with {what} (R = {low:.4f}); {fix}")


def _kept_in_steps(size: torch.Tensor, keep: float, multiple: int) -> torch.Tensor:
    """ceil(size * keep) rounded up to a multiple (never above size, never below one step)."""
    kept = torch.ceil(size * keep / multiple) * multiple
    return torch.minimum(torch.clamp(kept, min=multiple), size)


def uniform_removal(skel: Skeleton, budget: float, multiple: int = 1) -> torch.Tensor:
    """[L, 3] removal counts keeping the same fraction of head dims and neurons in every block, R <= budget."""
    sizes, ones = skel.sizes(), torch.ones(skel.depth)

    def removed_at(keep: float) -> torch.Tensor:
        removed = torch.zeros_like(sizes)
        removed[:, 1] = sizes[:, 1] - _kept_in_steps(sizes[:, 1], keep, multiple)
        removed[:, 2] = sizes[:, 2] - _kept_in_steps(sizes[:, 2], keep, multiple)
        return removed

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if float(skel.ratio(removed_at(mid), ones, ones)) <= budget:
            lo = mid
        else:
            hi = mid
    return removed_at(lo)


def plan_of_counts(norms: list[GroupNorms], removed: torch.Tensor, attn: torch.Tensor | None = None,
                   mlp: torch.Tensor | None = None) -> list[LayerPlan]:
    """The plan removing `removed[l] = (heads, dims per head, neurons)` least important groups of each block,
    by the blocks' group importance `norms` (`importance.group_norms` or a data-aware variant)."""
    plan = []
    for l, block_norms in enumerate(norms):
        masks = keep_masks(block_norms, *[int(n) for n in removed[l]])
        plan.append(LayerPlan.from_masks(*masks, attn=attn is None or bool(attn[l]), mlp=mlp is None or bool(mlp[l])))
    return plan


def uniform_plan(model: nn.Module, budget: float, input_size=None, multiple: int = 1,
                 resource: str = "macs", latency: LatencyModel | None = None) -> list[LayerPlan]:
    """One keep ratio for every block, R <= budget (a fraction of `resource`; for latency, of `latency`'s
    prediction); within a block the most important groups stay. Where one ratio for all cannot land in
    [budget - 0.01, budget] (a measured latency's steps are uneven), `fit_to_budget` gives back the most
    important groups that still fit."""
    norms = [group_norms(b) for b in adapter_for(model).blocks(model)]
    skel = skeleton_of(model, input_size, resource, latency)
    removed, ones = uniform_removal(skel, budget, multiple), torch.ones(skel.depth)
    if float(skel.ratio(removed, ones, ones)) > budget:
        raise UVCError(f"the uniform plan cannot reach budget {budget}: keeping every head at its smallest width it has "
                       f"R = {float(skel.ratio(removed, ones, ones)):.4f} of the {RESOURCES[skel.resource]}; ask for more")
    if float(skel.ratio(removed, ones, ones)) < budget - 0.01:
        removed = fit_to_budget(skel, removed, ones, ones, removal_costs(norms), budget, multiple=multiple)
    return plan_of_counts(norms, removed)


def plan_counts(skel: Skeleton, plan: list[LayerPlan]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float64 removal counts [L, 3] and half keep values [L] a hard plan stands for, in `skel`'s terms
    (a skipped half counts as keeping one group of each kind: its keep value of 0 prices it at nothing)."""
    shapes = [p.shape(d) for p, d in zip(plan, skel.dim)]
    kept = torch.tensor([[max(s.heads, 1), max(s.head_dim, 1), max(s.hidden, 1)] for s in shapes], dtype=torch.float64)
    keep = torch.tensor([[s.runs_attn, s.runs_mlp] for s in shapes], dtype=torch.float64)
    return skel.sizes(kept) - kept, keep[:, 0], keep[:, 1]


def plan_ratio(skel: Skeleton, plan: list[LayerPlan]) -> float:
    """R of a hard plan in `skel`'s resource (for latency: the table's prediction)."""
    return float(skel.ratio(*plan_counts(skel, plan)))


def removal_costs(norms: list[GroupNorms], relative: bool = True) -> list[list[torch.Tensor]]:
    """`costs[l][k]`: importance of each group of kind k (heads, dims, neurons) of block l, ascending.

    Weight norms of different kinds and layers are not on one scale, so by default each is taken
    relative to the layer's total for that kind. Importance already in loss units (the search's
    Taylor estimates) compares as it is: `relative=False`.
    """
    costs = []
    for block_norms in norms:
        # Each head drops its own least important dimensions: the cost of the j-th removal is the
        # sum over heads of each head's j-th smallest dimension.
        kinds = (block_norms.heads, block_norms.dims.sort(dim=1).values.sum(0), block_norms.neurons)
        costs.append([((k / k.sum().clamp(min=1e-12)) if relative else k).sort().values.float().cpu() for k in kinds])
    return costs


def fit_to_budget(skel: Skeleton, removed: torch.Tensor, attn: torch.Tensor, mlp: torch.Tensor,
                  costs: list[list[torch.Tensor]], budget: float, tolerance: float = 0.01,
                  multiple: int = 1) -> torch.Tensor:
    """Adjust integer removal counts so that B - tolerance <= R <= B.

    `costs[l][k]` holds the importance of each group of kind k in block l, sorted ascending (the
    order in which they are removed). Removing takes the step with the least importance per MAC
    saved; giving back takes the step with the most importance per MAC added that still fits; where
    every give-back overshoots B, the smallest overshooting give-back is followed by
    removals elsewhere that land in the window.
    Head dimensions and neurons move `multiple` at a time and stay at multiples of it (heads move
    one at a time). Works on CPU float64 copies; returns a tensor like `removed`.
    """
    like = removed
    removed, attn, mlp = (t.detach().double().cpu() for t in (removed, attn, mlp))
    sizes = skel.sizes(removed)
    steps = [1, multiple, multiple]
    if multiple > 1:  # start from kept widths that are multiples (rounded down: removes a little more)
        for k in (1, 2):
            kept = torch.clamp(torch.div(sizes[:, k] - removed[:, k], multiple, rounding_mode="floor") * multiple,
                               min=multiple)
            removed[:, k] = sizes[:, k] - torch.minimum(kept, sizes[:, k])

    def ratio(r):
        return float(skel.ratio(r, attn, mlp))

    def moves(state: torch.Tensor, direction: int, frozen: tuple[int, int] | None = None):
        """(importance of the groups moved, R after, the counts after, (block, kind)) for each single step
        from `state`, except along `frozen`."""
        current = ratio(state)
        for l in range(skel.depth):
            for k in range(3):
                step = steps[k]
                n = int(state[l, k]) + direction * step
                if (l, k) == frozen or n > sizes[l, k] - min(step, sizes[l, k]) or n < 0:
                    continue
                trial = state.clone()
                trial[l, k] = n
                trial_ratio = ratio(trial)
                if trial_ratio == current:
                    continue
                group = slice(int(state[l, k]), n) if direction > 0 else slice(n, int(state[l, k]))
                yield float(costs[l][k][group].sum()), trial_ratio, trial, (l, k)

    def per_resource(move, current: float) -> float:
        return move[0] / abs(move[1] - current)

    def remove_until_fits(state: torch.Tensor, frozen: tuple[int, int] | None = None, land: bool = False) -> torch.Tensor:
        """Remove the step with the least importance per resource saved until R <= B; with `land`, only steps
        that stay at or above B - tolerance while there are such."""
        while (current := ratio(state)) > budget:
            options = list(moves(state, +1, frozen))
            if not options:
                raise UVCError(f"cannot reach budget {budget}: the smallest model with these skip decisions has "
                               f"R = {current:.4f}")
            if land:
                options = [o for o in options if o[1] >= budget - tolerance] or options
            state = min(options, key=lambda o: per_resource(o, current))[2]
        return state

    most = sizes - torch.minimum(torch.tensor(steps, dtype=sizes.dtype), sizes)  # every removable group removed
    if ratio(torch.maximum(removed, most)) > budget:  # said at once, not after removing group by group
        raise UVCError(f"cannot reach budget {budget}: the smallest model with these skip decisions has "
                       f"R = {ratio(torch.maximum(removed, most)):.4f}")
    removed = remove_until_fits(removed)
    while (current := ratio(removed)) < budget - tolerance / 4:
        options = [o for o in moves(removed, -1) if o[1] <= budget]
        if not options:
            break
        removed = max(options, key=lambda o: per_resource(o, current))[2]
    if ratio(removed) < budget - tolerance:
        # Every single give-back overshoots B (a measured table can rise in big steps): give one back, the
        # smallest overshoot first, and remove elsewhere until R lands in the window.
        for _, _, back, where in sorted(moves(removed, -1), key=lambda o: o[1]):
            with contextlib.suppress(UVCError):
                trial = remove_until_fits(back, frozen=where, land=True)
                if ratio(trial) >= budget - tolerance:
                    removed = trial
                    break
    return removed.to(like)
