"""One-shot compression: rank groups, fit a plan to the budget, slim, compensate; no gradient step.

For users who hold a pretrained ViT but few images: a few hundred unlabeled images rank the groups
(optionally) and feed the closed-form compensation (`uvc.compensate`), which recovers most of what
pruning takes away in seconds on a CPU.

Importance of a group is how much it feeds the residual stream, through the layer that reads it:
- "weight": |column of proj / fc2|^2, the group's weight norm (what UVC's search ranks by);
- "activation": |column|^2 * E[feature^2] over calibration tokens (Wanda-style): a neuron that is
  rarely active costs little even if its weights are large.
A head's importance is the sum over its dimensions. Allocation of the budget between blocks:
- "uniform": the same keep fraction of head dims and neurons in every block (`uniform_removal`);
- "global": groups removed across all blocks by least importance per MAC saved, importance relative
  to the layer's total (`fit_to_budget`, as UVC's final fit does).
Either way `fit_to_budget` lands the plan in [budget - 0.01, budget].
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


from .budget import fit_to_budget, plan_of_counts, plan_ratio, removal_costs, smallest_ratio, uniform_removal
from .flops import count, skeleton_of
from .compensate import DEFAULT_RIDGE, _images, compensate as _compensate
from .errors import UVCError
from .importance import GroupNorms, group_norms
from .plan import LayerPlan
from .resource import RESOURCES, LatencyModel
from .slim import slim
from .adapters import adapter_for


IMPORTANCES = ("weight", "activation")
ALLOCATIONS = ("uniform", "global")
TOLERANCE = 0.01
CHOICE_IMAGES = 256  # calibration images that choose `skipping_plan`'s skips


def take_images(batches: Iterable, count: int) -> list[torch.Tensor]:
    """The first `count` images of `batches` (images or (images, labels) pairs), kept so both the
    importance pass and the compensation see the same images even when `batches` is a generator."""
    taken, seen = [], 0
    for batch in batches:
        x = _images(batch)[: count - seen]
        if not len(x):
            break
        taken.append(x)
        seen += len(x)
    if not taken:
        raise UVCError("one-shot compression needs calibration images; the batches gave none")
    return taken


@torch.no_grad()
def group_importance(model: nn.Module, kind: str = "weight", images: list[torch.Tensor] | None = None
                     ) -> list[GroupNorms]:
    """Per block, the importance of every head dimension and neuron: the weight norms (`group_norms`,
    what the search and the uniform plan rank by), times E[feature^2] on the images for "activation"."""
    if kind not in IMPORTANCES:
        raise UVCError(f"importance {kind!r} is not one of {IMPORTANCES}")
    blocks = list(adapter_for(model).blocks(model))
    scores = [group_norms(b) for b in blocks]
    if kind == "weight":
        return scores
    if not images:
        raise UVCError('importance="activation" needs calibration images')
    sums = [[0.0, 0.0] for _ in blocks]
    count = [0]

    def hook(l, k):
        def record(module, args):
            f = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[l][k] = sums[l][k] + f.pow(2).sum(0)
            if l == 0 and k == 0:
                count[0] += len(f)
        return record

    handles = [lin.register_forward_pre_hook(hook(l, k))
               for l, b in enumerate(blocks) for k, lin in enumerate((b.attn.proj, b.mlp.fc2))]
    was_training, p = model.training, next(model.parameters())
    model.eval()
    try:
        for x in images:
            model(x.to(p.device, p.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return [GroupNorms(dims=n.dims.double() * (sums[l][0] / count[0]).view_as(n.dims),
                       neurons=n.neurons.double() * sums[l][1] / count[0]) for l, n in enumerate(scores)]


def _global_start(skel, costs, budget: float, attn: torch.Tensor, mlp: torch.Tensor) -> torch.Tensor:
    """A removal close to the greedy's: every group whose relative importance per MAC is below one
    threshold goes, the threshold bisected to the budget. `fit_to_budget` from all-kept would find
    the same order one group at a time, which takes minutes on 12 blocks; from here it takes steps."""
    sizes = skel.sizes()
    # What one head, dimension slot or neuron costs in the budget's resource (a measured latency may be flat: > 0).
    per_group = skel.group_costs().clamp(min=torch.finfo(torch.float64).tiny)

    def removed_at(t: float) -> torch.Tensor:
        r = torch.zeros_like(sizes)
        for l in range(skel.depth):
            for k in range(3):
                n = int((costs[l][k].double() / per_group[l, k] <= t).sum())
                r[l, k] = min(n, int(sizes[l, k]) - 1)
        return r

    thresholds = sorted({float(c) / float(per_group[l, k]) for l in range(skel.depth) for k in range(3) for c in costs[l][k]})
    lo, hi = 0, len(thresholds) - 1  # smallest threshold with R <= budget
    while lo < hi:
        mid = (lo + hi) // 2
        if float(skel.ratio(removed_at(thresholds[mid]), attn, mlp)) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return removed_at(thresholds[lo])


def one_shot_plan(model: nn.Module, budget: float, scores, allocation: str = "uniform", input_size=None,
                  multiple: int = 1, resource: str = "macs", latency: LatencyModel | None = None,
                  attn: torch.Tensor | None = None, mlp: torch.Tensor | None = None) -> list[LayerPlan]:
    """The plan for `budget` (a fraction of `resource`) from per-group importance `scores` (see `group_importance`),
    kept head and MLP widths at multiples of `multiple` (or whole). `attn` and `mlp` [L] (1: runs, 0: skipped;
    default all run) fix which halves run; the widths of those that run are fitted to the rest of the budget."""
    if allocation not in ALLOCATIONS:
        raise UVCError(f"allocation {allocation!r} is not one of {ALLOCATIONS}")
    if not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise UVCError(f"budget {budget} is outside (0, 1]; it is the fraction of the dense model's "
                       f"{RESOURCES.get(resource, resource)} to keep, e.g. 0.5")
    skel = skeleton_of(model, input_size, resource, latency)
    costs = removal_costs(scores)
    ones = torch.ones(skel.depth)
    attn, mlp = (ones if keep is None else keep.double().cpu() for keep in (attn, mlp))
    start = uniform_removal(skel, budget, multiple) if allocation == "uniform" else _global_start(skel, costs, budget, attn, mlp)
    return plan_of_counts(scores, fit_to_budget(skel, start, attn, mlp, costs, budget, TOLERANCE, multiple), attn, mlp)


@torch.no_grad()
def skipping_plan(model: nn.Module, budget: float, scores, images: list[torch.Tensor], input_size=None,
                  multiple: int = 1, resource: str = "macs", latency: LatencyModel | None = None,
                  halves: bool = True) -> list[LayerPlan]:
    """One-shot's plan for a budget below what pruning alone reaches: some halves (or, with `halves` False,
    whole blocks) skipped, the widths of the rest fitted to the budget.

    Each half alone is skipped on the calibration `images` and ranked by how much it changes the model's
    output per unit of `resource` it saves. Skipping the first k of that order, for k from the fewest that
    make the budget reachable upwards, every candidate is slimmed and refitted by least squares (as the
    rewound end is), and the one whose output changes least is kept: few skips force every width to its
    floor, many skips remove what narrowing would have kept, and the measured change decides between them.
    The search stops once two candidates in a row did worse than the best; the first `CHOICE_IMAGES` images
    serve, so that the choice costs a few passes over them per candidate."""
    images = take_images(images, CHOICE_IMAGES)
    skel = skeleton_of(model, input_size, resource, latency)
    depth, full = skel.depth, torch.zeros(skel.depth, 3, dtype=torch.float64)
    references = [model(x) for x in images]

    def change(plan: list[LayerPlan], refit: bool) -> float:
        """The squared change of the output over its squared size, summed over the images."""
        slimmed = slim(model, plan)
        if refit:
            _compensate(model, slimmed, plan, images)
        gap = sum(float((slimmed(x) - y).double().pow(2).sum()) for x, y in zip(images, references))
        return gap / sum(float(y.double().pow(2).sum()) for y in references)

    def keeps(skipped: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention and MLP keep values [L] with the (block, half) pairs `skipped` off."""
        keep = torch.ones(2, depth, dtype=torch.float64)
        for l, half in skipped:
            keep[half, l] = 0.0
        return keep[0], keep[1]

    def cost_per_saving(unit: list[tuple[int, int]]) -> float:
        saved = 1 - float(skel.ratio(full, *keeps(unit)))
        return change(plan_of_counts(scores, full, *keeps(unit)), refit=False) / max(saved, 1e-12)

    units = [[(l, 0)] for l in range(depth)] + [[(l, 1)] for l in range(depth)] if halves \
        else [[(l, 0), (l, 1)] for l in range(depth)]  # what one skip gate removes
    order = sorted(units, key=cost_per_saving)
    best, best_change, worse = None, float("inf"), 0
    for k in range(1, len(order) + 1):
        skips = keeps([pair for unit in order[:k] for pair in unit])
        try:
            plan = one_shot_plan(model, budget, scores, "global", input_size, multiple, resource, latency, *skips)
        except UVCError:
            continue  # pruning cannot reach the budget with this few skips
        candidate = change(plan, refit=True)
        if candidate < best_change:
            best, best_change, worse = plan, candidate, 0
        elif (worse := worse + 1) == 2:
            break
    if best is None:
        raise UVCError(f"cannot reach budget {budget} even with every block skipped")
    return best


def budget_plan(model: nn.Module, budget: float, scores, images: list[torch.Tensor], skip: str = "none",
                allocation: str = "global", input_size=None, multiple: int = 1, resource: str = "macs",
                latency: LatencyModel | None = None) -> list[LayerPlan]:
    """`one_shot_plan`, except where pruning alone cannot reach `budget` and `skip` (a `--skip` mode other than
    "none") allows skipping: there `skipping_plan` (whole blocks with "block"). One-shot's plan and the search's
    start both come from here."""
    skel = skeleton_of(model, input_size, resource, latency)
    if skip != "none" and budget < smallest_ratio(skel, prune=True, skip=False):
        return skipping_plan(model, budget, scores, images, input_size, multiple, resource, latency, skip != "block")
    return one_shot_plan(model, budget, scores, allocation, input_size, multiple, resource, latency)


@torch.no_grad()
def one_shot(model: nn.Module, budget: float, batches: Iterable, importance: str = "activation",
             allocation: str = "global", compensate: bool = True, calibration_images: int = 1000,
             ridge: float = DEFAULT_RIDGE, input_size=None, multiple: int = 1,
             resource: str = "macs", latency: LatencyModel | None = None,
             fit: Callable[[Callable[[float], list[LayerPlan]]], list[LayerPlan]] | None = None,
             skip: str = "none") -> tuple[nn.Module, list[LayerPlan], dict]:
    """Compress `model` to `budget` (a fraction of its `resource`, MACs by default) without training: (slimmed, plan, stats).

    `batches` gives calibration images (labels, if any, are ignored); the first
    `calibration_images` are used for activation importance and for compensation; kept head and MLP
    widths are multiples of `multiple` (or whole). The input model is not changed. Raises UVCError if
    the slimmed model misses [budget - 0.01, budget]. A latency budget needs the model's table `latency`;
    `fit(plan_at)` (default: `plan_at(budget)`) may refit the plan at another budget (`latency.fit_measured`),
    which the window then follows. With `skip` other than "none" (a `--skip` mode), a budget below what pruning
    alone reaches is met by `skipping_plan` (whole blocks with "block"); above it nothing is skipped.
    """
    images = take_images(batches, calibration_images)
    scores = group_importance(model, importance, images)
    targets: dict[int, float] = {}  # the budget each plan was made for: `fit` may keep an earlier one than its last

    def plan_at(target: float) -> list[LayerPlan]:
        made = budget_plan(model, target, scores, images, skip, allocation, input_size, multiple, resource, latency)
        targets[id(made)] = target
        return made
    plan = fit(plan_at) if fit is not None else plan_at(budget)
    fitted = targets[id(plan)]
    slimmed = slim(model, plan)
    ratio = plan_ratio(skeleton_of(model, input_size, resource, latency), plan) if resource == "latency" \
        else count(slimmed, resource, input_size) / count(model, resource, input_size)
    if not fitted - TOLERANCE <= ratio <= fitted:
        raise UVCError(f"one-shot plan reached R = {ratio:.4f}, outside [{fitted - TOLERANCE:.3f}, {fitted}]")
    stats = {"importance": importance, "allocation": allocation, "ratio": ratio, "images": sum(len(x) for x in images)}
    if compensate:
        stats["compensation"] = _compensate(model, slimmed, plan, images, ridge=ridge, max_images=calibration_images)
    return slimmed, plan, stats
