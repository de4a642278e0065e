"""The search object: its final fit lands in the budget window whatever the skip decisions were."""
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import uvc
from uvc.flops import skeleton_of
from uvc.search import Search, SearchConfig


def tiny_gated(depth=6):
    torch.manual_seed(0)
    model = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, depth=depth, num_heads=2)
    return uvc.make_compressible(model)


@pytest.mark.parametrize("prune", [True, False])
def test_skipping_that_overshoots_gives_budget_back_into_the_window(prune):
    model = tiny_gated()
    search = Search(model, 0.6, SearchConfig(prune=prune, skip="both"), skeleton_of(model))
    with torch.no_grad():
        search.gate_margin[:3, 0] = -4.0  # three of six blocks skipped: R below 0.6
        search.gate_margin[0, 0] = -0.2  # the skip closest to being kept
    assert float(search.resource()) < 0.59
    plan = search.final_plan()
    ratio = uvc.macs(uvc.slim(model, plan)) / uvc.macs(model)
    assert 0.59 <= ratio <= 0.6
    assert plan[0].attn or plan[0].mlp  # the closest skip was restored first
    assert not any(p.attn or p.mlp for p in plan[1:3])  # the confident skips stand


def test_skip_only_meets_the_budget_by_skipping_the_least_kept_gates():
    model = tiny_gated()
    search = Search(model, 0.5, SearchConfig(prune=False, skip="block"), skeleton_of(model))
    plan = search.final_plan()
    ratio = uvc.macs(uvc.slim(model, plan)) / uvc.macs(model)
    assert 0.49 <= ratio <= 0.5
    assert sum(not (p.attn or p.mlp) for p in plan) >= 2


def test_the_ratios_travel_as_far_in_a_short_search_as_in_a_long_one():
    model = tiny_gated()
    skel = skeleton_of(model)
    assert Search(model, 0.5, SearchConfig(), skel, allocation_steps=40).ratio_lr == pytest.approx(0.02)
    assert Search(model, 0.5, SearchConfig(), skel, allocation_steps=12).ratio_lr == pytest.approx(0.8 / 12)
    assert Search(model, 0.5, SearchConfig(ratio_lr=0.05), skel, allocation_steps=12).ratio_lr == 0.05  # a set rate wins
    moved = []
    for steps in (10, 40):  # the same imbalance at every step: each search moves a ratio by the same total
        search = Search(model, 0.5, SearchConfig(), skel, allocation_steps=steps)
        start = search.ratios.detach().clone()
        with torch.no_grad():
            search.z.fill_(1.0)
            for _ in range(steps):
                search.next_cost.fill_(0.0)  # removing more costs nothing: every ratio wants to grow
                search.next_cost[0] = 1e6  # but block 0's removals are dear: its ratios shrink
                search.allocation_step()
        moved.append((start - search.ratios.detach())[0])
    assert torch.allclose(moved[0], moved[1], atol=0.02) and moved[1].max() > 0.1
    with pytest.raises(uvc.UVCError, match="ratio step and travel"):
        SearchConfig(ratio_travel=-1.0).validate()
