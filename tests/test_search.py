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
