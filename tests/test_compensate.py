"""Compensation (closed-form refit of attn.proj / mlp.fc2 after slimming) and one-shot pruning."""
from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import uvc
from uvc.compensate import HALVES, _branch, _scaled, block_inputs, compensate, compensate_masked
from uvc.gates import make_compressible, set_plan
from uvc.adapters import adapter_for
from uvc.budget import uniform_plan
from uvc.oneshot import one_shot


def tiny_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=64, depth=4,
                             num_heads=2).eval()


def images(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.randn(n, 1, 28, 28, generator=g).split(32))


def keep_all(model) -> list:
    plan = []
    for b in adapter_for(model).blocks(model):
        heads, width = b.attn.num_heads, b.attn.head_dim
        plan.append(uvc.LayerPlan(heads=list(range(heads)), dims=[list(range(width))] * heads,
                                  neurons=list(range(b.mlp.fc1.out_features))))
    return plan


def pruned_plan(seed: int = 0) -> list:
    """Half the dims of both heads and half the neurons everywhere; block 1 loses its attention, block 2 is dropped."""
    g = torch.Generator().manual_seed(seed)

    def pick(n, k):
        return sorted(torch.randperm(n, generator=g)[:k].tolist())

    plan = [uvc.LayerPlan(heads=[0, 1], dims=[pick(32, 16), pick(32, 16)], neurons=pick(256, 128)) for _ in range(4)]
    plan[1].attn = False
    plan[2].attn = plan[2].mlp = False
    return plan


def logits_error(model, dense, xs) -> float:
    return sum(float((model(x) - dense(x)).pow(2).sum()) for x in xs)


def test_keeping_everything_changes_nothing():
    dense = tiny_vit()
    for target in ("stream", "block"):
        slimmed = uvc.slim(dense, keep_all(dense))
        compensate(dense, slimmed, keep_all(dense), images(64, 1), target=target)
        for x in images(32, 2):
            torch.testing.assert_close(slimmed(x), dense(x), atol=1e-5, rtol=0)


@torch.no_grad()
def walk(dense, slimmed, plan, xs):
    """Yield (features, target) per fitted layer, recomputed from the compensated model (stream target)."""
    survivors = iter(adapter_for(slimmed).blocks(slimmed))
    xs = block_inputs(slimmed, xs, 10 ** 9)
    xd = list(xs)
    for db, layer in zip(adapter_for(dense).blocks(dense), plan):
        sb = next(survivors) if (layer.attn or layer.mlp) else None
        for half in HALVES:
            d_next = [x + _scaled(db, half, _branch(db, half, x)[0]) for x in xd]
            if sb is not None and getattr(sb, half[0]) is not None:
                a = torch.cat([_branch(sb, half, x)[1].flatten(0, -2) for x in xs])
                y = torch.cat([(d - x).flatten(0, -2) for d, x in zip(d_next, xs)])
                yield getattr(getattr(sb, half[0]), half[3]), a.double(), y.double()
                xs = [x + _scaled(sb, half, _branch(sb, half, x)[0]) for x in xs]
            xd = d_next


def test_refit_reduces_every_layer_error_and_solves_the_normal_equations():
    dense, plan = tiny_vit(), pruned_plan()
    calibration, held_out = images(128, 1), images(64, 2)
    before = uvc.slim(dense, plan)
    after = uvc.slim(dense, plan)
    stats = compensate(dense, after, plan, calibration, ridge=1e-3)
    assert [(l["block"], l["half"]) for l in stats["layers"]] == [(0, "attn"), (0, "mlp"), (1, "mlp"), (3, "attn"), (3, "mlp")]
    assert stats["images"] == 128 and all(l["mse_after"] < l["mse_before"] for l in stats["layers"])
    old = dict(before.named_parameters())
    for layer, a, y in walk(dense, after, plan, calibration):
        name = next(n for n, m in after.named_modules() if m is layer)
        w0, b0 = old[name + ".weight"].detach().double(), old[name + ".bias"].detach().double()
        w, b = layer.weight.detach().double(), layer.bias.detach().double()
        err = lambda w, b: float((a @ w.T + b - y).pow(2).sum())  # noqa: E731
        assert err(w, b) < err(w0, b0)
        # gradient of |A W^T + b - Y|^2 + lam s |W - W0|^2 (bias unpenalised) vanishes at the solution
        residual = a @ w.T + b - y
        s = float(a.pow(2).sum(0).mean())
        grad_w = residual.T @ a + 1e-3 * s * (w - w0)
        assert float(grad_w.abs().max()) < 1e-6 * float((y.T @ a).abs().max())
        assert float(residual.sum(0).abs().max()) < 1e-6 * float(y.abs().sum(0).max())
    assert logits_error(after, dense, held_out) < logits_error(before, dense, held_out)


def test_bias_fold_reproduces_constant_removed_neurons():
    dense = tiny_vit()
    plan = keep_all(dense)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for b, layer in zip(dense.blocks, plan):
            removed = torch.randperm(256, generator=g)[:100]
            b.mlp.fc1.weight[removed] = 0.0  # these neurons output gelu(bias): a constant
            b.mlp.fc1.bias[removed] = torch.randn(100, generator=g)
            layer.neurons = sorted(set(range(256)) - set(removed.tolist()))
    plain, folded = uvc.slim(dense, plan), uvc.slim(dense, plan)
    compensate(dense, folded, plan, images(32, 1), mode="bias")
    x = images(32, 2)[0]
    assert float((plain(x) - dense(x)).abs().max()) > 1e-3
    torch.testing.assert_close(folded(x), dense(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_parameters_keep_their_dtype(dtype):
    dense, plan = tiny_vit().to(dtype), pruned_plan()
    before, after = uvc.slim(dense, plan).to(dtype), uvc.slim(dense, plan).to(dtype)
    compensate(dense, after, plan, images(64, 1))
    assert all(p.dtype == dtype for p in after.parameters())
    held_out = [x.to(dtype) for x in images(64, 2)]
    assert logits_error(after, dense, held_out) < logits_error(before, dense, held_out)


def test_one_shot_meets_the_budget_and_is_deterministic():
    model = tiny_vit()
    dense = uvc.macs(model)
    for budget in (0.3, 0.5):
        for importance, allocation in (("weight", "uniform"), ("activation", "global")):
            runs = [one_shot(model, budget, images(64, 1), importance=importance, allocation=allocation,
                             calibration_images=48) for _ in range(2)]
            (slimmed, plan, stats), (again, plan2, _) = runs
            assert budget - 0.01 <= uvc.macs(slimmed) / dense <= budget
            assert stats["compensation"]["images"] == 48
            assert [p.to_dict() for p in plan] == [p.to_dict() for p in plan2]
            for (name, p), q in zip(slimmed.state_dict().items(), again.state_dict().values()):
                assert torch.equal(p, q), name


@pytest.mark.parametrize("budget", [0.3, 0.5])
def test_every_kept_width_is_a_multiple_or_whole_in_the_one_shot_and_the_uniform_plans(budget):
    model, multiple = tiny_vit(), 8
    plans = {"uniform plan": uniform_plan(model, budget, multiple=multiple)}
    for allocation in ("uniform", "global"):
        slimmed, plans[f"one-shot {allocation}"], _ = one_shot(model, budget, images(64, 1), allocation=allocation,
                                                               calibration_images=32, compensate=False, multiple=multiple)
        assert budget - 0.01 <= uvc.macs(slimmed) / uvc.macs(model) <= budget
    blocks = list(adapter_for(model).blocks(model))
    for name, plan in plans.items():
        for layer, block in zip(plan, blocks):
            widths = [(len(d), block.attn.head_dim) for d in layer.dims] + [(len(layer.neurons), block.mlp.fc1.out_features)]
            assert all(kept % multiple == 0 or kept == whole for kept, whole in widths), (name, widths)


def test_t2t_vit_is_compensated_through_its_adapter():
    torch.manual_seed(0)
    dense = uvc.load_model("t2t_vit_7", img_size=32, num_classes=10)
    plan = uniform_plan(dense, 0.5)
    before, after = uvc.slim(dense, plan), uvc.slim(dense, plan)
    stats = compensate(dense, after, plan, [torch.randn(16, 3, 32, 32)])
    assert len(stats["layers"]) == 2 * len(dense.blocks)
    held_out = [torch.randn(8, 3, 32, 32)]
    assert logits_error(after, dense, held_out) < logits_error(before, dense, held_out)


def test_a_gated_model_compensated_in_place_computes_the_compensated_slimmed_model():
    """The search's compensated start: under the plan's masks, the refitted gated model is the refitted slimmed
    one; the removed columns keep their weights (masked now, they can come back if the search restores them)."""
    dense, plan = tiny_vit(), pruned_plan()
    expected = uvc.slim(dense, plan)
    compensate(dense, expected, plan, images(64, 1))
    gated = make_compressible(tiny_vit())
    before = [b.mlp.fc2.weight.clone() for b in adapter_for(gated).blocks(gated)]
    compensate_masked(gated, plan, images(64, 1))
    set_plan(gated, plan)
    for x in images(32, 2):
        torch.testing.assert_close(gated(x), expected(x), atol=1e-5, rtol=1e-4)
    assert logits_error(gated, dense, images(32, 2)) > 0  # it did change the model
    for layer, block, old in zip(plan, adapter_for(gated).blocks(gated), before):
        removed = sorted(set(range(old.shape[1])) - set(layer.neurons))
        torch.testing.assert_close(block.mlp.fc2.weight[:, removed], old[:, removed], atol=0, rtol=0)
        if layer.mlp:
            assert not torch.equal(block.mlp.fc2.weight[:, layer.neurons], old[:, layer.neurons])
