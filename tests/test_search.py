"""The search object: its final fit lands in the budget window whatever the skip decisions were."""
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import uvc
from uvc.flops import skeleton_of
from uvc.importance import GroupNorms, group_norms
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


def test_taylor_importance_is_the_moving_average_of_the_mask_gradients_magnitudes():
    model = tiny_gated(depth=2)
    search = Search(model, 0.5, SearchConfig(skip="both"), skeleton_of(model))
    grads = []
    for seed in (1, 2):
        model.zero_grad()
        search.mark_groups(fade=0.5, probe=True)
        search.set_gates(fade=0.5, probe=True)
        torch.manual_seed(seed)
        model(torch.randn(4, 1, 28, 28)).logsumexp(1).sum().backward()
        block = model.blocks[1]
        grads.append((block.probes[0].grad.clone(), block.probes[1].grad.clone(), search._keep_probe.grad[1].clone()))
        search.record_importance()
    decay = search.cfg.importance_decay
    expected = [decay * a.abs() + (1 - decay) * b.abs() for a, b in zip(*grads)]
    assert grads[0][0].abs().sum() > 0 and grads[0][2].abs().sum() > 0
    torch.testing.assert_close(search.taylor_attn1, expected[0])
    torch.testing.assert_close(search.taylor_mlp1, expected[1])
    keep = grads[0][2], grads[1][2]  # a block's estimate reads both halves' gradients together
    block_gate = decay * keep[0].sum().abs() + (1 - decay) * keep[1].sum().abs()
    torch.testing.assert_close(search.taylor_keep[1, 0], block_gate)


def test_activation_ranking_uses_the_scores_it_was_given_and_weight_norms_until_then():
    model = tiny_gated(depth=2)
    search = Search(model, 0.5, SearchConfig(importance="activation"), skeleton_of(model))
    norms = group_norms(model.blocks[1])
    torch.testing.assert_close(search.importance(1).neurons, norms.neurons)
    scores = [GroupNorms(dims=torch.rand_like(group_norms(b).dims), neurons=torch.rand_like(group_norms(b).neurons))
              for b in model.blocks]
    search.rank_by(scores)
    torch.testing.assert_close(search.importance(1).dims, scores[1].dims)
    search.mark_groups()
    kept = model.blocks[1].neuron_mask > 0
    assert scores[1].neurons[kept].min() >= scores[1].neurons[~kept].max()  # the lowest-scored neurons went
    restored = Search(model, 0.5, SearchConfig(importance="activation"), skeleton_of(model))
    restored.load_state_dict(search.state_dict())  # a resumed run ranks by the same scores
    torch.testing.assert_close(restored.importance(1).neurons, scores[1].neurons)
