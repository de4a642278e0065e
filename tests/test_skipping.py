"""Skip decisions are real: the search skips what adds nothing and keeps what matters.

Both tests run the search on the bundled teacher with Fashion-MNIST, then harden its decisions with
`final_plan`. The first hollows out three blocks (their residual branches add nothing, and only their
output biases can learn), so skipping them is the cheapest way to the budget; the second leaves every block intact but zeroes most
of each block's width, so removing that width is the cheap way and skipping would cost accuracy.
"""
from itertools import islice

import pytest
import torch

import uvc
from uvc.compress import CompressConfig, Run
from uvc.data import DataConfig
from uvc.engine import Schedule
from uvc.search import SearchConfig

STEPS = 40


def searched_plan(model: torch.nn.Module, budget: float, tmp_path) -> list[uvc.LayerPlan]:
    """Run STEPS search steps of `uvc.compress` (the teacher distils into `model`) and return the fitted plan."""
    cfg = CompressConfig(budget=budget, out=str(tmp_path), device="cpu",
                         data=DataConfig(train_limit=64 * STEPS, val_limit=64, test_limit=64, batch_size=64),
                         search=SearchConfig(schedule=Schedule(epochs=1.0, lr=6e-4, weight_decay=0.05, warmup_epochs=0.05),
                                             warmup_epochs=0.1, fade_epochs=0.25, skip="both"))
    run = Run(cfg, model=model, teacher=uvc.load_model(None), teacher_scores={"test": 0.0, "val": 0.0})
    for step, (x, y) in enumerate(islice(run.data.train, STEPS)):
        run.search_step(x, y, step)
    return run.search.final_plan()


def kept_width(plan: uvc.LayerPlan) -> int:
    return sum(len(d) for d in plan.dims) + len(plan.neurons)


def test_blocks_that_add_nothing_are_skipped_and_width_stays_elsewhere(tmp_path, fmnist_available):
    if not fmnist_available:
        pytest.skip("Fashion-MNIST is missing")
    model, hollow = uvc.load_model(None), (3, 6, 9)
    with torch.no_grad():
        for l in hollow:  # the residual branches output zero and their weights get no gradient: identities
            block = model.blocks[l]
            for layer in (block.norm1, block.norm2, block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                layer.bias.zero_()
            for layer in (block.norm1, block.norm2, block.attn.proj, block.mlp.fc2):
                layer.weight.zero_()
    plan = searched_plan(model, 0.65, tmp_path)  # skipping the three alone gives R = 0.75
    skipped = [l for l, p in enumerate(plan) if not (p.attn or p.mlp)]
    assert skipped == list(hollow), [(p.attn, p.mlp) for p in plan]
    ratio = uvc.macs(uvc.slim(uvc.make_compressible(model), plan)) / uvc.macs(model)
    assert 0.64 <= ratio <= 0.65
    # Skipping three of twelve blocks pays for most of the budget: the other blocks keep more width
    # than the uniform plan at this budget gives each of them.
    uniform = uvc.budget.uniform_plan(model, 0.65)
    kept = [kept_width(plan[l]) for l in range(12) if l not in hollow]
    assert min(kept) > kept_width(uniform[0]) and sum(kept) / len(kept) > 0.8 * (3 * 64 + 768)


def test_blocks_that_matter_are_not_skipped_when_width_is_the_cheap_way(tmp_path, fmnist_available):
    if not fmnist_available:
        pytest.skip("Fashion-MNIST is missing")
    model = uvc.load_model(None)
    with torch.no_grad():
        for block in model.blocks:  # 60 % of every block's neurons and head dimensions do nothing
            dead = block.mlp.fc2.weight.pow(2).sum(0).argsort()[:460]
            block.mlp.fc2.weight[:, dead] = 0.0
            dims = block.attn.proj.weight.pow(2).sum(0).view(3, 64).argsort(dim=1)[:, :38]  # per head
            proj, qkv = block.attn.proj.weight.view(192, 3, 64), block.attn.qkv
            for h in range(3):  # the dimension's q, k and v and its column of the output projection
                proj[:, h, dims[h]] = 0.0
                qkv.weight.view(3, 3, 64, 192)[:, h, dims[h]] = 0.0
                qkv.bias.view(3, 3, 64)[:, h, dims[h]] = 0.0
    plan = searched_plan(model, 0.5, tmp_path)
    assert all(p.attn and p.mlp for p in plan), [(p.attn, p.mlp) for p in plan]
    ratio = uvc.macs(uvc.slim(uvc.make_compressible(model), plan)) / uvc.macs(model)
    assert 0.49 <= ratio <= 0.5


def test_a_start_below_what_pruning_reaches_skips_the_halves_that_add_least_and_fits_the_rest():
    """`skipping_plan`: below pruning's floor, the halves whose skipping changes the output least go first
    (here the hollowed ones, which add nothing), and the widths of the rest land the plan in the window."""
    from timm.models.vision_transformer import VisionTransformer

    from uvc.budget import plan_ratio, smallest_ratio
    from uvc.flops import skeleton_of
    from uvc.oneshot import group_importance, skipping_plan
    from uvc.resource import HalfTimes, LatencyModel

    torch.manual_seed(0)
    model = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, depth=6,
                              num_heads=2).eval()
    hollow = {(1, "mlp"), (3, "attn"), (4, "mlp")}
    with torch.no_grad():
        for l, half in hollow:
            layer = model.blocks[l].mlp.fc2 if half == "mlp" else model.blocks[l].attn.proj
            layer.weight.zero_()
            layer.bias.zero_()
    images = [torch.randn(32, 1, 28, 28) for _ in range(4)]
    # batch-1-like times: a half's fixed overhead outweighs its width, so pruning alone stops at R = 13 / 19
    half = HalfTimes(heads=(1, 2), head_dims=(1, 32), attn=((1.0, 1.2), (1.1, 1.5)), hidden=(1, 256), mlp=(1.0, 1.5))
    latency = LatencyModel(fixed=1.0, blocks=(half,) * 6)
    skel = skeleton_of(model, resource="latency", latency=latency)
    assert smallest_ratio(skel, prune=True, skip=False) == pytest.approx(13 / 19)
    budget = 0.6
    plan = skipping_plan(model, budget, group_importance(model, "activation", images), images, resource="latency",
                         latency=latency)
    assert budget - 0.01 <= plan_ratio(skel, plan) <= budget
    skipped = {(l, half) for l, p in enumerate(plan) for half, runs in (("attn", p.attn), ("mlp", p.mlp)) if not runs}
    assert hollow <= skipped  # the free halves go before any that adds something
    widths = [len(p.neurons) for p in plan if p.mlp] + [len(p.heads) * p.head_dim for p in plan if p.attn]
    assert max(widths) > 1  # not every running width at its floor
